"""The frozen backbone: loading, where each decoder layer keeps its MLP block, and a fingerprint.

plugmoe never edits backbone weights. It loads any `AutoModelForCausalLM`, freezes it (no gradients,
eval mode), and finds each decoder layer's MLP block through one small table of per-family paths.
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

# model_type -> (attribute path from the CausalLM to its list of decoder layers, MLP attribute of a layer).
# A family costs one row here when its MLP block maps [..., hidden] -> [..., hidden] and returns a tensor.
MLP_PATHS: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "mlp"),
    "llama": ("model.layers", "mlp"),
    "qwen2": ("model.layers", "mlp"),
    "qwen3": ("model.layers", "mlp"),
    "mistral": ("model.layers", "mlp"),
    "gemma": ("model.layers", "mlp"),
    "gemma2": ("model.layers", "mlp"),
    "phi3": ("model.layers", "mlp"),
    "olmo": ("model.layers", "mlp"),
    "olmo2": ("model.layers", "mlp"),
    "smollm3": ("model.layers", "mlp"),
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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of decoder layers, found through MLP_PATHS."""
    family = model.config.model_type
    if family not in MLP_PATHS:
        raise UnsupportedBackboneError(
            f"model family {family!r} is not supported; supported families: {sorted(MLP_PATHS)}. "
            "Add a row to moe.backbone.MLP_PATHS if its MLP block maps hidden -> hidden."
        )
    layers_path, _ = MLP_PATHS[family]
    return _resolve(model, layers_path)  # type: ignore[return-value]


def mlp_attribute(model: nn.Module) -> str:
    return MLP_PATHS[model.config.model_type][1]


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
