"""A second demo backbone whose math answers can be measured: `demo/arith/`.

The tiny default backbone (`demo/model`) answers 2.7% of its held-out math problems, too few to see an expert
raise or lower behaviour. This one is trained beside it, on the same general and code text (`demo/data`) and a
math domain of *graded* word problems (`demo/arith/data`): one-step sums and differences of small numbers, the
times table, two-step chains, and groups-minus-some problems. The easy kinds are within a few-million-parameter
model's reach after minutes of CPU training, the hard ones are not, so its greedy accuracy lands in the middle
(room to rise and to fall). Answers use the demo math format (steps, then `#### N`), so `plugmoe eval`,
`plugmoe distill` and the admission probe read them with the GSM8K extractor.

    python -m demo.arith corpus --out demo/arith/data --seed 0
    nice python -m demo.arith train --out demo/arith/model --seed 0

`corpus` writes math_train / math_heldout / math_problems (distillation) / math_probe (an admission probe).
`train` reuses `demo.train_backbone`'s tokenizer, packing, model and loop with the settings below, and writes
`TRAINING.md` (setup, wall time, size, held-out perplexity and greedy accuracy) next to the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from demo import DATA_DIR, DEMO_DIR
from demo.corpus import (
    CONTAINERS,
    ITEMS,
    _cap,
    _person,
    _step,
    _unique,
    extract_final_number,
    format_math,
    math_prompt,
    read_jsonl,
)
from demo.train_backbone import (
    ModelSettings,
    TokenizerSettings,
    TrainSettings,
    build_batches,
    greedy,
    make_model,
    perplexity,
    save,
    seed_everything,
    train,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

ARITH_DIR: Path = DEMO_DIR / "arith"


# --- the graded math domain --------------------------------------------------------------------------------


def _add(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(1, 20)
    verb = rng.choice(("buys", "finds", "gets"))
    s, r = _step(a, "+", b)
    q = f"{name} has {a} {item}. {_cap(pr)} {verb} {b} more. How many {item} does {name} have now?"
    return {"question": q, "answer": f"{name} has {s} {item}.\n#### {r}"}


def _sub(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    other = _person(rng, exclude=name)[0]
    item = rng.choice(ITEMS)
    a = rng.randint(5, 40)
    b = rng.randint(1, a)
    verb = rng.choice((f"gives {b} to {other}", f"loses {b}", f"sells {b}"))
    s, r = _step(a, "-", b)
    q = f"{name} has {a} {item}. {_cap(pr)} {verb}. How many {item} does {name} have now?"
    return {"question": q, "answer": f"{name} has {s} {item} left.\n#### {r}"}


def _times(rng: random.Random) -> dict[str, str]:
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    g, n = rng.randint(2, 9), rng.randint(2, 9)
    s, r = _step(g, "*", n)
    q = f"There are {g} {box} with {n} {item} in each. How many {item} are there in all?"
    return {"question": q, "answer": f"There are {s} {item}.\n#### {r}"}


def _chain(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(1, 20)
    s1, x = _step(a, "+", b)
    c = rng.randint(1, x)
    s2, r = _step(x, "-", c)
    q = (
        f"{name} has {a} {item}. {_cap(pr)} gets {b} more. Then {pr} gives away {c}. "
        f"How many {item} does {name} have now?"
    )
    return {
        "question": q,
        "answer": f"After getting {b} {pr} has {s1}.\nAfter giving {c} away {pr} has {s2}.\n#### {r}",
    }


def _groups(rng: random.Random) -> dict[str, str]:
    name = _person(rng)[0]
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    g, n = rng.randint(2, 9), rng.randint(2, 9)
    s1, total = _step(g, "*", n)
    c = rng.randint(1, total - 1)
    s2, left = _step(total, "-", c)
    q = f"There are {g} {box} with {n} {item} in each. {name} takes {c} {item} out. How many {item} are left?"
    return {
        "question": q,
        "answer": f"There are {s1} {item} in total.\nAfter taking {c} out there are {s2} left.\n#### {left}",
    }


# (kind, weight): the first three are one step, the last two two steps.
KINDS: tuple[tuple[Callable[[random.Random], dict[str, str]], float], ...] = (
    (_add, 0.25),
    (_sub, 0.25),
    (_times, 0.15),
    (_chain, 0.2),
    (_groups, 0.15),
)


def make_problem(rng: random.Random) -> dict[str, str]:
    """One graded word problem `{"question", "answer"}` (answer: steps, then `#### N`)."""
    fns, weights = zip(*KINDS, strict=True)
    return rng.choices(fns, weights=weights)[0](rng)


@dataclass(frozen=True)
class ArithSizes:
    train: int = 12000
    heldout: int = 2500  # a 2-point difference between two routings is outside the noise (see demo/arith/README.md)
    problems: int = 1000  # for `plugmoe distill`
    probe: int = 64  # the admission probe stored in the arith experts' files


def build_arith(seed: int = 0, sizes: ArithSizes | None = None) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits (by question) of the graded domain, drawn in a fixed order so each is reproducible."""
    sizes = sizes or ArithSizes()
    seen: set[str] = set()
    out = {}
    for split in ("train", "heldout", "problems", "probe"):
        out[split] = _unique(
            make_problem, random.Random(f"{seed}/arith/{split}"), getattr(sizes, split), seen, "question"
        )
    return out


def write_arith(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, records in build_arith(seed).items():
        path = out_dir / f"math_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written[split] = path
    return written


# --- the backbone -------------------------------------------------------------------------------------------


@dataclass
class ArithSettings:
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    # Narrower than demo/model (192 wide, 2.2M parameters) so that it trains in ~15 min on one loaded core.
    model: ModelSettings = field(default_factory=lambda: ModelSettings(hidden_size=192, intermediate_size=512))
    # Math problems are ~60 tokens: 128-token rows. Half the tokens are math, so arithmetic gets learnt.
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(
            seq_len=128,
            batch_size=24,
            steps=700,
            mix={"general": 0.45, "math": 0.5, "code": 0.05},
            math_chat_fraction=0.0,
            threads=1,
        )
    )
    n_eval: int = 2500
    max_new_tokens: int = 48
    batch_size: int = 64


def load_texts(data_dir: Path, arith_dir: Path, split: str) -> dict[str, list[str]]:
    """general/code text from the default demo corpus, math from the graded domain."""
    return {
        "general": [r["text"] for r in read_jsonl(data_dir / f"general_{split}.jsonl")],
        "math": [format_math(r) for r in read_jsonl(arith_dir / f"math_{split}.jsonl")],
        "code": [r["text"] for r in read_jsonl(data_dir / f"code_{split}.jsonl")],
    }


def kind_of(question: str) -> str:
    if " gives away " in question:
        return "chain"
    if "takes" in question and "left?" in question:
        return "groups"
    if "in all?" in question:
        return "times"
    return "add" if " more. " in question else "sub"


# --- the research's table -------------------------------------------------------------------------------

# (label, eval report, what the expert was trained on), in the table's order (demo/arith/experts.sh writes them)
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("raw", "raw/eval.json", "raw math text (questions and solutions as separate documents)"),
    ("distilled-qa", "distilled-qa/eval.json", "`plugmoe distill`: its own correct solutions, question/answer"),
    ("distilled-ps", "distilled-ps/eval.json", "the same solutions, problem/solution format (ablation)"),
)
Z95 = 1.959964


def paired_difference(after: str, before: str) -> tuple[float, float]:
    """Mean of (after - before) over the same problems, in points, and its 95% half-width (normal approximation
    of the paired differences: only problems whose answer changed add variance)."""
    diffs = [int(a) - int(b) for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return 100 * mean, 100 * Z95 * (var / n) ** 0.5


def half_width(p: float, n: int) -> float:
    """95% half-width of one accuracy, in points (normal approximation)."""
    return 100 * Z95 * (p * (1 - p) / n) ** 0.5


def render_table(experts_dir: Path) -> str:
    reports = [(label, what, json.loads((experts_dir / path).read_text())) for label, path, what in TABLE_ROWS]
    math_of = {label: next(d for d in r["domains"] if d["domain"] == "math") for label, _, r in reports}
    general_of = {label: next(d for d in r["domains"] if d["domain"] == "general") for label, _, r in reports}
    first = math_of[TABLE_ROWS[0][0]]
    # every run scores the same problems in the same order: compare on the problems all of them scored
    n = min(m["behaviour_examples"] for m in math_of.values())
    off_hits = first["behaviour_hits"]["off"][:n]
    off = off_hits.count("1") / n
    lines = [
        "| expert | trained on | math ppl seq (Δ) | acc pinned | acc seq | acc token | Δacc pinned vs backbone "
        "(95% CI) | Δacc seq (95% CI) | general Δppl token / seq |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| backbone | - | {first['ppl']['off']:.3f} | {off:.1%} | {off:.1%} | {off:.1%} | - | - | - |",
    ]
    for label, what, _ in reports:
        m, g = math_of[label], general_of[label]
        hits = {label: h[:n] for label, h in m["behaviour_hits"].items()}
        assert hits["off"] == off_hits, "every run scores the same problems with the same backbone"
        acc = {label: h.count("1") / n for label, h in hits.items()}
        pin, pin_ci = paired_difference(hits["pin:math"], off_hits)
        seq, seq_ci = paired_difference(hits["sequence"], off_hits)
        lines.append(
            f"| {label} | {what} | {m['ppl']['sequence']:.3f} ({m['ppl_change']['sequence']:+.1%}) "
            f"| {acc['pin:math']:.1%} | {acc['sequence']:.1%} | {acc['token']:.1%} | {pin:+.1f} ± {pin_ci:.1f} "
            f"| {seq:+.1f} ± {seq_ci:.1f} | {g['ppl_change']['token']:+.3%} / {g['ppl_change']['sequence']:+.3%} |"
        )
    lines += [
        "",
        f"The first {n} held-out problems, greedy, `#### N` against the gold answer (math perplexity: each run's "
        f"{', '.join(str(m['sequences']) for m in math_of.values())} records). One accuracy's 95% interval is "
        f"±{half_width(off, n):.1f} points at the backbone's {off:.1%}; a difference between two routings on the same "
        "problems is paired (the ± above: 1.96 standard errors of the per-problem differences).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the graded math splits")
    corpus.add_argument("--out", type=Path, default=ARITH_DIR / "data")
    corpus.add_argument("--seed", type=int, default=0)
    tr = sub.add_parser("train", help="train the backbone and write TRAINING.md")
    tr.add_argument("--data", type=Path, default=DATA_DIR, help="the default demo corpus (general, code)")
    tr.add_argument("--arith", type=Path, default=ARITH_DIR / "data")
    tr.add_argument("--out", type=Path, default=ARITH_DIR / "model")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, help="override the training steps (smoke tests)")
    tr.add_argument("--threads", type=int, default=1)
    table = sub.add_parser("table", help="print the research's table from demo/arith/experts.sh's eval reports")
    table.add_argument("--experts", type=Path, default=ARITH_DIR / "experts")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(render_table(args.experts))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "corpus":
        for path in write_arith(args.out, args.seed).values():
            print(path)
        return
    settings = ArithSettings()
    if args.steps:
        settings.train.steps = args.steps
    settings.train.threads = args.threads
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    texts = load_texts(args.data, args.arith, "train")
    tokenizer = train_tokenizer([t for ts in texts.values() for t in ts], settings.tokenizer)
    batches = build_batches(texts, tokenizer, settings.train, args.seed)
    seed_everything(args.seed)
    model = make_model(tokenizer, settings.model)
    n_params = sum(p.numel() for p in model.parameters())
    started = time.time()
    final_loss = train(model, batches, settings.train)
    seconds = time.time() - started
    size = save(model, tokenizer, args.out)
    held = load_texts(args.data, args.arith, "heldout")
    ppl = {d: perplexity(model, tokenizer, t[:300], 32) for d, t in held.items()}
    recs = read_jsonl(args.arith / "math_heldout.jsonl")[: settings.n_eval]
    outs = greedy(
        model, tokenizer, [math_prompt(r["question"]) for r in recs], settings.max_new_tokens, settings.batch_size
    )
    hits = [extract_final_number(o) == extract_final_number(r["answer"]) for o, r in zip(outs, recs, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    for r, h in zip(recs, hits, strict=True):
        by_kind.setdefault(kind_of(r["question"]), []).append(h)
    lines = [
        "# plugmoe arith backbone (demo/arith/model)",
        "",
        "A tiny Llama trained from scratch on the default demo corpus's general and code text (`demo/data`) and",
        "the graded math problems in `demo/arith/data` (see `demo/arith.py`).",
        "",
        "```bash",
        f"python -m demo.arith corpus --out demo/arith/data --seed {args.seed}",
        f"nice python -m demo.arith train --out demo/arith/model --seed {args.seed} --threads {args.threads}",
        "```",
        "",
        f"- parameters: {n_params:,} (float32), files on disk: {size / 1e6:.1f} MB",
        f"- training: {settings.train.steps} steps in {seconds / 60:.1f} min on {args.threads} CPU threads "
        f"(a shared 2-core machine), final train loss {final_loss:.4f}",
        "",
        "```python",
        *(f"{k} = {v!r}" for k, v in asdict(settings).items()),
        "```",
        "",
        "| held-out domain (first 300 records) | perplexity |",
        "|---|---|",
        *(f"| {d} | {p:.3f} |" for d, p in ppl.items()),
        "",
        f"Greedy accuracy on {len(recs)} `math_heldout` problems (prompt `Question: {{q}}\\nAnswer:`, `#### N` vs "
        f"gold): **{sum(hits) / len(hits):.1%}** ({sum(hits)}/{len(hits)}); by kind: "
        + ", ".join(f"{k} {sum(v) / len(v):.0%} of {len(v)}" for k, v in sorted(by_kind.items())),
        "",
        "Greedy samples (output inside `[[...]]`):",
        "",
    ]
    for r, o in list(zip(recs, outs, strict=True))[:4]:
        lines += ["```text", f"{math_prompt(r['question'])}[[{o}]]", "```", ""]
    (args.out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
