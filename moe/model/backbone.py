"""The frozen backbone: loading, where each decoder layer keeps its attention and MLP blocks, and a fingerprint.

plugmoe never edits backbone weights. It loads any `AutoModelForCausalLM`, freezes it (no gradients,
eval mode), and finds each decoder layer's attention and MLP blocks, and the projections inside them, through
one small table of per-family paths (FAMILIES).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from moe.errors import UnsupportedBackboneError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks, and the projections inside them (what a LoRA expert targets).

    layers       attribute path from the CausalLM to its list of decoder layers
    mlp          the MLP block's attribute on a decoder layer; the block maps [..., hidden] -> [..., hidden]
    projections  the MLP block's projection attributes, input side first; the last maps inner -> hidden
    attention    the attention block's attribute on a decoder layer (called with the hidden states first)
    attention_projections  its projection attributes, input side first (q, k, v or a fused qkv read hidden);
                 the last (o) maps the heads' output -> hidden
    conv1d       the projections are transformers' Conv1D (weight [in, out]; PEFT's fan_in_fan_out), not nn.Linear

    A LoRA target is named by its path from the block that holds it: an MLP projection by its attribute
    (`down_proj`, as expert files always named them), an attention projection by its path from the decoder
    layer (`self_attn.q_proj`; GPT-2's `attn.c_proj` is not its MLP's `c_proj`). `targets` lists both.
    """

    layers: str
    mlp: str
    projections: tuple[str, ...]
    attention: str
    attention_projections: tuple[str, ...]
    conv1d: bool = False

    @property
    def attention_targets(self) -> tuple[str, ...]:
        """The attention projections as LoRA targets: `<attention>.<projection>`."""
        return tuple(f"{self.attention}.{p}" for p in self.attention_projections)

    @property
    def targets(self) -> tuple[str, ...]:
        """Every projection a LoRA expert may adapt: the MLP's, then the attention's."""
        return self.projections + self.attention_targets

    def writes_hidden(self, target: str) -> bool:
        """The target's output is the hidden size (the block's last projection); the others read it."""
        return target in (self.projections[-1], self.attention_targets[-1])


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_LIKE = Family("model.layers", "mlp", ("gate_proj", "up_proj", "down_proj"), "self_attn", _QKVO)

# model_type -> Family. A family costs one row here when its MLP block maps [..., hidden] -> [..., hidden],
# returns a tensor and calls its projections as modules, and its attention block takes the hidden states first
# and calls its projections as modules.
FAMILIES: dict[str, Family] = {
    "gpt2": Family("transformer.h", "mlp", ("c_fc", "c_proj"), "attn", ("c_attn", "c_proj"), conv1d=True),  # qkv fused
    "gpt_neox": Family(
        "gpt_neox.layers", "mlp", ("dense_h_to_4h", "dense_4h_to_h"), "attention", ("query_key_value", "dense")
    ),
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    # gate and up fused (hidden -> 2 * inner); q, k and v fused
    "phi3": Family("model.layers", "mlp", ("gate_up_proj", "down_proj"), "self_attn", ("qkv_proj", "o_proj")),
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class BackboneFingerprint:
    """What an expert file must match to be plugged into a backbone."""

    family: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    weights_hash: str

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)

    def mismatches(self, other: BackboneFingerprint) -> list[str]:
        """Fields that differ, as 'field: ours != theirs' strings (empty when they match)."""
        ours, theirs = asdict(self), asdict(other)
        return [f"{k}: {ours[k]!r} != {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]


def _resolve(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model: nn.Module) -> Family:
    """The backbone's row in FAMILIES."""
    family = model.config.model_type
    if family not in FAMILIES:
        raise UnsupportedBackboneError(
            f"model family {family!r} is not supported; supported families: {sorted(FAMILIES)}. "
            "Add a row to moe.model.backbone.FAMILIES if its MLP block maps hidden -> hidden."
        )
    return FAMILIES[family]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of decoder layers, found through FAMILIES."""
    return _resolve(model, family_of(model).layers)  # type: ignore[return-value]


def mlp_attribute(model: nn.Module) -> str:
    return family_of(model).mlp


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a projection: nn.Linear, or transformers' Conv1D (weight [in, out]); a wrapper that
    keeps the original as `base_layer` (moe.adapters.lora.RoutedProjection, PEFT) is looked through."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise UnsupportedBackboneError(f"MLP projection of type {type(module).__name__} is not nn.Linear or Conv1D")


def mlp_projection_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{projection: (in, out)} of the first decoder layer's MLP block (every layer's block has the same shapes)."""
    family = family_of(model)
    block = getattr(decoder_layers(model)[0], family.mlp)
    block = getattr(block, "base_layer", block)
    return {name: projection_shape(getattr(block, name)) for name in family.projections}


def attention_projection_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{`<attention>.<projection>`: (in, out)} of the first decoder layer's attention block."""
    family = family_of(model)
    block = getattr(decoder_layers(model)[0], family.attention)
    block = getattr(block, "base_layer", block)
    return {
        f"{family.attention}.{name}": projection_shape(getattr(block, name)) for name in family.attention_projections
    }


def weights_hash(model: nn.Module, samples_per_tensor: int = 1024) -> str:
    """A cheap hash of the weights: names, shapes and a strided sample of each tensor's values.

    Sampled values are rounded to bfloat16 first, so the same checkpoint loaded in float32 or bfloat16
    hashes the same. Reads about `samples_per_tensor` values per tensor, not the whole model.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(name.replace(".base_layer", "").encode())  # same hash before and after wrapping
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module) -> BackboneFingerprint:
    config = model.config
    return BackboneFingerprint(
        family=config.model_type,
        hidden_size=int(config.hidden_size),
        num_layers=len(decoder_layers(model)),
        vocab_size=int(config.vocab_size),
        weights_hash=weights_hash(model),
    )


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode: the backbone's weights are never trained or modified."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backbone(name_or_path: str | Path, device: str = "auto", dtype: str = "float32") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a local directory or a hub id, frozen.

    Returns (model, tokenizer). Hub ids need network access (or a populated HF cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    source = str(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    decoder_layers(model)  # fail early on an unsupported family
    resolved = resolve_device(device)
    model.to(resolved)
    where = str(resolved) if device != "auto" else f"{resolved} (auto)"
    weights = next(model.parameters())
    logger.info(
        "loaded backbone %s (%s) on %s in %s", source, model.config.model_type, where, str(weights.dtype).split(".")[-1]
    )
    return freeze(model), tokenizer
