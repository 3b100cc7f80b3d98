"""Every error the model package raises on purpose, in one place. Each names what is wrong and what to do.

The server maps these to HTTP statuses in one table (server/errors.py); nothing here knows about HTTP.
"""

from __future__ import annotations


class UnsupportedBackboneError(ValueError):
    """The model's family has no row in moe.model.backbone.FAMILIES."""


class InvalidExpertNameError(ValueError):
    """An expert name that is malformed or reserved."""


# --- the plugged set -------------------------------------------------------------------------------------


class ExpertNameTakenError(ValueError):
    """Plugging a name that is already plugged, without replace."""


class UnknownExpertError(KeyError):
    """A name that is not plugged."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class IncompatibleExpertError(ValueError):
    """An expert whose shapes do not fit the backbone."""


# --- requests ------------------------------------------------------------------------------------------


class RoutingSpecError(ValueError):
    """A routing request that cannot be served as written."""


class SamplingParamsError(ValueError):
    """Sampling settings outside their range."""


class GrammarError(ValueError):
    """A structured-output format (JSON schema, regex) that cannot be compiled. `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- expert files: the file cannot be plugged as it is; nothing was plugged or changed -------------------


class ExpertFileError(ValueError):
    """Base class: the file cannot be plugged as it is. Nothing was plugged or changed."""


class UnreadableExpertFileError(ExpertFileError):
    """Not a readable safetensors file (truncated, corrupt, or another format)."""


class NotAnExpertFileError(ExpertFileError):
    """A safetensors file, but not a plugmoe expert (no plugmoe format marker)."""


class UnsupportedFormatVersionError(ExpertFileError):
    """Written by a newer (or unknown) version of the expert file format."""


class InvalidMetadataError(ExpertFileError):
    """A metadata field is missing or malformed (including an invalid expert name)."""


class DomainSampleError(InvalidMetadataError):
    """The metadata's `domain_sample` is not a JSON list of strings, or holds more than the format allows."""


class UnsupportedExpertKindError(ExpertFileError):
    """An adapter kind this plugmoe cannot run."""


class BackboneMismatchError(ExpertFileError):
    """Trained for another backbone (family, shape, vocabulary or weights differ)."""


class MissingTensorError(ExpertFileError):
    """A tensor the format requires is absent."""


class UnexpectedTensorError(ExpertFileError):
    """A tensor the format does not define is present."""


class TensorShapeError(ExpertFileError):
    """A tensor's shape does not match the metadata or the backbone."""


class TensorDtypeError(ExpertFileError):
    """A tensor's dtype is not one the format allows."""


class NonFiniteTensorError(ExpertFileError):
    """A tensor holds NaN or infinity."""


class WeightMagnitudeError(ExpertFileError):
    """A tensor holds values too large to serve (over moe.adapters.file.MAX_ABS_WEIGHT, or overflowing the serving
    dtype)."""


class MetadataTooLargeError(ExpertFileError):
    """The header or its metadata is over the format's size limits (examples, header bytes, nesting)."""


class NonFiniteOutputError(ExpertFileError):
    """The expert, pinned on a short probe text, makes the model's logits NaN or infinite."""
