"""Train a LoRA adapter on the demo backbone with PEFT (MLP projections by default; `--targets` for attention
too), as a team that already owns adapters would.

Usage (the demo's LoRA adapters, see demo/experts/README.md)::

    python -m demo.train_lora --model demo/model --data demo/data/code_train.jsonl \
        --heldout demo/data/code_heldout.jsonl --out build/lora/demo-code --seed 0 --threads 1
    python -m demo.train_lora ... --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj   # attention+MLP

A plain torch loop around PEFT's `get_peft_model` (rank 16, alpha 32, gate/up/down projections, no dropout,
AdamW, linear warmup then cosine to 10%), with the loss plugmoe's stage 1 uses (every token of a text record,
the answer tokens of a question/answer record), so its perplexities compare with the bottleneck experts'.
Writes a PEFT adapter directory (`save_pretrained`) and `train_report.json` beside it. Needs `peft` (a dev
dependency of plugmoe; plugmoe itself only reads the adapter's files). Seeded: the same command on the same
machine gives the same adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.data import load_examples, shuffled_picks
from moe.model.text_batches import batches, summed_nll, token_nll
from moe.model.text_batches import perplexity as perplexity_of


@torch.no_grad()
def perplexity(model, tokenizer, examples, max_tokens: int, batch_size: int = 32) -> float:
    """Per scored token, over `examples` (what `plugmoe eval` calls ppl)."""
    held = batches(tokenizer, examples, batch_size, max_tokens)
    return perplexity_of(*summed_nll(held, lambda batch: model(input_ids=batch.ids, attention_mask=batch.mask).logits))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Not experts.schedule.warmup_cosine: here a linear ramp over the first `warmup` steps scales a cosine that
    runs from step 0 (stage 1 warms up first, then starts the cosine). The demo's adapters were trained with this
    one, and it stays so that they rebuild bit for bit (even pi * (step / steps) in place of pi * step / steps
    moves some rates by an ulp)."""
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo/model")
    parser.add_argument("--data", required=True, help="training JSONL ({text} or {question, answer} records)")
    parser.add_argument("--heldout", help="held-out JSONL: perplexity before and after, in train_report.json")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=128, help="held-out records scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--targets", nargs="+", default=["gate_proj", "up_proj", "down_proj"], help="PEFT target_modules"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=args.targets,
    )
    model = get_peft_model(base, config)
    train = load_examples(args.data)
    held = load_examples(args.heldout)[: args.eval_limit] if args.heldout else []
    report: dict = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    model.eval()
    if held:
        with model.disable_adapter():
            report["heldout_ppl_backbone"] = perplexity(model, tokenizer, held, args.max_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(20, args.steps // 10))
    picks = shuffled_picks(len(train), args.batch_size, random.Random(args.seed))
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step, picked in zip(range(args.steps), picks, strict=False):
        (batch,) = batches(tokenizer, [train[i] for i in picked], args.batch_size, args.max_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        nll, count = token_nll(model(input_ids=batch.ids, attention_mask=batch.mask).logits, batch)
        loss = nll.sum() / count.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss))
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {sum(losses[-25:]) / 25:.4f} ({time.perf_counter() - started:.0f} s)")
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["final_loss_mean25"] = sum(losses[-25:]) / max(len(losses[-25:]), 1)
    model.eval()
    if held:
        report["heldout_ppl_lora"] = perplexity(model, tokenizer, held, args.max_tokens)
    model.save_pretrained(args.out)
    (Path(args.out) / "train_report.json").write_text(json.dumps({**vars(args), **report}, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
