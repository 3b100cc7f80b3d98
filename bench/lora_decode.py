"""CPU decode cost of an attention+MLP LoRA expert: pinned and routed against PEFT's merged-weights model and the
bare backbone, at batch 1 and 16, in one run (ratios from the same rounds).

The backbone has GPT-2-124M's shape (GPT2Config(): 12 layers, hidden 768, vocabulary 50257), random weights from
the config (no download). The adapter is a PEFT LoRA of rank --rank on every linear layer of the decoder (the
fused qkv c_attn, attention c_proj, mlp.c_fc, mlp.c_proj; init_lora_weights=False: nonzero B), built with PEFT,
saved, and imported as plugmoe imports any adapter (moe.adapters.peft). Variants, each greedy with EOS blocked,
so every row decodes exactly --new-tokens:

    bare         plugmoe's generate (prefill, then the fixed-slot decoder) with no expert plugged
    peft-merged  PEFT's model after merge_and_unload(), transformers' greedy generate (what a PEFT user runs)
    pinned       plugmoe's generate, the expert pinned (RoutingSpec pin): every token through its LoRA pairs
    routed       plugmoe's generate, token mode: the expert's gate (keys from its domain's attention inputs,
                 threshold at the median score of a decode) takes about half the decisions, before attention

Decode tok/s = batch * (new_tokens - 1) / (t(new_tokens) - t(1)): each run's prefill and first token are
subtracted by timing the same call at 1 new token. Rounds interleave the variants (a different order each
round), so a neighbour's load on the shared CPU hits every variant alike; the median round counts.

    python bench/lora_decode.py                          # rank 16, batches 1 and 16, 3 rounds
    python bench/lora_decode.py --rounds 5 --new-tokens 48 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank, and then"


def build(rank: int, seed: int, directory: Path):
    """(config, the backbone's state dict, the PEFT adapter directory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config()  # GPT-2-124M's shape
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    get_peft_model(base, lora).save_pretrained(directory)
    return config, weights, directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moe import RoutedModel, RoutingSpec
    from moe.adapters.peft import convert_adapter
    from moe.decode.generation import generate
    from moe.decode.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"load before: {os.getloadavg()} (2 cores shared by five engineers), threads {args.threads}")
    tmp = Path(tempfile.mkdtemp(prefix="lora-decode-"))
    config, weights, adapter_dir = build(args.rank, args.seed, tmp / "adapter")

    def backbone() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_config(config).eval()
        model.load_state_dict(weights)
        return model

    tokenizer = _tokenizer(config.vocab_size)
    prompt_ids = tokenizer(PROMPT)["input_ids"]

    bare = RoutedModel(backbone())
    routed = RoutedModel(backbone())
    expert, _ = convert_adapter(adapter_dir, routed, "lora")
    pinned = RoutedModel(backbone())
    pinned.plug(expert)
    _gate(routed, tokenizer, expert, args.new_tokens)
    merged = PeftModel.from_pretrained(backbone(), adapter_dir).merge_and_unload().eval()

    def plugmoe(model: RoutedModel, spec: RoutingSpec):
        def run(batch: int, new: int) -> list:
            params = [SamplingParams(ignore_eos=True)] * batch
            return generate(model, tokenizer, [PROMPT] * batch, spec, new, sampling=params, batch_size=batch)

        return run

    def hf(batch: int, new: int):
        x = torch.tensor([prompt_ids] * batch)
        return merged.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip

    variants = {
        "bare": plugmoe(bare, RoutingSpec("off")),
        "peft-merged": hf,
        "pinned": plugmoe(pinned, RoutingSpec("pin", "lora")),
        "routed": plugmoe(routed, RoutingSpec("token")),
    }
    share = _routed_share(routed, tokenizer, args.new_tokens)
    print(f"routed: the expert takes {share:.0%} of the decisions (tokens x layers) in a decode", flush=True)
    results: dict[int, dict[str, list[float]]] = {b: {name: [] for name in variants} for b in args.batches}
    for batch in args.batches:
        for run in variants.values():  # warm-up: first-call costs out of the timings
            run(batch, 2)
        names = list(variants)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                run = variants[name]
                t1 = _timed(run, batch, 1)
                tn = _timed(run, batch, args.new_tokens)
                results[batch][name].append(batch * (args.new_tokens - 1) / max(tn - t1, 1e-9))
            line = "  ".join(f"{name} {results[batch][name][-1]:.1f}" for name in names)
            print(f"batch {batch} round {r + 1}: {line} tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nGPT-2-124M shape, rank-{args.rank} LoRA on c_attn, attn.c_proj, c_fc, mlp.c_proj; CPU decode tok/s")
    print(f"(median of {args.rounds} interleaved rounds, {args.new_tokens} new tokens, prompt {len(prompt_ids)})")
    print(f"{'batch':>5} {'bare':>8} {'peft-merged':>12} {'pinned':>8} {'routed':>8}  pinned/merged  routed/bare")
    for batch in args.batches:
        med = {name: statistics.median(v) for name, v in results[batch].items()}
        print(
            f"{batch:>5} {med['bare']:>8.1f} {med['peft-merged']:>12.1f} {med['pinned']:>8.1f} {med['routed']:>8.1f}"
            f"  {med['pinned'] / med['peft-merged']:>13.2f}  {med['routed'] / med['bare']:>11.2f}"
        )
    print(f"load after: {os.getloadavg()}")
    return 0


def _timed(run, batch: int, new: int) -> float:
    started = time.perf_counter()
    run(batch, new)
    return time.perf_counter() - started


def _tokenizer(vocab: int):
    """A byte-level tokenizer over GPT-2's vocabulary size (tests.tiny's, offline): what the prompt is encoded
    with; the model's weights are random, so which ids only matters for their count."""
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= vocab
    return tokenizer


def _gate(model, tokenizer, expert, new: int):
    """Plug the expert with a gate that takes about half of a decode's decisions: per covered layer, its key is
    the mean unit attention input (where an attention expert is decided) of the prompt and its bare greedy
    continuation, its threshold the median score; the thresholds are set again from a pass with the gate
    plugged (the expert's own effect moves the later layers' inputs)."""
    import torch
    import torch.nn.functional as F

    from moe import RoutingSpec
    from moe.decode.generation import generate
    from moe.decode.sampling import SamplingParams

    (g,) = generate(model, tokenizer, [PROMPT], RoutingSpec("off"), new, sampling=[SamplingParams(ignore_eos=True)])
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"] + g.token_ids])
    out = model(ids, routing=[RoutingSpec("off")], capture_attention_inputs=True)
    units = [F.normalize(out.attention_inputs[layer][0].float(), dim=-1) for layer in expert.layers]  # [T, H]
    expert.keys = torch.stack([F.normalize(x.mean(dim=0), dim=0) for x in units])
    expert.offsets = torch.zeros(len(expert.layers))
    expert.thresholds = torch.stack([(x @ key).median() for x, key in zip(units, expert.keys, strict=True)])
    model.plug(expert)
    out = model(ids, routing=[RoutingSpec("token")], capture_attention_inputs=True)
    units = [F.normalize(out.attention_inputs[layer][0].float(), dim=-1) for layer in expert.layers]
    expert.thresholds = torch.stack([(x @ key).median() for x, key in zip(units, expert.keys, strict=True)])
    model.plug(expert, replace=True)


def _routed_share(model, tokenizer, new: int) -> float:
    from moe import RoutingSpec
    from moe.decode.generation import generate
    from moe.decode.sampling import SamplingParams

    (g,) = generate(model, tokenizer, [PROMPT], RoutingSpec("token"), new, sampling=[SamplingParams(ignore_eos=True)])
    return g.counts["lora"] / max(sum(g.counts.values()), 1)


if __name__ == "__main__":
    raise SystemExit(main())
