"""How much perplexity can any expert win on a domain? Fine-tune the *whole* backbone on the domain's training
text and score its held-out split: no MLP expert (a part of the model, trained on the same data) should be
expected to beat that. Beside it, a bottleneck adapter of any rank trained alone (train-expert's stage 1,
pinned), to see how close an expert gets.

    python -m demo.ceiling --data demo/data/code_train.jsonl --heldout demo/data/code_heldout.jsonl --threads 1
    python -m demo.ceiling ... --adapter-rank 256 --lr 5e-3 --steps 1000      # an expert's stage 1 alone

The loss is plugmoe's (every token of a text record, the answer tokens of a Q/A record), on the first
`--eval-examples` held-out records, as `plugmoe eval` scores perplexity; the best evaluation is reported
(every `--eval-every` steps). Nothing is written but a JSON line on stdout. Seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from experts.config import TrainConfig
from experts.data import load_examples, shuffled_picks
from experts.train import heldout_loss, lr_at, reference_set, train_adapter, trainable_expert
from moe import RoutedModel, RoutingSpec, load_backbone
from moe.model.text_batches import batches, forward, token_nll


def fine_tune_whole_backbone(model: RoutedModel, tokenizer, train: list, held: list, config: TrainConfig) -> list:
    """AdamW on every backbone parameter (train-expert's schedule and batching); [(step, held-out loss)]."""
    params = list(model.backbone.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    nothing, off = reference_set(model, ()), RoutingSpec("off")
    held_batches = batches(tokenizer, held, 32, config.max_tokens)
    history = [(0, heldout_loss(model, nothing, off, held_batches))]
    picks = shuffled_picks(len(train), config.batch_size, random.Random(f"{config.seed}/batches"))
    for step, picked in zip(range(1, config.steps + 1), picks, strict=False):
        (batch,) = batches(tokenizer, [train[i] for i in picked], config.batch_size, config.max_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, config)
        nll, count = token_nll(forward(model, batch, [off] * len(batch), nothing).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        (nll.sum() / count.sum().clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            history.append((step, heldout_loss(model, nothing, off, held_batches)))
            print(f"step {step}: held-out loss {history[-1][1]:.4f}", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo/model")
    parser.add_argument("--data", required=True, help="the domain's training JSONL")
    parser.add_argument("--heldout", required=True, help="its held-out JSONL")
    parser.add_argument("--adapter-rank", type=int, help="train a bottleneck adapter of this rank instead")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warmup, cosine to 10%%)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="also merge the result into this JSON file (ceilings per domain)")
    parser.add_argument("--domain", help="its name in --out (the `plugmoe eval` domain it is the ceiling of)")
    args = parser.parse_args()
    if args.out and not args.domain:
        parser.error("--out needs --domain")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone, tokenizer = load_backbone(args.model, device="cpu")
    model = RoutedModel(backbone)
    train, held = load_examples(args.data), load_examples(args.heldout)[: args.eval_examples]
    config = TrainConfig(
        name="ceiling",
        rank=args.adapter_rank or 1,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        seed=args.seed,
    )
    started = time.perf_counter()
    if args.adapter_rank:
        expert = trainable_expert(config, model.hidden_size, model.num_layers, model.device)
        result = train_adapter(model, tokenizer, expert, train, held, config)
        history = [(int(h["step"]), h["heldout_loss"]) for h in result.history]
    else:
        history = fine_tune_whole_backbone(model, tokenizer, train, held, config)
    base = history[0][1]
    step, best = min(history[1:], key=lambda h: h[1])
    what = f"bottleneck adapter rank {args.adapter_rank}" if args.adapter_rank else "whole backbone fine-tuned"
    result = {
        "what": what,
        "data": args.data,
        "steps": args.steps,
        "lr": args.lr,
        "backbone_ppl": round(math.exp(base), 4),
        "best_step": step,
        "best_ppl": round(math.exp(best), 4),
        "ppl_change": f"{math.exp(best - base) - 1:+.1%}",
        "seconds": round(time.perf_counter() - started),
    }
    print(json.dumps(result))
    if args.out:  # the file `plugmoe eval --ceiling` reads (experts.ceiling)
        ceilings = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
        ceilings[args.domain] = result
        args.out.write_text(json.dumps(ceilings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
