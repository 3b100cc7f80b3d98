"""The expert file: one `.safetensors` per expert, validated whole before anything is plugged.

Tensors (Lx = number of layers the expert covers, H = hidden size, r = rank), by kind (each kind's module says
which fields and tensors it adds, moe.adapters.kind.AdapterKind; this module asks the kind table, never which
kind it reads):

    bottleneck
    down        [Lx, H, r]   float32 | bfloat16 | float16
    up          [Lx, r, H]   same dtype as down

    lora (moe.adapters.lora), per target projection p of the family's MLP block
    (moe.model.backbone.FAMILIES), r_p its rank:
    lora.<p>.A        [Lx, r_p, in_p]   float32 | bfloat16 | float16 (PEFT's lora_A layout)
    lora.<p>.B        [Lx, out_p, r_p]  same dtype (PEFT's lora_B layout, GPT-2's Conv1D included)
    lora.<p>.scaling  [Lx]              float32: alpha / r (alpha / sqrt(r) with rsLoRA); 0 on a layer where p
                                        has no LoRA (its A and B are zero there), smaller ranks zero-padded

    both kinds
    keys        [Lx, H]      gate key per layer, same dtype as the adapter's weights
    offsets     [Lx]         float32, balancing bias per layer
    thresholds  [Lx]         float32, eligibility threshold per layer

`__metadata__` (safetensors allows only strings; structured fields are JSON):

    format "plugmoe-expert", format_version "1", name, description, examples (JSON list), kind
    ("bottleneck" | "lora"), rank (lora: the largest r_p), layers (JSON list), backbone (JSON fingerprint:
    family, hidden_size, num_layers, vocab_size, weights_hash), provenance (JSON), evals (JSON),
    created (ISO 8601); kind "lora" also: lora (JSON {"targets": {p: {"rank": r_p, "in": in_p, "out": out_p}}});
    optionally domain_sample (JSON list of texts from the expert's own domain, at most DOMAIN_SAMPLE_MAX_TEXTS
    texts and DOMAIN_SAMPLE_MAX_BYTES UTF-8 bytes: what the admission report measures this domain on when
    another expert is plugged beside it, and what other experts' gates train against; see moe.admission.samples);
    optionally probe (JSON {"checker": "final-answer" | "regex", "pattern": regex (regex only), "max_new_tokens":
    n, "items": [{"prompt", "answer"}]}: a behavioural probe, prompts with reference answers that admission runs
    greedily beside every later candidate, see moe.admission.probe; at most PROBE_MAX_ITEMS items of
    PROBE_MAX_BYTES UTF-8 bytes, max_new_tokens at most PROBE_MAX_NEW_TOKENS, a pattern of at most
    PROBE_MAX_PATTERN_CHARS characters that compiles)

Limits (a file over them is refused with MetadataTooLargeError, before any tensor is read): the header is at
most MAX_HEADER_BYTES of JSON; examples at most MAX_EXAMPLES strings of MAX_EXAMPLES_BYTES in all (they are
run through the model by every later admission report); provenance and evals nest at most MAX_JSON_DEPTH
deep. Weights: every value finite and |w| <= MAX_ABS_WEIGHT (1e4): trained adapters and gates are O(1),
and the bound keeps every value finite in each serving dtype (float16's largest is 65504), so a file that
loads can never overflow when it is cast for serving.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe.adapters.expert import Expert, InvalidExpertNameError, check_name
from moe.adapters.kind import KINDS, AdapterKind
from moe.errors import (
    BackboneMismatchError,
    DomainSampleError,
    InvalidMetadataError,
    MetadataTooLargeError,
    MissingTensorError,
    NonFiniteTensorError,
    NotAnExpertFileError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnreadableExpertFileError,
    UnsupportedExpertKindError,
    UnsupportedFormatVersionError,
    WeightMagnitudeError,
)
from moe.model.backbone import BackboneFingerprint

FORMAT = "plugmoe-expert"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of header JSON
MAX_EXAMPLES = 64
MAX_EXAMPLES_BYTES = 64 * 1024  # UTF-8 bytes of all examples together
MAX_JSON_DEPTH = 16  # nesting of provenance and evals
# The largest rank a file may declare (LoRA: its largest target rank). Slot storage pads every plugged expert to
# the largest rank plugged, so one high-rank file grows every slot: the rank is a memory size, bounded here
# before any tensor is read (the server's --max-expert-rank passes its own cap as `max_rank`).
MAX_RANK = 256
MAX_ABS_WEIGHT = 1e4
_WEIGHT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_REQUIRED_METADATA = ("name", "kind", "rank", "layers", "backbone")
DOMAIN_SAMPLE_MAX_TEXTS = 64
DOMAIN_SAMPLE_MAX_BYTES = 64 * 1024
PROBE_CHECKERS = ("final-answer", "regex")
PROBE_MAX_ITEMS = 64
PROBE_MAX_BYTES = 64 * 1024  # prompts and answers together
PROBE_MAX_NEW_TOKENS = 256  # each item is decoded greedily beside every later candidate: its cost is bounded
PROBE_MAX_PATTERN_CHARS = 256


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


def _gate_shapes(layers: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"keys": (layers, hidden), "offsets": (layers,), "thresholds": (layers,)}


def _is_float32_field(kind: AdapterKind, tensor_name: str) -> bool:
    """Compared or scalar values, never weights: always float32 in the file."""
    return tensor_name in ("offsets", "thresholds") or kind.is_float32(tensor_name)


class ExpertFile:
    """Reading, validating and writing expert files."""

    @staticmethod
    def to_bytes(expert: Expert, backbone: BackboneFingerprint) -> bytes:
        """The file's bytes. Raises MetadataTooLargeError for examples the reader would refuse."""
        _check_examples(list(expert.examples))
        kind = KINDS[expert.kind]
        first = next(iter(expert.adapter.tensors().values()))  # the kind's first weight (down, the first LoRA A)
        weight_dtype = first.dtype if first.dtype in _WEIGHT_DTYPES.values() else torch.float32
        tensors = {
            name: tensor.detach()
            .to("cpu", torch.float32 if _is_float32_field(kind, name) else weight_dtype)
            .contiguous()
            for name, tensor in expert.tensors().items()
        }
        meta = expert.metadata
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "name": expert.name,
            "description": expert.description,
            "examples": json.dumps(list(expert.examples)),
            "kind": expert.kind,
            "rank": str(expert.rank),
            "layers": json.dumps(list(expert.layers)),
            "backbone": json.dumps(backbone.to_dict()),
            "provenance": json.dumps(meta.get("provenance", {})),
            "evals": json.dumps(meta.get("evals", {})),
            "created": meta.get("created") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        metadata.update(kind.file_fields(expert.adapter))
        if meta.get("domain_sample"):
            metadata["domain_sample"] = json.dumps(_checked_domain_sample(list(meta["domain_sample"])))
        if meta.get("probe"):
            metadata["probe"] = json.dumps(checked_probe(meta["probe"]))
        return _canonical_header(save_safetensors(tensors, metadata=metadata))  # same expert, same bytes

    @staticmethod
    def save(expert: Expert, path: str | Path, backbone: BackboneFingerprint) -> Path:
        """Write atomically: a temp file in the same directory, then rename over the target."""
        return write_atomically(Path(path), ExpertFile.to_bytes(expert, backbone))

    @staticmethod
    def read_header(data: bytes) -> tuple[dict[str, str], dict[str, dict]]:
        """(metadata, {tensor name: {dtype, shape, data_offsets}}) from a safetensors blob, without tensors.

        Every malformed header is an ExpertFileError subclass naming what is wrong."""
        if len(data) < 8:
            raise UnreadableExpertFileError(
                f"file is {len(data)} bytes, too short for safetensors; upload the .safetensors expert file"
            )
        (header_len,) = struct.unpack("<Q", data[:8])
        if 8 + header_len > len(data):
            raise UnreadableExpertFileError(
                "not a safetensors file (bad header length): the file is truncated or in another format"
            )
        if header_len > MAX_HEADER_BYTES:
            raise MetadataTooLargeError(
                f"the safetensors header is {header_len} bytes; expert files allow at most {MAX_HEADER_BYTES} "
                "(keep examples, provenance and evals short)"
            )
        try:
            header = json.loads(data[8 : 8 + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnreadableExpertFileError(f"safetensors header is not valid JSON: {e}") from e
        except RecursionError:
            raise MetadataTooLargeError("the safetensors header nests too deeply to be an expert file") from None
        if not isinstance(header, dict):
            raise UnreadableExpertFileError("safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidMetadataError(
                "the safetensors `__metadata__` must be a JSON object of string values (structured fields are "
                "JSON strings); re-export the expert"
            )
        for tensor_name, info in header.items():
            if not isinstance(info, dict):
                raise UnreadableExpertFileError(
                    f"safetensors header entry {tensor_name!r} is not a tensor description (an object with "
                    "dtype, shape and data_offsets)"
                )
        return metadata, header

    @staticmethod
    def load(
        source: str | Path | bytes,
        backbone: BackboneFingerprint | None = None,
        name: str | None = None,
        max_rank: int = MAX_RANK,
    ) -> Expert:
        """Validate everything, then build the Expert. `name` overrides the file's name; `max_rank` is the
        largest rank accepted (RankTooLargeError past it).

        Raises a subclass of ExpertFileError naming what is wrong; nothing is plugged here.
        """
        data = _read_source(source)
        metadata, infos = ExpertFile.read_header(data)
        meta = _parse_metadata(metadata, max_rank)
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
        layers, rank, kind = meta["layers"], meta["rank"], KINDS[meta["kind"]]
        expected = {
            **kind.file_shapes(meta["fields"], len(layers), rank, fp),
            **_gate_shapes(len(layers), fp.hidden_size),
        }
        _check_tensor_infos(infos, expected, kind)
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types for corrupt payloads
            raise UnreadableExpertFileError(f"tensor data could not be read: {e}") from e
        for tensor_name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise NonFiniteTensorError(
                    f"tensor {tensor_name!r} contains NaN or infinity; retrain or re-export the expert"
                )
            largest = float(tensor.abs().max()) if tensor.numel() else 0.0
            if largest > MAX_ABS_WEIGHT:
                raise WeightMagnitudeError(
                    f"tensor {tensor_name!r} holds values up to {largest:.3g} in magnitude, over the bound "
                    f"{MAX_ABS_WEIGHT:g} (it would overflow or swamp the model when served); retrain the expert"
                )
        return Expert(
            name=final_name,
            layers=tuple(layers),
            adapter=kind.from_tensors(tensors, meta["fields"]),
            keys=tensors["keys"],
            offsets=tensors["offsets"],
            thresholds=tensors["thresholds"],
            description=meta["description"],
            examples=tuple(meta["examples"]),
            metadata={
                "backbone": fp.to_dict(),
                "provenance": meta["provenance"],
                "evals": meta["evals"],
                "created": meta["created"],
                "format_version": FORMAT_VERSION,
                "kind": meta["kind"],
                "size_bytes": len(data),
                "domain_sample": meta["domain_sample"],
                "probe": meta["probe"],
            },
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


def _parse_metadata(metadata: dict[str, str], max_rank: int = MAX_RANK) -> dict:
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
    if metadata["kind"] not in KINDS:
        raise UnsupportedExpertKindError(
            f"adapter kind {metadata['kind']!r} is not supported; this plugmoe runs {list(KINDS)}"
        )
    kind = KINDS[metadata["kind"]]
    fields = kind.parse_fields(metadata)  # the kind's own metadata (LoRA: its targets)
    rank = _metadata_json(metadata, "rank", None)
    layers = _metadata_json(metadata, "layers", None)
    backbone = _metadata_json(metadata, "backbone", None)
    examples = _metadata_json(metadata, "examples", [])
    provenance = _metadata_json(metadata, "provenance", {})
    evals = _metadata_json(metadata, "evals", {})
    if not _is_int(rank) or rank < 1:
        raise InvalidMetadataError(f"expert file metadata has rank {metadata['rank']!r}: it must be an integer >= 1")
    if rank > max_rank:
        raise InvalidMetadataError(
            f"expert file metadata has rank {rank}, over the cap of {max_rank} (max_rank; the server's "
            "--max-expert-rank): slot storage pads every plugged expert to the largest rank, so the rank is memory "
            "for every expert; retrain at a lower rank or raise the cap"
        )
    if not isinstance(layers, list) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
        raise InvalidMetadataError(
            f"expert file metadata has layers {metadata['layers']!r}: it must be a non-empty JSON list of layer indices"
        )
    fp = _fingerprint(backbone)
    if len(set(layers)) != len(layers) or max(layers) >= fp.num_layers:
        raise InvalidMetadataError(f"layers {layers} must be distinct and below the backbone's {fp.num_layers} layers")
    if not isinstance(examples, list) or not all(isinstance(x, str) for x in examples):
        raise InvalidMetadataError("metadata 'examples' must be a JSON list of strings")
    kind.check_rank(rank, fields)
    _check_examples(examples)
    for field_name, value in (
        ("description", metadata.get("description", "")),
        ("created", metadata.get("created", "")),
        ("examples", examples),
    ):
        _check_utf8(field_name, value)
    for field_name, value in (("provenance", provenance), ("evals", evals)):
        _check_utf8(field_name, value)
        if not isinstance(value, dict):
            raise InvalidMetadataError(f"metadata {field_name!r} must be a JSON object")
        if _depth(value) > MAX_JSON_DEPTH:
            raise MetadataTooLargeError(f"metadata {field_name!r} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        domain_sample = json.loads(metadata.get("domain_sample") or "[]")
    except ValueError as e:
        raise DomainSampleError(f"metadata 'domain_sample' is not valid JSON: {e}; re-export the expert") from e
    except RecursionError:
        raise DomainSampleError("metadata 'domain_sample' nests too deeply; re-export the expert") from None
    probe = _metadata_json(metadata, "probe", None)
    return {
        "probe": None if probe is None else checked_probe(probe),
        "domain_sample": _checked_domain_sample(domain_sample),
        "name": metadata["name"],
        "kind": metadata["kind"],
        "fields": fields,
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
    _check_utf8("domain_sample", sample)
    size = sum(len(text.encode("utf-8")) for text in sample)
    if len(sample) > DOMAIN_SAMPLE_MAX_TEXTS or size > DOMAIN_SAMPLE_MAX_BYTES:
        raise DomainSampleError(
            f"metadata 'domain_sample' holds {len(sample)} texts of {size} bytes; the format allows at most "
            f"{DOMAIN_SAMPLE_MAX_TEXTS} texts and {DOMAIN_SAMPLE_MAX_BYTES} bytes (`plugmoe add-sample` writes "
            "one within the bounds)"
        )
    return sample


def checked_probe(probe: object) -> dict:
    """A behavioural probe as stored (see the module docstring), or InvalidMetadataError naming what is wrong;
    the same check on load and on save, so a file that loads can always be run."""
    fix = "; write it with `plugmoe add-probe`"
    if not isinstance(probe, dict) or not isinstance(probe.get("items"), list) or not probe["items"]:
        raise InvalidMetadataError(f"metadata 'probe' must be a JSON object with a non-empty 'items' list{fix}")
    unknown = sorted(set(probe) - {"checker", "pattern", "max_new_tokens", "items"})
    if unknown:
        raise InvalidMetadataError(f"metadata 'probe' has unknown fields {unknown}{fix}")
    checker, pattern = probe.get("checker", "final-answer"), probe.get("pattern")
    if checker not in PROBE_CHECKERS:
        raise InvalidMetadataError(f"probe checker {checker!r} is not one of {list(PROBE_CHECKERS)}{fix}")
    if checker == "regex":
        if not isinstance(pattern, str) or not 0 < len(pattern) <= PROBE_MAX_PATTERN_CHARS:
            raise InvalidMetadataError(
                f"a 'regex' probe needs a 'pattern' string of 1 to {PROBE_MAX_PATTERN_CHARS} characters{fix}"
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise InvalidMetadataError(f"probe pattern {pattern!r} is not a valid regular expression: {e}") from e
    elif pattern is not None:
        raise InvalidMetadataError(f"probe checker {checker!r} takes no 'pattern' (only 'regex' does){fix}")
    max_new = probe.get("max_new_tokens", 64)
    if not _is_int(max_new) or not 1 <= max_new <= PROBE_MAX_NEW_TOKENS:
        raise InvalidMetadataError(
            f"probe max_new_tokens {max_new!r} must be an integer in [1, {PROBE_MAX_NEW_TOKENS}]"
        )
    items = probe["items"]
    if not all(
        isinstance(i, dict) and set(i) == {"prompt", "answer"} and all(isinstance(v, str) and v for v in i.values())
        for i in items
    ):
        raise InvalidMetadataError(f"each probe item must be {{'prompt': str, 'answer': str}}, both non-empty{fix}")
    _check_utf8("probe", items)
    size = sum(len(i["prompt"].encode("utf-8")) + len(i["answer"].encode("utf-8")) for i in items)
    if len(items) > PROBE_MAX_ITEMS or size > PROBE_MAX_BYTES:
        raise MetadataTooLargeError(
            f"metadata 'probe' holds {len(items)} items of {size} bytes; the format allows at most {PROBE_MAX_ITEMS} "
            f"items of {PROBE_MAX_BYTES} bytes in all (every later admission decodes them)"
        )
    out = {"checker": checker, "max_new_tokens": max_new, "items": [dict(i) for i in items]}
    return out | ({"pattern": pattern} if checker == "regex" else {})


def _check_examples(examples: list[str]) -> None:
    examples_bytes = sum(len(x.encode("utf-8", "surrogatepass")) for x in examples)
    if len(examples) > MAX_EXAMPLES or examples_bytes > MAX_EXAMPLES_BYTES:
        raise MetadataTooLargeError(
            f"metadata 'examples' holds {len(examples)} strings of {examples_bytes} bytes; expert files allow at "
            f"most {MAX_EXAMPLES} examples of {MAX_EXAMPLES_BYTES} bytes in all (a few short prompts of the domain)"
        )


def _metadata_json(metadata: dict[str, str], key: str, default: object) -> object:
    """A structured metadata field, parsed; `default` when the field is absent or empty."""
    text = metadata.get(key)
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidMetadataError(f"expert file metadata {key!r} is malformed JSON: {e}") from e
    except RecursionError:
        raise MetadataTooLargeError(f"expert file metadata {key!r} nests too deeply") from None


def _check_utf8(field_name: str, value: object) -> None:
    """JSON escapes can spell lone surrogates, which no response could carry: refuse them here."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMetadataError(f"metadata {field_name!r} holds text that is not valid Unicode") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fingerprint(value: object) -> BackboneFingerprint:
    fields = {"family": str, "hidden_size": int, "num_layers": int, "vocab_size": int, "weights_hash": str}
    if not isinstance(value, dict) or set(value) != set(fields):
        raise InvalidMetadataError(
            f"expert file metadata 'backbone' must be a JSON object with exactly {sorted(fields)}; re-export the expert"
        )
    for key, kind in fields.items():
        ok = _is_int(value[key]) and value[key] > 0 if kind is int else isinstance(value[key], str)
        if not ok:
            raise InvalidMetadataError(f"expert file metadata 'backbone.{key}' is {value[key]!r}, not a valid {key}")
    return BackboneFingerprint(**value)


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _check_tensor_infos(infos: dict[str, dict], expected: dict[str, tuple[int, ...]], kind: AdapterKind) -> None:
    missing = sorted(set(expected) - set(infos))
    if missing:
        raise MissingTensorError(f"expert file lacks tensors {missing}; it needs {sorted(expected)}")
    extra = sorted(set(infos) - set(expected))
    if extra:
        raise UnexpectedTensorError(f"expert file has tensors {extra} that the format does not define")
    weight_dtype = infos[next(iter(expected))].get("dtype")  # the kind's first weight (down, the first LoRA A)
    for tensor_name, shape in expected.items():
        info = infos[tensor_name]
        raw = info.get("shape")
        if not isinstance(raw, list) or not all(_is_int(d) and d >= 0 for d in raw):
            raise TensorShapeError(
                f"tensor {tensor_name!r} has shape {raw!r} in the header: a shape is a JSON list of sizes"
            )
        got = tuple(raw)
        if got != shape:
            raise TensorShapeError(
                f"tensor {tensor_name!r} has shape {list(got)}, expected {list(shape)} from the metadata's "
                f"layers and {kind.shape_source} and the backbone's hidden size"
            )
        dtype = info.get("dtype")
        if _is_float32_field(kind, tensor_name):
            if dtype != "F32":
                raise TensorDtypeError(f"tensor {tensor_name!r} has dtype {dtype!r}, expected F32")
        elif not isinstance(dtype, str) or dtype not in _WEIGHT_DTYPES or dtype != weight_dtype:
            raise TensorDtypeError(
                f"tensor {tensor_name!r} has dtype {dtype!r}; {kind.weight_names} and keys must share one of "
                f"{sorted(_WEIGHT_DTYPES)}"
            )


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its header JSON in one canonical form (keys sorted, no spaces, padded to
    8 bytes with spaces as safetensors pads it). safetensors writes `__metadata__` from a Rust HashMap, in a
    new random order on every call, so without this one expert serialised twice is two different files (and
    two blobs in a content-addressed store). The tensor bytes and their offsets are untouched."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size :]
