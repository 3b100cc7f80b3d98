"""Why an expert file was refused. Each failure has its own type; every message says what to do."""

from __future__ import annotations


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
