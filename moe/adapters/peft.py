"""A PEFT LoRA adapter directory -> a LoRA expert (moe.adapters.lora), its gate closed: the pure conversion.

    ADAPTER_DIR/adapter_config.json          PEFT's LoraConfig as JSON (peft_type "LORA")
    ADAPTER_DIR/adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                             base_model.model.<module>.lora_B.weight [out, r]
                                             (GPT-2's Conv1D projections keep this layout: fan_in_fan_out
                                             only changes how PEFT merges)

Every LoRA pair on an MLP or attention projection of the backbone's family (moe.model.backbone.FAMILIES: q/k/v/o,
or the fused qkv of GPT-2, GPT-NeoX and Phi-3) becomes the expert's pair for that (layer, target),
scaling = alpha / r (alpha / sqrt(r) with use_rslora), r and alpha per module through rank_pattern /
alpha_pattern with PEFT's own matching rule (the first pattern key k with re.match(rf"(.*\\.)?({k})$", module)
wins). Refused, with a message saying why and what to do: other PEFT types; features the LoRA kind does not
reproduce (DoRA, lora_bias, trained biases, base-rewriting inits such as PiSSA/OLoRA/LoftQ, layer replication,
...); an adapter for another base model or with other shapes; ranks over
the cap (`max_rank`, moe.adapters.file.MAX_RANK); and tensors outside the decoder layers' attention and MLP
projections (embedding or lm_head LoRAs, modules_to_save, trainable tokens, layer norms). `mlp_only` keeps the MLP
pairs alone and drops the rest (attention pairs included), saying so in the report.

The expert comes out gateless: its gate is Expert.closed_gate (thresholds no score passes), so it wins no
token in token or sequence routing and serves only when pinned, until a gate is fitted for it (experts.import_lora
trains one offline; the server never trains). Reads JSON and safetensors only: PEFT itself is not needed.
Two entries: `convert_adapter` (a directory) and `convert_peft` (the config and tensors already read, e.g. from
bytes a server fetched through its own source checks, `parse_adapter`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from torch import nn

from moe.adapters.expert import Expert
from moe.adapters.file import MAX_RANK
from moe.adapters.lora import LoraAdapter, LoraPair
from moe.model.backbone import Family, family_of

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

PREFIX = "base_model.model."
_PAIR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
# LoraConfig fields that change what the adapter computes in ways the LoRA kind does not reproduce
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (a learned magnitude per output column)",
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication (it changes the backbone's layer stack)",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "target_parameters": "LoRA on raw parameters (MoE expert weights)",
    "use_qalora": "QA-LoRA (pools the input)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing among LoRAs",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# init methods that leave the base weights as they are (pissa, olora, corda, lora_ga, loftq rewrite them)
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


class LoraImportError(ValueError):
    """The adapter directory cannot be converted; the message says why and what to do."""


class UnsupportedAdapterError(LoraImportError):
    """The adapter uses a PEFT feature the LoRA expert kind does not reproduce."""


class NonMlpTargetsError(LoraImportError):
    """The adapter also changes modules plugmoe does not serve (outside the attention and MLP projections), or
    outside the MLP blocks when mlp_only was asked for and dropping was refused."""


class AdapterMismatchError(LoraImportError):
    """The adapter was made for another backbone (base model, family, layers or projection shapes)."""


@dataclass
class ImportReport:
    """What the conversion found: per projection its largest rank, the layers, what was dropped, warnings."""

    base_model: str | None
    targets: dict[str, int] = field(default_factory=dict)
    layers: tuple[int, ...] = ()
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class TargetModel(Protocol):
    """What the conversion reads of the model it converts for (moe.model.routed.RoutedModel has it all)."""

    backbone: nn.Module
    target_shapes: dict[str, tuple[int, int]]  # {target: (in, out)}: the MLP's and attention's projections

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the tensors of adapter_model.safetensors)."""
    directory = Path(adapter_dir)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise LoraImportError(
            f"{directory} has no adapter_config.json: pass a PEFT adapter directory (what save_pretrained writes)"
        )
    if not weights_path.is_file():
        hint = (
            " (only adapter_model.bin is there: re-save it with save_pretrained(..., safe_serialization=True))"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise LoraImportError(f"{directory} has no adapter_model.safetensors{hint}")
    config = parse_config(config_path.read_bytes(), str(config_path))
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise LoraImportError(f"{weights_path} cannot be read as safetensors: {e}") from e
    return config, tensors


def parse_config(data: bytes, where: str) -> dict:
    """adapter_config.json's bytes as a dict (`where` names the file in the messages)."""
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraImportError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise LoraImportError(f"{where} is not a JSON object")
    return config


def parse_adapter(config: bytes, weights: bytes, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """read_adapter on the two files' bytes (`where`: the adapter directory, for the messages)."""
    parsed = parse_config(config, f"{where}/{CONFIG_FILE}")
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraImportError(f"{where}/{WEIGHTS_FILE} cannot be read as safetensors: {e}") from e
    return parsed, tensors


def check_config(config: dict, report: ImportReport) -> None:
    """Refuse what the LoRA kind cannot reproduce (the message names it and what to do instead)."""
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can be imported"
        )
    used = [f"{key}: {why}" for key, why in UNSUPPORTED_FIELDS.items() if config.get(key)]
    if used:
        raise UnsupportedAdapterError(
            f"the adapter uses {'; '.join(used)}. plugmoe imports plain LoRA only: retrain without it"
        )
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"bias={config['bias']!r}: the adapter also trained the backbone's biases, which a routed expert "
            "cannot change for its tokens only; retrain with bias='none'"
        )
    init = config.get("init_lora_weights", True)
    if init not in SAFE_INITS:
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} rewrites the base weights, so this adapter only fits its own modified "
            "backbone; convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        report.warnings.append(f"task_type is {config['task_type']!r}, not CAUSAL_LM")


def check_base_model(config: dict, served: str | None, report: ImportReport, ignore: bool) -> None:
    """The adapter's base_model_name_or_path against the served model's name or path. Shapes are checked
    whatever this says; the name is what catches a LoRA for a same-shaped sibling (base vs instruct)."""
    base = config.get("base_model_name_or_path")
    if not base or not served:
        report.warnings.append(
            f"cannot check the base model (adapter: {base or 'not recorded'}, served: {served or 'unknown'}); "
            "only shapes are checked"
        )
        return
    if _same_model(base, served):
        return
    message = f"the adapter was trained on {base!r}, the backbone is {served!r}"
    if not ignore:
        raise AdapterMismatchError(
            f"{message}. A LoRA only fits the weights it was trained on; pass --ignore-base-model if both "
            "name the same model"
        )
    report.warnings.append(f"{message} (--ignore-base-model: shapes are checked, weights are not)")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() and path_b.exists():
        return path_a.resolve() == path_b.resolve()
    return path_a.name == path_b.name  # a hub id against a local copy named after it


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key that matches the module's name ends, in dict order."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def summarise(modules: Sequence[str]) -> str:
    """'self_attn.q_proj (layers [0, 1]), lm_head' from full module names."""
    by_suffix: dict[str, set[int]] = {}
    for module in modules:
        found = re.match(r".*?\.(\d+)\.(.+)$", module)
        if found:
            by_suffix.setdefault(found.group(2), set()).add(int(found.group(1)))
        else:
            by_suffix.setdefault(module, set())
    return ", ".join(
        f"{suffix} (layers {sorted(layers)})" if layers else suffix for suffix, layers in sorted(by_suffix.items())
    )


def convert_adapter(
    adapter_dir: str | Path,
    model: TargetModel,
    name: str,
    mlp_only: bool = False,
    served: str | None = None,
    ignore_base_model: bool = False,
    seed: int = 0,
    max_rank: int = MAX_RANK,
) -> tuple[Expert, ImportReport]:
    """convert_peft on the adapter directory's two files."""
    config, tensors = read_adapter(adapter_dir)
    return convert_peft(
        config, tensors, model, name, str(adapter_dir), mlp_only, served, ignore_base_model, seed, max_rank
    )


def convert_peft(
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    model: TargetModel,
    name: str,
    source: str,
    mlp_only: bool = False,
    served: str | None = None,
    ignore_base_model: bool = False,
    seed: int = 0,
    max_rank: int = MAX_RANK,
) -> tuple[Expert, ImportReport]:
    """A LoRA expert from a PEFT adapter's config and tensors, for `model`'s backbone, its gate closed (it
    wins nothing until a gate is fitted, or it is pinned). `source` (the adapter directory) goes in its
    provenance. Raises a LoraImportError subclass naming what does not fit."""
    report = ImportReport(base_model=config.get("base_model_name_or_path"))
    check_config(config, report)
    check_base_model(config, served, report, ignore_base_model)
    backbone = model.backbone
    family = family_of(backbone)
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class != type(backbone).__name__:
        report.warnings.append(f"the adapter was made on a {base_class}, the backbone is a {type(backbone).__name__}")

    # a target module: <layers>.<i>.<mlp>.<projection> (target `projection`) or
    # <layers>.<i>.<attention>.<projection> (target `<attention>.<projection>`, moe.model.backbone.Family)
    served = "|".join(
        [
            *(rf"{re.escape(family.mlp)}\.{re.escape(p)}" for p in family.projections),
            *map(re.escape, family.attention_targets),
        ]
    )
    target_module = re.compile(rf"^{re.escape(family.layers)}\.(\d+)\.({served})$")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    other: set[str] = set()
    for key, tensor in tensors.items():
        module = key.removeprefix(PREFIX)
        pair = _PAIR_KEY.match(module)
        target = target_module.match(pair.group("module")) if pair else None
        if target is not None:
            found.setdefault((int(target.group(1)), target.group(2).removeprefix(f"{family.mlp}.")), {})[
                pair.group("side")
            ] = tensor
            continue
        owner = pair.group("module") if pair else re.sub(r"\.(lora_\w+|base_layer|modules_to_save)(\..*)?$", "", module)
        owner = re.sub(r"\.(weight|bias|token_adapter\..*)$", "", owner)
        if target_module.match(owner):
            raise UnsupportedAdapterError(
                f"tensor {key!r} on a projection plugmoe serves is not a plain LoRA pair (lora_A/lora_B weights: "
                "a lora_embedding, a trained bias, a DoRA magnitude?); plugmoe imports plain LoRA only"
            )
        other.add(owner)
    if not found:
        raise LoraImportError(
            f"the adapter has no LoRA on the attention or MLP projections {list(family.targets)} of this "
            f"{backbone.config.model_type} backbone (module names like "
            f"{family.layers}.0.{family.mlp}.{family.projections[0]}); it adapts "
            f"{summarise(sorted(other)) or 'nothing'}: it was made for another model family"
        )
    if other and not mlp_only:
        raise NonMlpTargetsError(unserved_message(sorted(other), family))
    if mlp_only:  # the MLP pairs alone: attention pairs and anything unserved dropped
        attention = sorted({(layer, p) for layer, p in found if p not in family.projections})
        for layer, p in attention:
            del found[(layer, p)]
        report.dropped = sorted([*(f"{family.layers}.{layer}.{p}" for layer, p in attention), *other])
        if report.dropped:
            report.warnings.append(
                f"--mlp-only: dropping {summarise(report.dropped)}; the expert will not reproduce the adapter as "
                "trained. Measure the effect with `plugmoe eval` (pinned and token-routed perplexity per domain)"
            )
    if not found:
        raise LoraImportError(f"--mlp-only: the adapter has no LoRA on the MLP projections {list(family.projections)}")
    layers = tuple(sorted({layer for layer, _ in found}))
    if layers[-1] >= model.num_layers:
        raise AdapterMismatchError(
            f"the adapter adapts layers up to {layers[-1]}; the backbone has {model.num_layers} layers"
        )
    pairs = {
        p: _pair(config, family, p, {layer: sides for (layer, q), sides in found.items() if q == p}, layers, model)
        for p in family.targets
        if any(q == p for _, q in found)
    }
    too_big = {p: pair.rank for p, pair in pairs.items() if pair.rank > max_rank}
    if too_big:
        raise UnsupportedAdapterError(
            f"the adapter's rank on {too_big} is over the cap of {max_rank} (the server's --max-expert-rank)"
        )
    report.layers, report.targets = layers, {p: pair.rank for p, pair in pairs.items()}
    gate = Expert.closed_gate(len(layers), model.hidden_size, torch.Generator().manual_seed(seed))
    expert = Expert(name=name, layers=layers, adapter=LoraAdapter(pairs), **gate)
    keep = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "layers_to_transform")
    expert.metadata = {
        "provenance": {
            "source": "peft",
            "adapter_dir": source,
            "peft_version": config.get("peft_version"),
            "base_model_name_or_path": report.base_model,
            "adapter_config": {k: config.get(k) for k in keep},
            "dropped": report.dropped,
            "warnings": report.warnings,
        }
    }
    for warning in report.warnings:
        logger.warning("%s", warning)
    return expert, report


def _pair(
    config: dict,
    family: Family,
    projection: str,
    entries: dict[int, dict[str, torch.Tensor]],
    layers: tuple[int, ...],
    model: TargetModel,
) -> LoraPair:
    """One projection's pairs over the expert's layers (zero where the adapter skips a layer)."""
    d_in, d_out = model.target_shapes[projection]
    rank = 0
    for layer, sides in entries.items():
        where = _module_name(family, layer, projection)
        if set(sides) != {"A", "B"}:
            raise LoraImportError(f"{where} has lora_{next(iter(sides))} but not its pair")
        a, b = sides["A"], sides["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair")
        if (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise AdapterMismatchError(
                f"{where}: the LoRA maps {a.shape[1]} -> {b.shape[0]}, the backbone's {projection} maps "
                f"{d_in} -> {d_out}: the adapter was made for another model"
            )
        r_config = pattern_value(config.get("rank_pattern") or {}, where, config.get("r"))
        if r_config is not None and int(r_config) != a.shape[0]:
            raise LoraImportError(f"{where}: the tensors have rank {a.shape[0]}, the config says {r_config}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraImportError(f"{where}: NaN or infinity in the LoRA weights")
        rank = max(rank, int(a.shape[0]))
    big_a = torch.zeros(len(layers), rank, d_in)
    big_b = torch.zeros(len(layers), d_out, rank)
    scaling = torch.zeros(len(layers))
    for i, layer in enumerate(layers):
        if layer not in entries:
            continue  # zero A, B and scaling: no change to this projection on this layer (exact)
        a, b = entries[layer]["A"].float(), entries[layer]["B"].float()
        r = a.shape[0]
        where = _module_name(family, layer, projection)
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, where, config.get("lora_alpha", 8)))
        big_a[i, :r], big_b[i, :, :r] = a, b
        scaling[i] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraPair(big_a, big_b, scaling)


def _module_name(family: Family, layer: int, target: str) -> str:
    """The backbone's module name of a target on a layer (what PEFT's patterns match)."""
    block = "" if target not in family.projections else f"{family.mlp}."
    return f"{family.layers}.{layer}.{block}{target}"


def unserved_message(modules: Sequence[str], family: Family) -> str:
    """Why an adapter that also adapts `modules` (outside the decoder layers' attention and MLP projections)
    is refused."""
    return (
        f"the adapter changes modules plugmoe does not serve: {summarise(modules)}. A routed LoRA expert adapts "
        f"the decoder layers' attention and MLP projections ({list(family.targets)} on each layer), not "
        "embeddings, lm_head, norms or modules_to_save: retrain with target_modules among those"
    )
