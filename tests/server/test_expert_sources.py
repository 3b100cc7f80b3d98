"""Issue 24, finding 3: a `~user/...` plug source was a 500 (Path.expanduser raises for an unknown account) and
told which accounts exist (`~root` got a 422). Now `~` is never expanded: every `~...` source gets one 422, and
no source string (lone surrogates, malformed URLs) is a 5xx."""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.errors import ExpertSourceError
from server.expert_sources import ExpertSources
from server.settings import Settings


@pytest.fixture
def client(make_client, tmp_path: Path) -> TestClient:
    root = tmp_path / "allowed"
    root.mkdir()
    return make_client(source_roots=str(root))


def _refusal(client: TestClient, source: str) -> str:
    body = json.dumps({"source": source})  # ASCII with \u escapes: lone surrogates travel as JSON allows
    response = client.post("/experts", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, (source, response.status_code, response.text)
    return response.json()["detail"]


def test_an_unknown_account_is_a_422_not_a_500(client: TestClient) -> None:
    message = _refusal(client, "~nosuchuser-plugmoe/experts/x.safetensors")
    assert "not expanded" in message and "--source-roots" in message


def test_existing_and_missing_accounts_get_the_same_answer(client: TestClient) -> None:
    sources = {
        "root": "~root/x.safetensors",
        "the server's own account": f"~{getpass.getuser()}/x.safetensors",
        "the server's home": "~/x.safetensors",
        "missing account": "~nosuchuser-plugmoe/x.safetensors",
        "file URL without a slash": "file:~root/x.safetensors",
    }
    answers = {case: _refusal(client, source).replace(repr(source), "<source>") for case, source in sources.items()}
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize(
    "source",
    ["\ud800", "/tmp/\udcff.safetensors", "http://[::1", "https://[fe80::1/x", "file://%zz/x"],
    ids=["lone surrogate", "surrogate in a path", "unclosed IPv6 host", "unclosed IPv6 https", "bad file host"],
)
def test_malformed_sources_are_4xx(client: TestClient, source: str) -> None:
    body = json.dumps({"source": source})
    response = client.post("/experts", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)  # the JSON parser may refuse first
    assert client.get("/experts").json() == []


@pytest.mark.parametrize("source", ["\ud800", "/tmp/\udcff.safetensors", "http://[::1", "~root/x", "~nobody-x/x"])
def test_expert_sources_raise_a_source_error_for_what_no_parser_refused(tmp_path: Path, source: str) -> None:
    sources = ExpertSources(Settings(source_roots=str(tmp_path), source_hosts="example.org"))
    with pytest.raises(ExpertSourceError):
        asyncio.run(sources.fetch(source))
