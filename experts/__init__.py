"""Experts: the file format, and the tools that train, distil and evaluate them."""

from experts.errors import (
    BackboneMismatchError,
    ExpertFileError,
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
from experts.file import FORMAT_VERSION, ExpertFile, write_atomically

__all__ = [
    "FORMAT_VERSION",
    "BackboneMismatchError",
    "ExpertFile",
    "ExpertFileError",
    "InvalidMetadataError",
    "MissingTensorError",
    "NonFiniteTensorError",
    "NotAnExpertFileError",
    "TensorDtypeError",
    "TensorShapeError",
    "UnexpectedTensorError",
    "UnreadableExpertFileError",
    "UnsupportedExpertKindError",
    "UnsupportedFormatVersionError",
    "write_atomically",
]
