"""Every setting of the experts tooling, typed, in one place; `plugmoe train-expert|distill|eval` derive their
flags, defaults and help from these dataclasses (as `plugmoe serve` does from server.settings.Settings).

A field becomes `--field-name`; its `help` metadata is the flag's help; a field without a default is a
required flag (or a positional argument, with `positional=True`); `bool` fields are switches;
`tuple[int, ...]` fields take comma-separated values, `list[str]` fields take several values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from moe.adapters.file import (
    DOMAIN_SAMPLE_MAX_BYTES,
    DOMAIN_SAMPLE_MAX_TEXTS,
    PROBE_CHECKERS,
    PROBE_MAX_ITEMS,
    PROBE_MAX_NEW_TOKENS,
)
from moe.admission.report import CALIBRATION_PASSAGES, LIMIT_HELP, LIMIT_NAMES, MAX_TOKENS, AdmissionLimits

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def option(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with help text for its flag (a positional argument when `positional`)."""
    metadata = {"help": help, "positional": positional}
    if default is dataclasses.MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def admission_limit(name: str, context: str = "", off: bool = False) -> Any:
    """A flag for one of the admission limits: its default and help are AdmissionLimits' (the server's)."""
    help_text = context + LIMIT_HELP[name] + ("; negative: off" if off else "")
    return option(getattr(AdmissionLimits, name), help=help_text)


SAMPLE_BOUND = (
    f"at most {DOMAIN_SAMPLE_MAX_TEXTS} texts and {DOMAIN_SAMPLE_MAX_BYTES // 1024} KiB: the file format's bound"
)


@dataclass
class CommonOptions:
    """Flags every subcommand takes."""

    model: str = option(help="HF model directory or hub id of the backbone")
    device: str = option("auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    seed: int = option(0, help="seed for every random choice (repeatable runs)")
    threads: int | None = option(None, help="torch CPU threads (default: torch's)")
    template: str = option(DEFAULT_TEMPLATE, help="question/answer template with {question} and {answer} (answer last)")
    extractor: str = option("gsm8k", help="final-answer extractor: gsm8k (#### N), last-number, or module:function")
    log_level: str = option("INFO", help="logging level")


# --- train-expert -----------------------------------------------------------------------------------------


@dataclass
class TrainInputs:
    """What `train-expert` reads and writes."""

    data: str = option(help='JSONL of {"text"} or {"question", "answer"} records')
    name: str = option(help="the expert's name (and routing id)")
    out: str = option(help="path of the .safetensors expert file to write")
    heldout: str | None = option(None, help="held-out JSONL (default: a seeded split of --data)")
    heldout_fraction: float = option(0.1, help="share of --data held out when no --heldout is given")
    heldout_limit: int = option(200, help="at most this many held-out records")
    calibration: str | None = option(
        None,
        help="base-domain text: the gate rejects it and thresholds cap its false positives "
        "(default: the general calibration text)",
    )
    negatives: list[str] | None = option(
        None, help="other domains' text the gate must also reject (default: the calibration text alone)"
    )
    with_experts: str | None = option(
        None,
        help="directory of experts already plugged beside this one: their domain samples (or examples) are "
        "negatives for the gate, and its thresholds are repaired beside them as the server's admission would",
    )
    adapter_from: str | None = option(
        None,
        help="an expert file whose adapter to keep: stage 1 is skipped and only the gate is trained (its rank "
        "and layers are used)",
    )
    sample_from: str | None = option(
        None,
        help="JSONL (or text) to draw the domain sample stored in the file from (default: the held-out split; "
        "pass the training data when --heldout is an evaluation set)",
    )
    description: str = option("", help="what the expert is for (stored in the file)")
    examples: list[str] | None = option(None, help="3-5 example prompts to store (default: held-out)")


@dataclass
class TrainConfig:
    """Settings of one `train-expert` run (defaults fit the demo backbone on 2 CPU cores)."""

    name: str = option(help="the expert's name (and routing id)")
    rank: int = option(16, help="adapter rank")
    layers: tuple[int, ...] | None = option(None, help="comma-separated layer indices (default: every layer)")
    steps: int = option(300, help="stage 1 optimiser steps")
    batch_size: int = option(16, help="stage 1 sequences per step")
    max_tokens: int = option(128, help="tokens per sequence (longer ones are cut)")
    lr: float = option(2e-3, help="stage 1 peak learning rate (warmup, then cosine to 10%%)")
    weight_decay: float = option(0.0, help="stage 1 AdamW weight decay")
    warmup_steps: int = option(20, help="stage 1 linear warmup steps")
    grad_clip: float = option(1.0, help="stage 1 gradient norm clip")
    eval_every: int = option(25, help="score the held-out split every this many steps; the best step is kept")
    eval_examples: int = option(64, help="held-out examples scored at each evaluation")
    max_new_tokens: int = option(96, help="greedy generation length for behavioural validation (QA)")
    gate_steps: int = option(100, help="stage 2 Adam steps per layer key")
    gate_lr: float = option(0.05, help="stage 2 learning rate")
    gate_temperature: float = option(20.0, help="tau in the key's classifier sigmoid(tau * (cos - b))")
    gate_max_tokens: int = option(12_000, help="captured tokens per class and layer")
    threshold_rule: Literal["cap", "max"] = option(
        "cap", help="cap: at most --fp-cap of negative decisions pass; max: highest negative score + margin"
    )
    fp_cap: float = option(1e-3, help="at most this share of negative (token, layer) decisions may pass a gate")
    threshold_margin: float = option(0.0, help="'max' rule: threshold = highest negative score + margin")
    threshold_holdout: float = option(
        0.5, help="share of the calibration texts kept out of key training; the thresholds hold the cap on them too"
    )
    threshold_max_tokens: int = option(
        24_000, help="held-out calibration tokens per layer the thresholds are fitted on (more: a tighter fit)"
    )
    sample_size: int = option(
        DOMAIN_SAMPLE_MAX_TEXTS, help=f"texts in the domain sample stored in the file ({SAMPLE_BOUND})"
    )
    max_false_positive_rate: float = admission_limit(
        "max_false_positive_rate", "with --with-experts, the repair beside them holds the server's "
    )
    max_steal_rate: float = admission_limit(
        "max_steal_rate", "with --with-experts, the repair beside them holds the server's "
    )
    balance_steps: int = option(50, help="loss-free balancing batches")
    balance_rate: float = option(1e-3, help="loss-free balancing step u in offset += u * sign(target - load)")
    balance_batch: int = option(16, help="sequences per balancing batch")
    seed: int = option(0, help="seed for every random choice")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 0 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(
                f"rank {self.rank}, steps {self.steps}, batch size {self.batch_size} and eval_every "
                f"{self.eval_every} must be positive (steps may be 0)"
            )
        if not 0.0 <= self.fp_cap < 1.0:
            raise ValueError(f"fp_cap must be in [0, 1), got {self.fp_cap}")
        if not 0.0 <= self.threshold_holdout < 1.0 or self.threshold_max_tokens < 0:
            raise ValueError(
                f"threshold_holdout must be in [0, 1) and threshold_max_tokens >= 0, got {self.threshold_holdout} "
                f"and {self.threshold_max_tokens}"
            )
        if not 0 <= self.sample_size <= DOMAIN_SAMPLE_MAX_TEXTS:
            raise ValueError(
                f"sample_size must be in [0, {DOMAIN_SAMPLE_MAX_TEXTS}] ({SAMPLE_BOUND}), got {self.sample_size}"
            )
        if self.threshold_rule not in ("cap", "max"):
            raise ValueError(f"threshold rule {self.threshold_rule!r} is not 'cap' or 'max'")


# the stage 2 settings of TrainConfig: what `import-lora` takes (it trains the gate only)
GATE_FIELDS = (
    "max_tokens",
    "eval_examples",
    "gate_steps",
    "gate_lr",
    "gate_temperature",
    "gate_max_tokens",
    "threshold_rule",
    "fp_cap",
    "threshold_margin",
    "threshold_holdout",
    "threshold_max_tokens",
    "sample_size",
    "max_false_positive_rate",
    "max_steal_rate",
    "balance_steps",
    "balance_rate",
    "balance_batch",
)


# --- import-lora ------------------------------------------------------------------------------------------


@dataclass
class ImportLoraOptions:
    """What `import-lora` reads beyond `train-expert`'s inputs (--data, --name, --out ...)."""

    adapter_dir: str = option(
        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)", positional=True
    )
    mlp_only: bool = option(
        False,
        help="keep the adapter's MLP pairs only, dropping its attention pairs after a warning; the expert then "
        "differs from the adapter as trained (attention LoRAs are served: this is rarely wanted)",
    )
    ignore_base_model: bool = option(
        False, help="import although the adapter's base_model_name_or_path names another model (shapes still checked)"
    )


# --- distill ----------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """`distill`: sample k solutions per problem, keep the correct ones."""

    problems: str = option(help='JSONL of {"question", "answer"} with gold final answers')
    out: str = option(help="question/answer JSONL to write")
    k: int = option(4, help="samples per problem")
    temperature: float = option(0.7, help="sampling temperature")
    top_p: float = option(1.0, help="nucleus sampling mass")
    max_new_tokens: int = option(128, help="tokens per sample")
    max_per_problem: int | None = option(None, help="distinct solutions kept per problem (default: k)")
    limit: int | None = option(None, help="use the first N problems")
    batch_size: int = option(64, help="samples decoded together")
    report: str | None = option(None, help="also write the report as JSON here")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")


# --- eval -------------------------------------------------------------------------------------------------


@dataclass
class EvalInputs:
    """What `eval` reads and writes."""

    experts: str = option(help="directory of .safetensors experts to plug")
    data: list[str] = option(help="domains as NAME=FILE; a domain's target is the expert of the same name")
    out: str | None = option(None, help="JSON report path")
    ceiling: str | None = option(
        None,
        help="JSON of whole-backbone fine-tune ceilings per domain (python -m demo.ceiling --out): adds each domain's "
        "perplexity gain as a share of its ceiling's (experts.ceiling)",
    )


@dataclass
class EvalConfig:
    """Settings of one `eval` run."""

    base: str = option("general", help="the base domain (its target route is base)")
    limit: int = option(200, help="sequences per domain for perplexity and routing")
    behaviour_limit: int = option(100, help="QA records per domain for accuracy")
    max_tokens: int = option(256, help="tokens per sequence (longer ones are cut)")
    max_new_tokens: int = option(96, help="greedy generation length for accuracy")
    batch_size: int = option(16, help="sequences per forward")
    greedy_prompt_words: int = option(8, help="base domain: prompt = the first words of a text")
    greedy_new_tokens: int = option(32, help="base domain: tokens compared with the backbone's continuation")
    router: str = option(
        "context",
        help="what routes: 'context' (the server's default: the set's context router fitted first, as `plugmoe "
        "serve` does after a plug; the gates where an expert lacks domain texts) or 'gates' (the experts' cosine "
        "gates alone)",
    )

    def __post_init__(self) -> None:
        if self.router not in ("gates", "context"):
            raise ValueError(f"router must be 'gates' or 'context', got {self.router!r}")


# --- add-sample and admit -------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    """`add-sample`: store a sample of an expert's own domain in its file (what admission measures it on)."""

    expert: str = option(help="the expert file")
    data: str = option(help="JSONL (or text) of the expert's domain to draw from (not an evaluation set)")
    out: str = option(help="the file to write (may be --expert itself)")
    size: int = option(DOMAIN_SAMPLE_MAX_TEXTS, help=f"texts in the sample ({SAMPLE_BOUND})")
    seed: int = option(0, help="seed of the draw")
    template: str = option(DEFAULT_TEMPLATE, help="question/answer template with {question} and {answer}")
    log_level: str = option("INFO", help="logging level")

    def __post_init__(self) -> None:
        if not 1 <= self.size <= DOMAIN_SAMPLE_MAX_TEXTS:
            raise ValueError(f"size must be in [1, {DOMAIN_SAMPLE_MAX_TEXTS}] ({SAMPLE_BOUND}), got {self.size}")


@dataclass
class ProbeConfig:
    """`add-probe`: store a behavioural probe in an expert's file (prompts with reference answers, which admission
    decodes greedily beside every later candidate: moe.admission.behaviour)."""

    expert: str = option(help="the expert file")
    data: str = option(help="JSONL of question/answer records of the expert's domain (not an evaluation set)")
    out: str = option(help="the file to write (may be --expert itself)")
    size: int = option(PROBE_MAX_ITEMS, help=f"prompts in the probe (at most {PROBE_MAX_ITEMS}: the format's bound)")
    checker: str = option(
        "final-answer",
        help="final-answer: the number after `####` equals the reference's; regex: --pattern's first group "
        "(or whole match) equals the reference answer",
    )
    pattern: str | None = option(None, help="the regex checker's pattern")
    max_new_tokens: int = option(64, help=f"greedy tokens per prompt (at most {PROBE_MAX_NEW_TOKENS})")
    seed: int = option(0, help="seed of the draw")
    template: str = option(DEFAULT_TEMPLATE, help="question/answer template with {question} and {answer}")
    log_level: str = option("INFO", help="logging level")

    def __post_init__(self) -> None:
        if not 1 <= self.size <= PROBE_MAX_ITEMS:
            raise ValueError(f"size must be in [1, {PROBE_MAX_ITEMS}] (the file format's bound), got {self.size}")
        if self.checker not in PROBE_CHECKERS:
            raise ValueError(f"checker must be one of {list(PROBE_CHECKERS)}, got {self.checker!r}")
        if (self.checker == "regex") != (self.pattern is not None):
            raise ValueError("--pattern goes with --checker regex, and only with it")


@dataclass
class AdmitInputs:
    """What `admit` reads and writes."""

    experts: str = option(help="directory of the experts plugged now")
    candidate: str = option(help="the expert file to plug beside them")
    calibration: str | None = option(
        None, help="base-domain text, one passage per line (default: the general calibration text)"
    )
    out: str | None = option(None, help="write the candidate as it would be plugged (repaired thresholds) here")
    report: str | None = option(None, help="JSON report path")


@dataclass
class AdmitConfig:
    """`admit`: the server's admission, offline; limits as the server's flags (negative: off)."""

    admission: Literal["repair", "refuse"] = option("repair", help="repair: raise the candidate's thresholds")
    max_false_positive_rate: float = admission_limit("max_false_positive_rate", off=True)
    max_steal_rate: float = admission_limit("max_steal_rate", off=True)
    max_base_ppl_increase: float = admission_limit("max_base_ppl_increase", off=True)
    max_domain_ppl_increase: float = admission_limit("max_domain_ppl_increase", off=True)
    max_accuracy_drop: float = admission_limit("max_accuracy_drop", off=True)
    calibration_limit: int = option(
        CALIBRATION_PASSAGES, help=f"calibration passages used (the server uses {CALIBRATION_PASSAGES})"
    )
    max_tokens: int = option(MAX_TOKENS, help=f"tokens per text (the server uses {MAX_TOKENS})")
    router: str = option(
        "context",
        help="what will route: 'context' (the server's default: the set's context router, as `plugmoe serve`: the "
        "limits are measured under it and a repair raises the candidate's floors in it) or 'gates' (the cosine "
        "gates alone)",
    )

    def __post_init__(self) -> None:
        if self.router not in ("gates", "context"):
            raise ValueError(f"router must be 'gates' or 'context', got {self.router!r}")

    def limits(self) -> AdmissionLimits:
        return AdmissionLimits.from_flags(self.admission, **{name: getattr(self, name) for name in LIMIT_NAMES})


# --- deriving flags ---------------------------------------------------------------------------------------


def _flag_kind(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """(argparse type, extra add_argument kwargs) for a resolved field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_kind(inner[0])
    if origin is Literal:
        return str, {"choices": args}
    if origin is list:
        return args[0], {"nargs": "+"}
    if origin is tuple:
        return _int_tuple, {}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_flags(
    parser: argparse.ArgumentParser,
    *configs: type,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One flag per field of each dataclass, in order; a name already added by an earlier one is skipped, and
    with `only`, every field not named there; fields in `exclude` are never flags (the tool has no use for
    them: a flag it would ignore is not offered)."""
    seen = {action.dest for action in parser._actions}
    for config in configs:
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if f.name in seen or f.name in exclude or (only is not None and f.name not in only):
                continue
            seen.add(f.name)
            kind, extra = _flag_kind(hints[f.name])
            if kind is not None:
                extra["type"] = kind
            help_text = f.metadata.get("help", "")
            if f.metadata.get("positional"):
                parser.add_argument(f.name, help=help_text, **extra)
                continue
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else f.default
            parser.add_argument(flag, required=required, default=default, help=help_text, **extra)


def build(config: type, args: argparse.Namespace, **overrides: Any):
    """An instance of `config` from the parsed flags that are its fields (overrides win)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**values, **overrides})
