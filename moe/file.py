"""The expert file: one `.safetensors` per expert, validated whole before anything is plugged.

Tensors (Lx = number of layers the expert covers, H = hidden size, r = rank):

    down        [Lx, H, r]   float32 | bfloat16 | float16
    up          [Lx, r, H]   same dtype as down
    keys        [Lx, H]      gate key per layer, same dtype as down
    offsets     [Lx]         float32, balancing bias per layer
    thresholds  [Lx]         float32, eligibility threshold per layer

`__metadata__` (safetensors allows only strings; structured fields are JSON):

    format "plugmoe-expert", format_version "1", name, description, examples (JSON list), kind
    "bottleneck", rank, layers (JSON list), backbone (JSON fingerprint: family, hidden_size, num_layers,
    vocab_size, weights_hash), provenance (JSON), evals (JSON), created (ISO 8601), and optionally
    domain_sample (JSON list of texts from the expert's own domain, at most DOMAIN_SAMPLE_MAX_TEXTS texts and
    DOMAIN_SAMPLE_MAX_BYTES UTF-8 bytes: what the admission report measures this domain on when another expert
    is plugged beside it, and what other experts' gates train against; see moe.composition)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe.backbone import BackboneFingerprint
from moe.errors import (
    BackboneMismatchError,
    DomainSampleError,
    InvalidMetadataError,
    MissingTensorError,
    NonFiniteTensorError,
    NotAnExpertFileError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnreadableExpertFileError,
    UnsupportedExpertKindError,
    UnsupportedFormatVersionError,
)
from moe.expert import ADAPTER_KIND, Expert, InvalidExpertNameError, check_name

FORMAT = "plugmoe-expert"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 24
_WEIGHT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_REQUIRED_METADATA = ("name", "kind", "rank", "layers", "backbone")
DOMAIN_SAMPLE_MAX_TEXTS = 64
DOMAIN_SAMPLE_MAX_BYTES = 64 * 1024


def bound_domain_sample(
    texts: Sequence[str], max_texts: int = DOMAIN_SAMPLE_MAX_TEXTS, max_bytes: int = DOMAIN_SAMPLE_MAX_BYTES
) -> list[str]:
    """The first texts that fit the format's bounds, in order; a text longer than a quarter of the byte budget
    is cut there (at a character boundary), so one long text cannot crowd out the others."""
    out: list[str] = []
    used = 0
    for text in texts:
        text = text.encode("utf-8")[: max_bytes // 4].decode("utf-8", errors="ignore")
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if len(out) >= max_texts or used + size > max_bytes:
            break
        out.append(text)
        used += size
    return out


def _shapes(layers: int, hidden: int, rank: int) -> dict[str, tuple[int, ...]]:
    return {
        "down": (layers, hidden, rank),
        "up": (layers, rank, hidden),
        "keys": (layers, hidden),
        "offsets": (layers,),
        "thresholds": (layers,),
    }


class ExpertFile:
    """Reading, validating and writing expert files."""

    @staticmethod
    def to_bytes(expert: Expert, backbone: BackboneFingerprint) -> bytes:
        weight_dtype = expert.down.dtype if expert.down.dtype in _WEIGHT_DTYPES.values() else torch.float32
        tensors = {
            "down": expert.down.detach().to("cpu", weight_dtype).contiguous(),
            "up": expert.up.detach().to("cpu", weight_dtype).contiguous(),
            "keys": expert.keys.detach().to("cpu", weight_dtype).contiguous(),
            "offsets": expert.offsets.detach().to("cpu", torch.float32).contiguous(),
            "thresholds": expert.thresholds.detach().to("cpu", torch.float32).contiguous(),
        }
        meta = expert.metadata
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "name": expert.name,
            "description": expert.description,
            "examples": json.dumps(list(expert.examples)),
            "kind": ADAPTER_KIND,
            "rank": str(expert.rank),
            "layers": json.dumps(list(expert.layers)),
            "backbone": json.dumps(backbone.to_dict()),
            "provenance": json.dumps(meta.get("provenance", {})),
            "evals": json.dumps(meta.get("evals", {})),
            "created": meta.get("created") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if meta.get("domain_sample"):
            metadata["domain_sample"] = json.dumps(_checked_domain_sample(list(meta["domain_sample"])))
        return save_safetensors(tensors, metadata=metadata)

    @staticmethod
    def save(expert: Expert, path: str | Path, backbone: BackboneFingerprint) -> Path:
        """Write atomically: a temp file in the same directory, then rename over the target."""
        return write_atomically(Path(path), ExpertFile.to_bytes(expert, backbone))

    @staticmethod
    def read_header(data: bytes) -> tuple[dict[str, str], dict[str, dict]]:
        """(metadata, {tensor name: {dtype, shape, data_offsets}}) from a safetensors blob, without tensors."""
        if len(data) < 8:
            raise UnreadableExpertFileError(
                f"file is {len(data)} bytes, too short for safetensors; upload the .safetensors expert file"
            )
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
            raise UnreadableExpertFileError(
                "not a safetensors file (bad header length): the file is truncated or in another format"
            )
        try:
            header = json.loads(data[8 : 8 + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnreadableExpertFileError(f"safetensors header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise UnreadableExpertFileError("safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        return metadata, header

    @staticmethod
    def load(
        source: str | Path | bytes,
        backbone: BackboneFingerprint | None = None,
        name: str | None = None,
    ) -> Expert:
        """Validate everything, then build the Expert. `name` overrides the file's name.

        Raises a subclass of ExpertFileError naming what is wrong; nothing is plugged here.
        """
        data = _read_source(source)
        metadata, infos = ExpertFile.read_header(data)
        meta = _parse_metadata(metadata)
        try:
            final_name = check_name(name or meta["name"])
        except InvalidExpertNameError as e:
            raise InvalidMetadataError(str(e)) from e
        fp = meta["backbone"]
        if backbone is not None:
            mismatches = backbone.mismatches(fp)
            if mismatches:
                raise BackboneMismatchError(
                    f"expert {final_name!r} was trained for another backbone ({'; '.join(mismatches)}, "
                    "served != file). Train it for the served model, or serve the model it was trained on."
                )
        layers, rank, hidden = meta["layers"], meta["rank"], fp.hidden_size
        expected = _shapes(len(layers), hidden, rank)
        _check_tensor_infos(infos, expected)
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types for corrupt payloads
            raise UnreadableExpertFileError(f"tensor data could not be read: {e}") from e
        for tensor_name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise NonFiniteTensorError(
                    f"tensor {tensor_name!r} contains NaN or infinity; retrain or re-export the expert"
                )
        return Expert(
            name=final_name,
            layers=tuple(layers),
            description=meta["description"],
            examples=tuple(meta["examples"]),
            metadata={
                "backbone": fp.to_dict(),
                "provenance": meta["provenance"],
                "evals": meta["evals"],
                "created": meta["created"],
                "format_version": FORMAT_VERSION,
                "kind": ADAPTER_KIND,
                "size_bytes": len(data),
                "domain_sample": meta["domain_sample"],
            },
            **tensors,
        )


def write_atomically(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a server run as another user must read them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_source(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise UnreadableExpertFileError(f"cannot read expert file {str(source)!r}: {e.strerror or e}") from e


def _parse_metadata(metadata: dict[str, str]) -> dict:
    if metadata.get("format") != FORMAT:
        raise NotAnExpertFileError(
            f"this safetensors file is not a plugmoe expert (metadata 'format' is {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); make expert files with `plugmoe train-expert`"
        )
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise UnsupportedFormatVersionError(
            f"expert file format version {version!r} is not supported (this plugmoe reads version "
            f"{FORMAT_VERSION}); upgrade plugmoe or re-export the expert"
        )
    missing = [k for k in _REQUIRED_METADATA if not metadata.get(k)]
    if missing:
        raise InvalidMetadataError(f"expert file metadata lacks {missing}; re-export the expert")
    if metadata["kind"] != ADAPTER_KIND:
        raise UnsupportedExpertKindError(
            f"adapter kind {metadata['kind']!r} is not supported; this plugmoe runs {ADAPTER_KIND!r}"
        )
    try:
        rank = int(metadata["rank"])
        layers = json.loads(metadata["layers"])
        fp = BackboneFingerprint(**json.loads(metadata["backbone"]))
        examples = json.loads(metadata.get("examples") or "[]")
        provenance = json.loads(metadata.get("provenance") or "{}")
        evals = json.loads(metadata.get("evals") or "{}")
    except (ValueError, TypeError) as e:
        raise InvalidMetadataError(f"expert file metadata is malformed: {e}") from e
    try:
        domain_sample = json.loads(metadata.get("domain_sample") or "[]")
    except ValueError as e:
        raise DomainSampleError(f"metadata 'domain_sample' is not valid JSON: {e}; re-export the expert") from e
    if rank < 1 or not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise InvalidMetadataError(
            f"expert file metadata has rank {rank} and layers {layers}: rank must be >= 1 and layers a "
            "non-empty list of layer indices"
        )
    if len(set(layers)) != len(layers) or max(layers) >= fp.num_layers:
        raise InvalidMetadataError(f"layers {layers} must be distinct and below the backbone's {fp.num_layers} layers")
    if not isinstance(examples, list) or not all(isinstance(x, str) for x in examples):
        raise InvalidMetadataError("metadata 'examples' must be a JSON list of strings")
    return {
        "domain_sample": _checked_domain_sample(domain_sample),
        "name": metadata["name"],
        "description": metadata.get("description", ""),
        "examples": examples,
        "rank": rank,
        "layers": layers,
        "backbone": fp,
        "provenance": provenance,
        "evals": evals,
        "created": metadata.get("created", ""),
    }


def _checked_domain_sample(sample: object) -> list[str]:
    """The sample itself, or DomainSampleError saying which bound it breaks (on load and on save alike)."""
    if not isinstance(sample, list) or not all(isinstance(text, str) for text in sample):
        raise DomainSampleError("metadata 'domain_sample' must be a JSON list of strings; re-export the expert")
    size = sum(len(text.encode("utf-8")) for text in sample)
    if len(sample) > DOMAIN_SAMPLE_MAX_TEXTS or size > DOMAIN_SAMPLE_MAX_BYTES:
        raise DomainSampleError(
            f"metadata 'domain_sample' holds {len(sample)} texts of {size} bytes; the format allows at most "
            f"{DOMAIN_SAMPLE_MAX_TEXTS} texts and {DOMAIN_SAMPLE_MAX_BYTES} bytes (`plugmoe add-sample` writes "
            "one within the bounds)"
        )
    return sample


def _check_tensor_infos(infos: dict[str, dict], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(infos))
    if missing:
        raise MissingTensorError(f"expert file lacks tensors {missing}; it needs {sorted(expected)}")
    extra = sorted(set(infos) - set(expected))
    if extra:
        raise UnexpectedTensorError(f"expert file has tensors {extra} that the format does not define")
    weight_dtype = infos["down"].get("dtype")
    for tensor_name, shape in expected.items():
        info = infos[tensor_name]
        got = tuple(info.get("shape", ()))
        if got != shape:
            raise TensorShapeError(
                f"tensor {tensor_name!r} has shape {list(got)}, expected {list(shape)} from the metadata's "
                "layers and rank and the backbone's hidden size"
            )
        dtype = info.get("dtype")
        if tensor_name in ("offsets", "thresholds"):
            if dtype != "F32":
                raise TensorDtypeError(f"tensor {tensor_name!r} has dtype {dtype}, expected F32")
        elif dtype not in _WEIGHT_DTYPES or dtype != weight_dtype:
            raise TensorDtypeError(
                f"tensor {tensor_name!r} has dtype {dtype}; down, up and keys must share one of "
                f"{sorted(_WEIGHT_DTYPES)}"
            )
