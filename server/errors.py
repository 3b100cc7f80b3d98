"""Every exception the API can answer with, mapped to its HTTP status in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from moe import (
    ExpertFileError,
    ExpertNameTakenError,
    IncompatibleExpertError,
    InvalidExpertNameError,
    RoutingSpecError,
    SamplingParamsError,
    UnknownExpertError,
)
from server.expert_store import ManifestConflictError
from server.requests import ContextLimitError, EngineStoppedError, QueueFullError

logger = logging.getLogger(__name__)


class BadRequestError(ValueError):
    """A request the server cannot serve as written (400). `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFoundError(LookupError):
    """A model or resource that does not exist (404)."""


class AdmissionRejectedError(ValueError):
    """An expert whose admission report is over the configured limits (422); the body carries the report."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class ExpertSourceError(ValueError):
    """An expert `source` that cannot be fetched (422)."""


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


STATUS: list[tuple[type[BaseException], int]] = [
    (AuthError, 401),  # status taken from the exception
    (BadRequestError, 400),
    (ContextLimitError, 400),
    (NotFoundError, 404),
    (UnknownExpertError, 404),
    (ExpertNameTakenError, 409),
    (ManifestConflictError, 409),
    (ExpertFileError, 422),
    (InvalidExpertNameError, 422),
    (IncompatibleExpertError, 422),
    (AdmissionRejectedError, 422),
    (ExpertSourceError, 422),
    (RoutingSpecError, 400),
    (SamplingParamsError, 400),
    (QueueFullError, 503),
    (EngineStoppedError, 503),
]


def status_for(exc: BaseException) -> int:
    if isinstance(exc, AuthError):
        return exc.status
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_response(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    status = status_for(exc)
    message = str(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFullError | EngineStoppedError):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    param = getattr(exc, "param", None)
    # `detail` as FastAPI writes it; `error` as OpenAI clients read it
    body = {
        "detail": message,
        "error": {"message": message, "type": type(exc).__name__, "param": param, "code": status},
    }
    if isinstance(exc, AdmissionRejectedError) and exc.report is not None:
        body["admission"] = exc.report
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """A request body that does not validate, as one 400 naming the first offending field."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return BadRequestError(message + " (see the API schema at /docs)", param=param)


def install(app: FastAPI) -> None:
    def handle(request: Request, exc: Exception) -> JSONResponse:
        settings = getattr(request.app.state, "settings", None)
        return error_response(exc, settings.retry_after_s if settings else 1)

    def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return handle(request, validation_error(exc))

    for kind, _ in STATUS:
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
