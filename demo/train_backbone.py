"""Train the plugmoe demo backbone (tokenizer + tiny Llama) from scratch on the synthetic corpus.

Usage::

    python -m demo.corpus --out demo/data --seed 0
    python -m demo.train_backbone --data demo/data --out demo/model --seed 0

The backbone sees ~85% general text, ~10% math and ~5% code (train splits only, mixed by
*tokens*), see :mod:`demo.corpus` and ``TrainSettings.mix`` for why.  Everything runs on CPU with
two threads in well under twenty minutes and is seeded, so a rerun on the same machine reproduces
the same weights.

Outputs in ``--out``: ``model.safetensors``, ``config.json``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` (loadable offline with ``AutoTokenizer`` /
``AutoModelForCausalLM``) and ``TRAINING.md`` with the rebuild commands and evaluation results.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demo.corpus import extract_final_number, format_math, math_prompt, read_jsonl
from experts.schedule import warmup_cosine
from moe.model.text_batches import TokenBatch, collate, summed_nll
from moe.model.text_batches import perplexity as perplexity_of

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"

# The template renders "User: ...\nAssistant:" without a trailing space: the byte-level BPE glues
# the space to the next word (" Mia"), so the model continues exactly as it does after "Answer:".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class TokenizerSettings:
    vocab_size: int = 3072
    min_frequency: int = 2


@dataclass
class ModelSettings:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class TrainSettings:
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # Token shares of the backbone mix; math/code come from the *train* splits only.  Code gets
    # half the math share: its templates have much lower entropy, and at 10% the backbone got so
    # close to the code floor that even full fine-tuning on code_train only cut heldout perplexity
    # by ~12% (1.79 -> 1.58), leaving too little room for a code expert.  Math at 10% left ~25%.
    mix: dict[str, float] = field(default_factory=lambda: {"general": 0.85, "math": 0.10, "code": 0.05})
    # Some math docs use the chat format so chat-templated prompts also land in-distribution.
    math_chat_fraction: float = 0.25
    threads: int = 2
    log_every: int = 25


@dataclass
class EvalSettings:
    n_math: int = 100
    math_max_new_tokens: int = 96
    sample_max_new_tokens: int = 80
    batch_size: int = 20
    general_prompts: tuple[str, ...] = (
        "Once upon a time, a curious fox",
        "On Sunday morning, Mia",
        "The otter is",
    )
    code_prompts: tuple[str, ...] = (
        "def count_even_scores(scores):",
        "def greet(name):",
        "# Compute the average of the prices\n",
    )


@dataclass
class Settings:
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_domain_texts(data_dir: Path, split: str, seed: int, math_chat_fraction: float) -> dict[str, list[str]]:
    """Training-format documents per domain for ``split`` ("train" or "heldout")."""
    rng = random.Random(f"{seed}/format/{split}")
    texts: dict[str, list[str]] = {}
    for domain in ("general", "math", "code"):
        recs = read_jsonl(data_dir / f"{domain}_{split}.jsonl")
        if domain == "math":
            texts[domain] = [format_math(r, chat=rng.random() < math_chat_fraction) for r in recs]
        else:
            texts[domain] = [r["text"] for r in recs]
    return texts


def train_tokenizer(texts: list[str], settings: TokenizerSettings) -> PreTrainedTokenizerFast:
    """Byte-level BPE; digits are split one by one, which helps a tiny model learn arithmetic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    # Every encoded text starts with <|endoftext|>, matching the EOS-separated packed stream the
    # model is trained on (the token before a document is always EOS).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_batches(
    texts: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerFast,
    settings: TrainSettings,
    seed: int,
) -> torch.Tensor:
    """Packed ``(steps, batch, seq_len + 1)`` token tensor honouring the domain token mix.

    Each domain is an endless stream of shuffled epochs of ``EOS doc EOS doc ...``; we cut
    ``share * total`` tokens from each stream into sequences and shuffle all sequences together.
    """
    rng = random.Random(f"{seed}/pack")
    n_seqs = settings.steps * settings.batch_size
    width = settings.seq_len + 1
    seqs: list[list[int]] = []
    for domain, share in settings.mix.items():
        encoded = tokenizer(texts[domain], add_special_tokens=True)["input_ids"]
        need = round(share * n_seqs) * width
        stream: list[int] = []
        epochs = 0
        while len(stream) < need:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for i in order:
                stream.extend(encoded[i])
            epochs += 1
        n_tok = sum(map(len, encoded))
        logger.info(
            "%-7s %6d docs %8d tokens/epoch -> %.2f epochs in the mix",
            domain,
            len(encoded),
            n_tok,
            need / n_tok,
        )
        seqs.extend(stream[i : i + width] for i in range(0, need, width))
    rng.shuffle(seqs)
    seqs = (seqs + seqs)[:n_seqs]  # rounding of shares can leave us one or two short
    return torch.tensor(seqs, dtype=torch.long).view(settings.steps, settings.batch_size, width)


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


def make_model(tokenizer: PreTrainedTokenizerFast, settings: ModelSettings) -> LlamaForCausalLM:
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=settings.max_position_embeddings,
        rope_theta=settings.rope_theta,
        tie_word_embeddings=settings.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, settings: TrainSettings) -> float:
    return warmup_cosine(step, settings.lr, settings.warmup_steps, settings.steps, floor=settings.min_lr_ratio)


def train(model: LlamaForCausalLM, batches: torch.Tensor, settings: TrainSettings) -> float:
    """Run the training loop; returns the mean loss over the last ``log_every`` steps."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=settings.betas,
    )
    model.train()
    recent: list[float] = []
    start = time.time()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        batch = batches[step]
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        # labels == inputs: HF shifts internally, so sequence i predicts token i+1 of the packed row.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(out.loss.item())
        recent = recent[-settings.log_every :]
        if (step + 1) % settings.log_every == 0 or step == 0:
            elapsed = time.time() - start
            logger.info(
                "step %4d/%d  loss %.4f  lr %.2e  %.1fs elapsed, eta %.0fs",
                step + 1,
                settings.steps,
                sum(recent) / len(recent),
                lr_at(step, settings),
                elapsed,
                elapsed / (step + 1) * (settings.steps - step - 1),
            )
    model.eval()
    return sum(recent) / len(recent)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], bs: int) -> float:
    """Token-level perplexity of ``EOS text EOS`` documents (predicting text and the final EOS)."""

    def documents(start: int) -> TokenBatch:  # every token is scored: each one after the first is predicted
        ids = [t + [tokenizer.eos_token_id] for t in tokenizer(texts[start : start + bs])["input_ids"]]
        return collate([(row, [True] * len(row)) for row in ids], tokenizer.pad_token_id)

    def logits(batch: TokenBatch) -> torch.Tensor:
        return model(input_ids=batch.ids, attention_mask=batch.mask).logits

    return perplexity_of(*summed_nll((documents(start) for start in range(0, len(texts), bs)), logits))


@torch.no_grad()
def greedy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    max_new_tokens: int,
    bs: int,
) -> list[str]:
    """Batched greedy completions (left padding), decoded without the prompt."""
    tokenizer.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), bs):
        enc = tokenizer(prompts[i : i + bs], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outs.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    tokenizer.padding_side = "right"
    return outs


def math_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    records: list[dict[str, str]],
    settings: EvalSettings,
) -> tuple[float, list[str]]:
    prompts = [math_prompt(r["question"]) for r in records]
    outs = greedy(model, tokenizer, prompts, settings.math_max_new_tokens, settings.batch_size)
    hits = [extract_final_number(o) == extract_final_number(r["answer"]) for o, r in zip(outs, records, strict=True)]
    return sum(hits) / len(hits), outs


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    data_dir: Path,
    seed: int,
    settings: EvalSettings,
) -> dict:
    heldout = load_domain_texts(data_dir, "heldout", seed, math_chat_fraction=0.0)
    ppl = {d: perplexity(model, tokenizer, t, settings.batch_size) for d, t in heldout.items()}
    math_recs = read_jsonl(data_dir / "math_heldout.jsonl")[: settings.n_math]
    acc, math_outs = math_accuracy(model, tokenizer, math_recs, settings)
    samples: dict[str, list[tuple[str, str]]] = {}
    for domain, prompts in (
        ("general", list(settings.general_prompts)),
        ("math", [math_prompt(r["question"]) for r in math_recs[:3]]),
        ("code", list(settings.code_prompts)),
    ):
        outs = (
            math_outs[:3]
            if domain == "math"
            else greedy(model, tokenizer, prompts, settings.sample_max_new_tokens, settings.batch_size)
        )
        samples[domain] = list(zip(prompts, outs, strict=True))
    return {"perplexity": ppl, "math_accuracy": acc, "samples": samples}


# --------------------------------------------------------------------------------------------
# Saving / report
# --------------------------------------------------------------------------------------------


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> int:
    """Write model + tokenizer; float32 unless the weights would exceed 20 MB. Returns bytes on disk."""
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params * 4 > 20e6:
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    patch_tokenizer_config(out)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def patch_tokenizer_config(out: Path) -> None:
    """Name the generic fast tokenizer class so transformers 4.x (which lacks v5's
    ``TokenizersBackend``) loads the same ``tokenizer.json``; v5 treats it as an alias."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # safetensors is written 0600; make the shipped files world-readable for packaging.
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o644)


def render_report(
    settings: Settings,
    seed: int,
    final_loss: float,
    results: dict,
    train_seconds: float,
    n_params: int,
    size_bytes: int,
) -> str:
    lines = [
        "# plugmoe demo backbone",
        "",
        "A tiny Llama trained from scratch on the synthetic corpus in `demo/data`",
        "(~85% general text, ~10% math, ~5% code by tokens; train splits only).",
        "",
        "## Rebuild",
        "",
        "```bash",
        "python -m demo.corpus --out demo/data --seed 0",
        f"python -m demo.train_backbone --data demo/data --out demo/model --seed {seed}",
        "```",
        "",
        "## Setup",
        "",
        f"- parameters: {n_params:,} (float32), files on disk: {size_bytes / 1e6:.1f} MB",
        f"- training time: {train_seconds / 60:.1f} min on {settings.train.threads} CPU threads",
        f"- final train loss (mean of last {settings.train.log_every} steps): {final_loss:.4f}",
        "",
        "```python",
        *(f"{k} = {v!r}" for k, v in asdict(settings).items()),
        "```",
        "",
        "## Heldout perplexity",
        "",
        "| domain | perplexity |",
        "|---|---|",
        *(f"| {d} | {p:.3f} |" for d, p in results["perplexity"].items()),
        "",
        f"Greedy math accuracy on the first {settings.eval.n_math} `math_heldout` problems "
        f"(prompt `Question: {{q}}\\nAnswer:`, number after `####` vs gold): "
        f"**{results['math_accuracy']:.0%}**",
        "",
        "## Greedy samples",
        "",
    ]
    for domain, pairs in results["samples"].items():
        lines.append(f"### {domain}")
        lines.append("")
        for prompt, out in pairs:
            lines += ["```text", f"{prompt}[[{out}]]", "```", ""]
    lines.append("Model output is shown inside `[[...]]`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the plugmoe demo backbone on CPU.")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override TrainSettings.steps (smoke tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    settings = Settings()
    if args.steps is not None:
        settings.train.steps = args.steps
    torch.set_num_threads(settings.train.threads)
    seed_everything(args.seed)

    texts = load_domain_texts(args.data, "train", args.seed, settings.train.math_chat_fraction)
    tokenizer = train_tokenizer([t for ts in texts.values() for t in ts], settings.tokenizer)
    batches = build_batches(texts, tokenizer, settings.train, args.seed)
    seed_everything(args.seed)
    model = make_model(tokenizer, settings.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, parameters {n_params:,}, batches {tuple(batches.shape)}")

    start = time.time()
    final_loss = train(model, batches, settings.train)
    train_seconds = time.time() - start
    print(f"training done in {train_seconds / 60:.1f} min, final loss {final_loss:.4f}")

    size_bytes = save(model, tokenizer, args.out)
    results = evaluate(model, tokenizer, args.data, args.seed, settings.eval)
    report = render_report(settings, args.seed, final_loss, results, train_seconds, n_params, size_bytes)
    (args.out / "TRAINING.md").write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
