"""The one table from exception to HTTP status: every row, the body shape, the headers, and the handlers an app
installs from it."""

from __future__ import annotations

import inspect
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import moe.errors
from moe.decode.sequence import GenerationFailedError
from moe.errors import (
    ExpertFileError,
    ExpertNameTakenError,
    GrammarError,
    IncompatibleExpertError,
    InvalidExpertNameError,
    MetadataTooLargeError,
    RoutingSpecError,
    SamplingParamsError,
    UnknownExpertError,
    UnsupportedBackboneError,
)
from server import errors
from server.errors import (
    STATUS,
    AdmissionRejectedError,
    AuthError,
    BadRequestError,
    ExpertSourceError,
    HeadersTooLargeError,
    NotFoundError,
    RequestTooLargeError,
    error_response,
    status_for,
)
from server.expert_store import (
    InsufficientStorageError,
    ManifestConflictError,
    StoreCorruptError,
    StoreUnavailableError,
    StoreWriteError,
)
from server.requests import ContextLimitError, EngineStoppedError, QueueFullError
from server.settings import Settings

FILE_ERRORS = [kind for _, kind in inspect.getmembers(moe.errors, inspect.isclass) if issubclass(kind, ExpertFileError)]

CASES: list[tuple[BaseException, int]] = [
    (AuthError(401, "send a token"), 401),
    (AuthError(403, "wrong token"), 403),
    (BadRequestError("bad body"), 400),
    (ContextLimitError("too long"), 400),
    (NotFoundError("no such model"), 404),
    (UnknownExpertError("no expert named 'x'"), 404),
    (ExpertNameTakenError("taken"), 409),
    (ManifestConflictError("raced"), 409),
    # a file is refused with a 422, one over the size limits (metadata, header) with a 413
    *[(kind(f"{kind.__name__} message"), 413 if kind is MetadataTooLargeError else 422) for kind in FILE_ERRORS],
    (InvalidExpertNameError("bad name"), 422),
    (IncompatibleExpertError("wrong shape"), 422),
    (AdmissionRejectedError("over the limit"), 422),
    (ExpertSourceError("cannot fetch"), 422),
    (RoutingSpecError("bad routing"), 400),
    (SamplingParamsError("bad sampling"), 400),
    (GrammarError("the JSON schema does not compile", param="response_format.json_schema.schema"), 400),
    (BadRequestError("temperature: must be finite", param="temperature"), 400),
    (QueueFullError("full"), 503),
    (EngineStoppedError("stopped"), 503),
    (RequestTooLargeError("body over the limit", param="prompt"), 413),
    (HeadersTooLargeError("headers over the limit"), 431),
    (GenerationFailedError("generation failed: RuntimeError"), 500),
    (InsufficientStorageError("disk full"), 507),
    (StoreWriteError("cannot write"), 500),
    (StoreUnavailableError("the expert store cannot be reached"), 503),  # cluster: a shared store is down
    (StoreCorruptError("the newest manifest is unreadable"), 503),
]


def test_every_row_of_the_table_is_tested() -> None:
    tested = {type(exc) for exc, _ in CASES}
    assert {kind for kind, _ in STATUS} <= tested
    assert len(FILE_ERRORS) >= 12, "every expert-file error is a 4xx"


def test_every_moe_error_a_client_can_cause_is_a_4xx() -> None:
    """UnsupportedBackboneError stops the server at start; it is never a request's answer."""
    for _, kind in inspect.getmembers(moe.errors, inspect.isclass):
        if kind.__module__ == "moe.errors" and kind is not UnsupportedBackboneError:
            assert 400 <= status_for(kind("x")) < 500, kind


@pytest.mark.parametrize(("exc", "status"), CASES, ids=[f"{type(e).__name__}-{s}" for e, s in CASES])
def test_status_and_body(exc: BaseException, status: int) -> None:
    assert status_for(exc) == status
    response = error_response(exc, retry_after_s=7)
    assert response.status_code == status
    message = str(exc)
    # `detail` as FastAPI writes errors, `error` as OpenAI clients read them
    assert json.loads(response.body) == {
        "detail": message,
        "error": {"message": message, "type": type(exc).__name__, "param": getattr(exc, "param", None), "code": status},
    }
    assert ("retry-after" in response.headers) == (status == 503)
    assert ("www-authenticate" in response.headers) == isinstance(exc, AuthError)
    if status == 503:
        assert response.headers["retry-after"] == "7"
    if isinstance(exc, AuthError):
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_expert_message_is_not_quoted() -> None:
    """KeyError quotes its message; the API says it plainly."""
    assert str(UnknownExpertError("no expert named 'x'")) == "no expert named 'x'"


def test_anything_else_is_a_500() -> None:
    assert status_for(RuntimeError("bug")) == 500 and status_for(ValueError("plain")) == 500
    assert status_for(KeyError("plain")) == 500 and status_for(UnsupportedBackboneError("start-up")) == 500


def test_an_app_answers_every_row_through_its_handlers() -> None:
    app = FastAPI()
    app.state.settings = Settings(retry_after_s=5)
    errors.install(app)

    @app.get("/raise/{index}")
    async def raise_case(index: int) -> None:
        raise CASES[index][0]

    with TestClient(app) as client:
        for index, (exc, status) in enumerate(CASES):
            response = client.get(f"/raise/{index}")
            assert response.status_code == status, type(exc).__name__
            assert response.json() == {
                "detail": str(exc),
                "error": {
                    "message": str(exc),
                    "type": type(exc).__name__,
                    "param": getattr(exc, "param", None),
                    "code": status,
                },
            }
            if status == 503:
                assert response.headers["retry-after"] == "5"
