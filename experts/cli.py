"""The experts' command-line tools: `train-expert`, `import-lora`, `distill`, `eval`, `add-sample`, `add-probe` and
`admit`.

`add_subcommands(subparsers)` registers them on an argparse subparsers object (the `plugmoe` console
script does so); `python -m experts <subcommand> ...` runs them without the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from experts.config import (
    GATE_FIELDS,
    AdmitConfig,
    AdmitInputs,
    CommonOptions,
    DistillConfig,
    EvalConfig,
    EvalInputs,
    ImportLoraOptions,
    ProbeConfig,
    SampleConfig,
    TrainConfig,
    TrainInputs,
    add_flags,
    build,
)
from experts.data import (
    DataFormatError,
    Template,
    get_extractor,
    gsm8k_answer,
    load_examples,
    read_records,
    split_heldout,
    to_examples,
    write_jsonl,
)
from moe.adapters.file import ExpertFile
from moe.admission.report import CALIBRATION_PASSAGES, DEFAULT_CALIBRATION
from moe.admission.samples import domain_sample

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration_general.txt"


def _seed(seed: int, threads: int | None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def _load_model(path: str, device: str, dtype: str = "float32"):
    from moe import RoutedModel, load_backbone

    backbone, tokenizer = load_backbone(path, device=device, dtype=dtype)
    return RoutedModel(backbone), tokenizer


def default_calibration(model_path: str | Path) -> Path:
    """The general calibration text: beside the model, in its sibling `data/` (the demo's layout), or the
    copy shipped with plugmoe (`moe/admission/calibration.txt`, what the server's admission report uses)."""
    model_path = Path(model_path)
    candidates = [
        model_path / CALIBRATION_NAME,
        model_path.parent / "data" / CALIBRATION_NAME,
        DEFAULT_CALIBRATION,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataFormatError(
        f"no general calibration text found (looked for {[str(c) for c in candidates]}); pass --calibration FILE"
    )


def load_experts_dir(directory: str | Path, fingerprint) -> list:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFormatError(f"experts directory {str(directory)!r} does not exist")
    return [ExpertFile.load(path, fingerprint) for path in sorted(directory.glob("*.safetensors"))]


def _parser(subparsers: argparse._SubParsersAction, name: str, help: str, *configs: type):  # noqa: A002
    parser = subparsers.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_flags(parser, CommonOptions, *configs)
    return parser


# --- train-expert ---------------------------------------------------------------------------------------


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = _parser(
        subparsers, "train-expert", "train an expert (adapter, gate, thresholds, offsets)", TrainInputs, TrainConfig
    )
    parser.set_defaults(func=run_train)


@dataclass
class DomainData:
    """What `train-expert` and `import-lora` read for one expert: its domain's examples, the base-domain
    calibration text, other domains' negatives, and the experts plugged beside it with their examples."""

    train: list
    heldout: list
    calibration: list
    calibration_heldout: list
    negatives: list
    others: list
    other_examples: list
    provenance: dict
    sample: list  # the texts the file's domain sample is drawn from (empty: the held-out examples)
    repair_calibration: list[str]  # base-domain texts the thresholds are repaired on beside `others`


def read_domain_data(args: argparse.Namespace, model, tool: str) -> DomainData:
    template, extractor = Template(args.template), get_extractor(args.extractor)
    records = read_records(args.data)
    if args.heldout:
        train_records, held_records = records, read_records(args.heldout)
    else:
        train_records, held_records = split_heldout(records, args.heldout_fraction, args.heldout_limit, args.seed)
    train, heldout = to_examples(train_records, template, extractor), to_examples(held_records, template, extractor)
    calibration_file = args.calibration or str(default_calibration(args.model))
    cal_train, cal_held = split_heldout(read_records(calibration_file), 0.2, 200, args.seed)
    negative_files = args.negatives or []
    negative_records = [r for f in negative_files for r in read_records(f)]
    random.Random(f"{args.seed}/negatives").shuffle(negative_records)  # files mixed: token caps take from all
    sample = to_examples(read_records(args.sample_from), template, extractor) if args.sample_from else []
    calibration_records = read_records(calibration_file)[:CALIBRATION_PASSAGES]  # the passages admission reads
    repair_calibration = [(e.prompt or "") + e.target for e in to_examples(calibration_records, template, extractor)]
    others, other_examples = [], []
    if args.with_experts:
        others = load_experts_dir(args.with_experts, model.fingerprint)
        for other in others:
            other_examples.extend(load_examples_from_expert(other, template, extractor))
    provenance = {
        "tool": tool,
        "args": _args_dict(args),
        "model": args.model,
        "data": args.data,
        "heldout": args.heldout,
        "calibration": calibration_file,
        "negatives": negative_files,
        "with_experts": [o.name for o in others],
        "template": args.template,
        "extractor": args.extractor,
        "seed": args.seed,
        "train_records": len(train),
        "heldout_records": len(heldout),
        "device": str(model.device),
    }
    return DomainData(
        train,
        heldout,
        to_examples(cal_train, template, extractor),
        to_examples(cal_held, template, extractor),
        to_examples(negative_records, template, extractor),
        others,
        other_examples,
        provenance,
        sample,
        repair_calibration,
    )


def run_train(args: argparse.Namespace) -> int:
    from experts.train import TrainConfig, train_expert

    _setup(args)
    started = time.perf_counter()
    extractor = get_extractor(args.extractor)
    model, tokenizer = _load_model(args.model, args.device)
    data = read_domain_data(args, model, "plugmoe train-expert")
    adapter = ExpertFile.load(args.adapter_from, model.fingerprint) if args.adapter_from else None
    overrides = {"rank": adapter.rank, "layers": adapter.layers} if adapter is not None else {}
    config = build(TrainConfig, args, **overrides)
    expert = train_expert(
        model,
        tokenizer,
        config,
        data.train,
        data.heldout,
        data.calibration,
        data.calibration_heldout,
        extractor,
        data.negatives,
        data.others,
        data.other_examples,
        description=args.description,
        examples=args.examples or (),
        provenance=data.provenance,
        sample=data.sample,
        repair_calibration=data.repair_calibration,
        adapter=adapter,
    )
    ExpertFile.save(expert, args.out, model.fingerprint)
    evals = expert.metadata["evals"]
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - started:.0f} s")
    if adapter is None:
        print(f"stage 1 best step {evals['stage1']['best_step']}: {evals['stage1']['best']}")
    else:
        print(f"stage 1 skipped: the adapter of {args.adapter_from}")
    print(
        f"gate recall per layer {[round(r, 3) for r in evals['gate']['recall_per_layer']]}, false positives "
        f"{[round(f, 5) for f in evals['gate']['false_positive_per_layer']]}"
    )
    held = evals["gate"]["heldout_false_positive_per_layer"]
    print(f"held-out calibration false positives {[round(f, 5) for f in held]}")
    if evals.get("admission"):
        print(_admission_summary(evals["admission"]))
    print(f"routing check (sequence mode): {evals['routing']}")
    return 0


def load_examples_from_expert(expert, template: Template, extractor) -> list:
    """Another expert's domain sample (or, for a file without one, its example prompts), as text examples:
    negatives for this expert's gate."""
    texts, _ = domain_sample(expert)
    return to_examples([{"text": text} for text in texts], template, extractor)


def _admission_summary(report: dict) -> str:
    lines = []
    for check in report["domains"]:
        lines.append(
            f"  {check['domain']:12s} {check['sample']:18s} ppl {check['ppl_before']:.4f} -> {check['ppl_after']:.4f} "
            f"({check['ppl_change']:+.3%}); takes per layer {[round(r, 5) for r in check['take_rates']]}"
        )
    repair = report.get("repair")
    if repair and repair.get("raised") == "floors":
        lines.append(
            f"  repair: its floors in the context router {_rounded(repair['floors_before'])} -> "
            f"{_rounded(repair['floors_after'])} in {repair['rounds']} rounds; own recall per layer "
            f"{_rounded(repair['own_recall_before'])} -> {_rounded(repair['own_recall_after'])}"
        )
    elif repair:
        lines.append(
            f"  repair: thresholds {[round(t, 4) for t in repair['thresholds_before']]} -> "
            f"{[round(t, 4) for t in repair['thresholds_after']]} in {repair['rounds']} rounds; own recall per layer "
            f"{_rounded(repair['own_recall_before'])} -> {_rounded(repair['own_recall_after'])}"
        )
    routing = report.get("context_routing")
    if routing:
        line = (
            f"  context router ({routing['routed_by']}): own recall sequence {routing['sequence_recall']:.1%}, "
            f"token {routing['token_recall']:.1%} (on its own sample, fitted on it: an upper bound)"
        )
        oracle = routing.get("sequence_oracle")
        if oracle:
            line += f"; sequence-mode oracle gap {oracle['oracle_gap']:+.2%}"
        lines.append(line)
    for probe in report.get("behaviour") or []:
        whose = "own probe (its gain)" if probe["own"] else f"probe (limit -{probe['limit_points']:g} points)"
        lines.append(
            f"  {probe['expert']:12s} {whose:24s} {probe['mode']:8s} accuracy {probe['accuracy_before']:.1%} -> "
            f"{probe['accuracy_after']:.1%} ({probe['change_points']:+.1f} points, {probe['prompts']} prompts)"
        )
    lines.extend(f"  note: {note}" for note in report.get("notes") or [])
    verdict = "admitted" if report["admitted"] else "REFUSED: " + "; ".join(report["problems"])
    return f"admission beside the plugged experts ({report['mode']}): {verdict}\n" + "\n".join(lines)


def _rounded(values: list[float] | None) -> list[float] | None:
    return None if values is None else [round(v, 3) for v in values]


# --- import-lora ----------------------------------------------------------------------------------------


def add_import_lora(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-lora",
        help="import a PEFT LoRA adapter as a routed expert (trains its gate only)",
        description="Convert a PEFT LoRA adapter directory into a plugmoe LoRA expert for the backbone, then "
        "train only its gate (keys, thresholds under the false-positive cap, loss-free offsets) from example "
        "text of its domain (--data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(parser, ImportLoraOptions, CommonOptions, TrainInputs, exclude=("adapter_from",))  # the adapter is PEFT's
    add_flags(parser, TrainConfig, only=GATE_FIELDS)
    parser.set_defaults(func=run_import_lora)


def run_import_lora(args: argparse.Namespace) -> int:
    from experts.import_lora import LoraImportError, convert_adapter, import_lora

    _setup(args)
    started = time.perf_counter()
    model, tokenizer = _load_model(args.model, args.device)
    try:
        expert, report = convert_adapter(
            args.adapter_dir,
            model,
            args.name,
            mlp_only=args.mlp_only,
            served=args.model,
            ignore_base_model=args.ignore_base_model,
            seed=args.seed,
        )
    except LoraImportError as e:
        print(f"error: {e}")
        return 2
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.dropped:
        print(
            "measure what dropping them costs (domain perplexity pinned and token-routed, against the adapter in "
            f"PEFT as trained): plugmoe eval --model {args.model} --experts {Path(args.out).parent} "
            f"--data {args.name}={args.heldout or args.data} general=GENERAL_TEXT.jsonl --base general"
        )
    print(f"converted {args.adapter_dir}: ranks {report.targets} on layers {list(report.layers)}")
    data = read_domain_data(args, model, "plugmoe import-lora")
    config = build(TrainConfig, args)
    expert = import_lora(
        model,
        tokenizer,
        expert,
        config,
        data.train,
        data.heldout,
        data.calibration,
        data.calibration_heldout,
        data.negatives,
        data.others,
        data.other_examples,
        description=args.description,
        examples=args.examples or (),
        provenance={**data.provenance, "converted": {"targets": report.targets, "layers": list(report.layers)}},
        sample=data.sample,
        repair_calibration=data.repair_calibration,
    )
    ExpertFile.save(expert, args.out, model.fingerprint)
    evals = expert.metadata["evals"]
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - started:.0f} s")
    print(
        f"gate recall per layer {[round(r, 3) for r in evals['gate']['recall_per_layer']]}, false positives "
        f"{[round(f, 5) for f in evals['gate']['false_positive_per_layer']]}"
    )
    print(f"routing check (sequence mode): {evals['routing']}")
    print(f"held-out loss: {evals['import']}")
    return 0


# --- distill --------------------------------------------------------------------------------------------


def add_distill(subparsers: argparse._SubParsersAction) -> None:
    parser = _parser(
        subparsers, "distill", "self-distil: keep the model's own correct solutions as QA data", DistillConfig
    )
    parser.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from experts.distill import distill

    _setup(args)
    started = time.perf_counter()
    problems = [r for r in read_records(args.problems) if "question" in r][: args.limit]
    if not problems:
        raise DataFormatError(f"{args.problems} holds no question/answer records")
    model, tokenizer = _load_model(args.model, args.device)
    config = build(DistillConfig, args)
    records, report = distill(
        model,
        tokenizer,
        problems,
        k=config.k,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        template=Template(args.template),
        extractor=get_extractor(args.extractor),
        seed=args.seed,
        max_per_problem=config.max_per_problem,
        batch_size=config.batch_size,
    )
    write_jsonl(args.out, records)
    seconds = time.perf_counter() - started
    print(f"{report.summary()}; wrote {args.out} in {seconds:.0f} s")
    if args.report:
        summary = {
            **vars(report),
            "solve_rate": report.solve_rate,
            "seconds": round(seconds, 1),
            "k": args.k,
            "temperature": args.temperature,
            "seed": args.seed,
        }
        Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# --- eval -----------------------------------------------------------------------------------------------


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = _parser(
        subparsers, "eval", "evaluate plugged experts per domain; markdown table and JSON", EvalInputs, EvalConfig
    )
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from experts.evaluate import evaluate, render_table

    _setup(args)
    template, extractor = Template(args.template), get_extractor(args.extractor)
    domains = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DataFormatError(f"--data takes NAME=FILE, got {item!r}")
        domains[name] = load_examples(path, template, extractor)
    model, tokenizer = _load_model(args.model, args.device)
    for expert in load_experts_dir(args.experts, model.fingerprint):
        model.plug(expert)
    config = build(EvalConfig, args)
    report = evaluate(model, tokenizer, domains, config, extractor, fit_router=config.router == "context")
    report["args"] = _args_dict(args)
    table = render_table(report)
    if args.ceiling:
        from experts.ceiling import ceiling_shares, load_ceilings, render_ceiling_table

        report["ceiling"] = ceiling_shares(report, load_ceilings(args.ceiling))
        table += "\n\n" + render_ceiling_table(report["ceiling"])
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**report, "table": table}, indent=2) + "\n")
    return 0


# --- add-sample and admit ------------------------------------------------------------------------------


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    help_text = "store a sample of an expert's own domain in its file (what admission measures the domain on)"
    parser = subparsers.add_parser(
        "add-sample", help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_flags(parser, SampleConfig)
    parser.set_defaults(func=run_add_sample, threads=None)


def run_add_sample(args: argparse.Namespace) -> int:
    from experts.train import domain_sample_texts
    from moe import BackboneFingerprint

    _setup(args)
    config = build(SampleConfig, args)
    expert = ExpertFile.load(config.expert)
    examples = to_examples(read_records(config.data), Template(config.template), get_extractor("gsm8k"))
    texts = domain_sample_texts(examples, config.size, config.seed)
    expert.metadata["domain_sample"] = texts
    ExpertFile.save(expert, config.out, BackboneFingerprint(**expert.metadata["backbone"]))
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(f"wrote {config.out}: {expert.name!r} with a domain sample of {len(texts)} texts ({size} bytes)")
    return 0


def add_probe(subparsers: argparse._SubParsersAction) -> None:
    help_text = "store a behavioural probe in an expert's file (prompts and reference answers admission checks)"
    parser = subparsers.add_parser(
        "add-probe", help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_flags(parser, ProbeConfig)
    parser.set_defaults(func=run_add_probe, threads=None)


def run_add_probe(args: argparse.Namespace) -> int:
    from moe import BackboneFingerprint
    from moe.admission.behaviour import BehaviourProbe

    _setup(args)
    config = build(ProbeConfig, args)
    expert = ExpertFile.load(config.expert)
    records = to_examples(read_records(config.data), Template(config.template), gsm8k_answer)
    examples = [e for e in records if e.is_qa and (e.gold is not None or config.checker == "regex")]
    if not examples:
        raise DataFormatError(f"{config.data} holds no question/answer records to probe with")
    picked = sorted(random.Random(f"{config.seed}/probe").sample(range(len(examples)), min(config.size, len(examples))))
    # final-answer: the reference is the gold `#### N` (extracted); regex: the record's whole answer
    answers = [examples[i].gold if config.checker == "final-answer" else examples[i].target.strip() for i in picked]
    probe = BehaviourProbe(
        prompts=tuple(examples[i].prompt for i in picked),
        answers=tuple(a or "" for a in answers),
        checker=config.checker,
        pattern=config.pattern,
        max_new_tokens=config.max_new_tokens,
    )
    expert.metadata["probe"] = probe.to_dict()
    ExpertFile.save(expert, config.out, BackboneFingerprint(**expert.metadata["backbone"]))
    print(f"wrote {config.out}: {expert.name!r} with a probe of {len(picked)} prompts ({config.checker})")
    return 0


def add_admit(subparsers: argparse._SubParsersAction) -> None:
    parser = _parser(
        subparsers,
        "admit",
        "the server's admission offline: a candidate beside a directory of experts (report, repair, verdict)",
        AdmitInputs,
        AdmitConfig,
    )
    parser.set_defaults(func=run_admit)


def run_admit(args: argparse.Namespace) -> int:
    """Exit status 0: admitted (the file at --out is what the server would plug); 3: refused."""
    from moe.admission.report import admit, load_calibration_texts

    _setup(args)
    config = build(AdmitConfig, args)
    model, tokenizer = _load_model(args.model, args.device)
    for expert in load_experts_dir(args.experts, model.fingerprint):
        model.plug(expert)
    candidate = ExpertFile.load(args.candidate, model.fingerprint)
    calibration = load_calibration_texts(args.calibration or default_calibration(args.model), config.calibration_limit)
    fitter = None
    if config.router == "context":  # as the server with --router context: the plugged set's router, published
        from moe.admission.router_fit import ContextRouterFitter

        fitter = ContextRouterFitter(model, tokenizer)
        fitter.offer(model.plugged.experts)
    result = admit(
        model, tokenizer, candidate, calibration, config.limits(), max_tokens=config.max_tokens, router_fitter=fitter
    )
    report = result.report.to_dict()
    print(_admission_summary(report))
    print(f"({report['seconds']:.1f} s)")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.out and result.admitted:
        ExpertFile.save(result.expert, args.out, model.fingerprint)
        print(f"wrote {args.out}")
    return 0 if result.admitted else 3


# --- wiring ---------------------------------------------------------------------------------------------


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _seed(args.seed, args.threads)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    add_train(subparsers)
    add_import_lora(subparsers)
    add_distill(subparsers)
    add_eval(subparsers)
    add_sample(subparsers)
    add_probe(subparsers)
    add_admit(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experts", description="train, distil and evaluate experts")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
