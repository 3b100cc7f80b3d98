"""Every exception the API can answer with, mapped to its HTTP status in one place; and the one log line
every refused request (4xx) leaves:

    refused POST /v1/completions 400 param=max_tokens request=3f2a...: max_tokens=600 is over this server's cap ...

The request id (in the log line) is the one the request guard gave the request (server.middleware: the
client's X-Request-Id when it is sane, else a new one), kept in the ASGI scope's state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from moe import (
    ExpertFileError,
    ExpertNameTakenError,
    GrammarError,
    IncompatibleExpertError,
    InvalidExpertNameError,
    RoutingSpecError,
    SamplingParamsError,
    UnknownExpertError,
)
from moe.decode.sequence import GenerationFailedError
from moe.errors import MetadataTooLargeError
from server.expert_store import (
    InsufficientStorageError,
    ManifestConflictError,
    StoreCorruptError,
    StoreUnavailableError,
    StoreWriteError,
)
from server.requests import ClientBusyError, ContextLimitError, EngineStoppedError, QueueFullError

logger = logging.getLogger(__name__)


class BadRequestError(ValueError):
    """A request the server cannot serve as written (400). `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFoundError(LookupError):
    """A model or resource that does not exist (404). `param` names the field that named it, if one did."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdmissionRejectedError(ValueError):
    """An expert whose admission report is over the configured limits (422); the body carries the report."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class ExpertSourceError(ValueError):
    """An expert `source` that cannot be fetched, or is not allowed (422)."""


class RequestTooLargeError(ValueError):
    """A request body, upload, prompt or fetched file over its configured limit (413)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeadersTooLargeError(ValueError):
    """Request headers over --max-header-bytes (431)."""


STATUS: list[tuple[type[BaseException], int]] = [  # first match wins: subclasses before their bases
    (AuthError, 401),  # status taken from the exception
    (RequestTooLargeError, 413),
    (HeadersTooLargeError, 431),
    (MetadataTooLargeError, 413),
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
    (GrammarError, 400),
    (QueueFullError, 503),
    (ClientBusyError, 429),
    (EngineStoppedError, 503),
    (GenerationFailedError, 500),
    (InsufficientStorageError, 507),
    (StoreWriteError, 500),
    (StoreUnavailableError, 503),  # the expert store cannot be reached: nothing changed, retry later
    (StoreCorruptError, 503),  # the expert store holds a broken manifest or file: an operator must fix it
]


def log_refusal(scope: MutableMapping[str, Any], status: int, error: dict[str, Any]) -> None:
    """One line per refused request (4xx): method, path, status, param, request id and the reason."""
    if not 400 <= status < 500:
        return
    state = scope.setdefault("state", {})
    if state.get("refusal_logged"):  # the guard replaced an answer the app already logged
        return
    state["refusal_logged"] = True
    logger.info(
        "refused %s %s %d param=%s request=%s: %s",
        scope.get("method"),
        scope.get("path"),
        status,
        error.get("param"),
        state.get("request_id"),
        error.get("message"),
    )


def status_for(exc: BaseException) -> int:
    if isinstance(exc, AuthError):
        return exc.status
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_object(exc: BaseException) -> dict:
    """The `error` object OpenAI clients read: message, type, param, code (the HTTP status)."""
    status = status_for(exc)
    message = str(exc) if status != 500 or _known(exc) else "internal server error (see the server log)"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from a request
    return {"message": message, "type": type(exc).__name__, "param": getattr(exc, "param", None), "code": status}


def error_body(exc: BaseException) -> dict:
    """The whole error body: `detail` as FastAPI writes it, `error` as OpenAI clients read it."""
    error = error_object(exc)
    body = {"detail": error["message"], "error": error}
    if isinstance(exc, AdmissionRejectedError) and exc.report is not None:
        body["admission"] = exc.report  # per-domain figures and the repair tried: what to fix
    return body


def error_response(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    status = status_for(exc)
    headers: dict[str, str] = {}
    # every "not now": a full queue, a stopping engine, an expert store that cannot be read, a client over its share
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def _known(exc: BaseException) -> bool:
    return any(isinstance(exc, kind) for kind, _ in STATUS)


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """A request body that does not validate, as one 400 naming the offending field (of a union's branches,
    the one that got furthest into the value)."""
    errors = [{**e, "loc": _field_path(e.get("loc", ()))} for e in exc.errors()]
    first = max(errors, key=lambda e: len(e["loc"])) if errors else {"loc": [], "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        reason = (first.get("ctx") or {}).get("error", first["msg"])
        return BadRequestError(f"the body is not valid JSON: {reason} (see the API schema at /docs)")
    param = "".join(part if part.startswith("[") else f".{part}" for part in first["loc"]).lstrip(".") or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return BadRequestError(message + " (see the API schema at /docs)", param=param)


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple | list) -> list[str]:
    """A pydantic error location as the request's field path, list indices as OpenAI writes them
    (`messages[0].content`): where the value came from (body, query) and union branch tags (`str`,
    `list[str]`, `function-after[...]`) dropped."""
    path = []
    for part in loc:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif part not in ("body", "query", "path", "header") and _FIELD.fullmatch(part) and part not in _TYPE_TAGS:
            path.append(part)
    return path


def install(app: FastAPI) -> None:
    def handle(request: Request, exc: Exception) -> JSONResponse:
        settings = getattr(request.app.state, "settings", None)
        response = error_response(exc, settings.retry_after_s if settings else 1)
        log_refusal(request.scope, response.status_code, error_object(exc))
        return response

    def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return handle(request, validation_error(exc))

    def handle_http(request: Request, exc: Exception) -> JSONResponse:
        """Starlette's own answers (404 no route, 405 wrong method, 400 unparsable multipart), same shape."""
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        kind = "NotFoundError" if exc.status_code == 404 else "HTTPException"
        body = {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": exc.status_code}}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of every route on this path, not only the first route's
            methods = {
                method
                for route in request.app.routes
                if isinstance(route, Route) and route.matches(request.scope)[0] == Match.PARTIAL
                for method in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(methods))
        log_refusal(request.scope, exc.status_code, body["error"])
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return handle(request, exc)

    for kind, _ in STATUS:
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(Exception, handle_unexpected)  # a bug is a 500 with the error object, never text
