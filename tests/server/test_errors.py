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
from server.requests import ClientBusyError, ContextLimitError, EngineStoppedError, QueueFullError
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
    (ClientBusyError("over its share"), 429),
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
    assert ("retry-after" in response.headers) == (status in (429, 503))
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


# --- the refusal log line and the request id ---------------------------------------------------------------


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "server.errors" and r.getMessage().startswith("refused")
    ]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"),
    [
        ("POST", "/v1/completions", {"json": {"prompt": "hi", "max_tokens": 600}}, 400, "max_tokens"),  # a route
        ("POST", "/v1/completions", {"json": {"prompt": "hi", "frobnicate": 1}}, 400, "frobnicate"),  # the table
        ("POST", "/generate", {"json": {"prompt": "hi", "temperature": "hot"}}, 400, "temperature"),  # pydantic
        (
            "POST",
            "/v1/chat/completions",
            {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}},
            404,
            "model",  # issue 24: the 404 names the field
        ),
        ("GET", "/no/such/route", {}, 404, None),  # starlette's own answer
        (
            "POST",
            "/generate",
            {"content": b"x" * 200, "headers": {"content-type": "application/json"}},
            413,
            None,
        ),  # the guard
    ],
)
def test_every_refusal_leaves_one_log_line_with_the_request_id_of_the_response(
    make_client, caplog: pytest.LogCaptureFixture, method: str, path: str, kwargs: dict, status: int, param: str | None
) -> None:
    client = make_client(max_body_bytes=100)
    with caplog.at_level("INFO", logger="server.errors"):
        response = client.request(method, path, **kwargs)
    assert response.status_code == status
    ident = response.headers["x-request-id"]
    [line] = _refusals(caplog)
    assert line.startswith(f"refused {method} {path} {status} param={param} request={ident}: ")
    assert line.endswith(response.json()["error"]["message"])


def test_a_sane_request_id_is_honoured_and_an_odd_one_replaced(make_client, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(api_keys="k1")
    with caplog.at_level("INFO", logger="server.errors"):
        refused = client.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "run-7:req.42"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "run-7:req.42"
    assert _refusals(caplog) == [
        f"refused POST /v1/completions 401 param=None request=run-7:req.42: {refused.json()['error']['message']}"
    ]
    odd = client.get("/health", headers={"X-Request-Id": "two words\x7f" + "x" * 200})
    assert odd.status_code == 200 and len(odd.headers["x-request-id"]) == 32 and " " not in odd.headers["x-request-id"]
    served = client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer k1"}
    )
    assert served.status_code == 200 and served.headers["x-request-id"] != odd.headers["x-request-id"]
    assert len(_refusals(caplog)) == 1  # a request served is no refusal
