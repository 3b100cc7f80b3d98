"""Access control: who may call what, and who a request comes from. Checked once per request, by the request
guard (server.middleware) before the app reads a byte of the body, on every app server.main builds (and by
the cluster's ingress): `refusal` answers it, and `client_identity` names the client of an admitted request,
kept in the ASGI scope's state for the routes (server.api.deps.ClientDep).

API keys: with PLUGMOE_API_KEYS set, every endpoint but those in --open-paths (default /health and /ready,
so liveness and readiness probes work without a key) needs `Authorization: Bearer <key>` (a listed key, or
the admin token): 401 without one, 403 with a wrong one. /ready answers a caller without a key with its
status only (ready, loading, warming, stopped, stale), never the experts, versions or queue.

Admin (the writing /experts endpoints): with PLUGMOE_ADMIN_TOKEN set, `Authorization: Bearer <token>` is
required (401 without, 403 wrong). Unset, only a direct loopback client may write, and the server trusts
nothing that could make a remote client look local: a request carrying forwarded headers
(X-Forwarded-For, Forwarded, X-Real-IP: it came through a proxy, which may serve anyone) is refused, and
so is every request when the server listens on a non-loopback address. Uvicorn runs with proxy headers
off, so the client address is the socket's peer, never a header's claim.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Mapping

from server.errors import AuthError
from server.settings import Settings, item_set

logger = logging.getLogger(__name__)

FORWARDED_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
_READING_METHODS = ("GET", "HEAD", "OPTIONS")


def _bearer(headers: Mapping[str, str]) -> str | None:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, accepted: frozenset[str] | set[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in accepted)


def is_loopback(host: str | None) -> bool:
    """Whether a client address is a loopback IP address."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binds_loopback(host: str) -> bool:
    """Whether a listen address (--host) accepts loopback connections only."""
    return host == "localhost" or is_loopback(host)


ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # vLLM's runtime adapter API: plugs too


def is_admin_request(method: str, path: str) -> bool:
    """The writing /experts endpoints (plug, unplug, purge, GC, domain sample) and vLLM's adapter API."""
    if path in ADMIN_PATHS:
        return True
    return (path == "/experts" or path.startswith("/experts/")) and method.upper() not in _READING_METHODS


def admin_refusal(headers: Mapping[str, str], client_host: str | None, settings: Settings) -> AuthError | None:
    """Why this request may not change experts (None: it may)."""
    if settings.admin_token:
        token = _bearer(headers)
        if token is None:
            return AuthError(401, "this endpoint needs `Authorization: Bearer <admin token>`")
        if not _matches(token, {settings.admin_token}):
            return AuthError(403, "the admin token is wrong")
        return None
    forwarded = [name for name in FORWARDED_HEADERS if name in headers]
    if forwarded:
        logger.warning(
            "refused an admin request from %s: it carries %s (it came through a proxy), and without "
            "--admin-token only direct loopback clients may change experts",
            client_host,
            ", ".join(forwarded),
        )
        return AuthError(
            403,
            f"this request came through a proxy ({', '.join(forwarded)}); without PLUGMOE_ADMIN_TOKEN set only "
            "direct loopback clients may change experts. Set --admin-token and send it as a bearer token",
        )
    if not binds_loopback(settings.host):
        logger.warning(
            "refused an admin request from %s: the server listens on %s and has no --admin-token",
            client_host,
            settings.host,
        )
        return AuthError(
            403,
            f"the server listens on {settings.host}, not loopback, and has no PLUGMOE_ADMIN_TOKEN: nobody may "
            "change experts. Set --admin-token and send it as a bearer token",
        )
    if not is_loopback(client_host):
        return AuthError(
            403,
            f"without PLUGMOE_ADMIN_TOKEN set, only loopback clients may change experts (this client: {client_host})",
        )
    return None


def api_key_refusal(headers: Mapping[str, str], path: str, settings: Settings) -> AuthError | None:
    """Why this request may not use the API (None: it may)."""
    if path in item_set(settings.open_paths):
        return None
    return _key_refusal(headers, settings)


def has_api_key(headers: Mapping[str, str], settings: Settings) -> bool:
    """Whether this request may see what --api-keys guards (no keys are set, or it sends a valid one): an open
    path such as /ready answers a caller without one, but with less."""
    return _key_refusal(headers, settings) is None


def _key_refusal(headers: Mapping[str, str], settings: Settings) -> AuthError | None:
    keys = item_set(settings.api_keys)
    if not keys:
        return None
    token = _bearer(headers)
    if token is None:
        return AuthError(401, "this endpoint needs `Authorization: Bearer <api key>`")
    if not _matches(token, keys | ({settings.admin_token} if settings.admin_token else set())):
        return AuthError(403, "the API key is not valid")
    return None


def refusal(
    method: str, path: str, headers: Mapping[str, str], client_host: str | None, settings: Settings
) -> AuthError | None:
    """Why this request is refused, API key first, then admin rights (None: it may go on)."""
    refused = api_key_refusal(headers, path, settings)
    if refused is None and is_admin_request(method, path):
        refused = admin_refusal(headers, client_host, settings)
    return refused


def client_identity(headers: Mapping[str, str], client_host: str | None, settings: Settings) -> str:
    """Who a request comes from, for the per-client share of sequences in flight and the scheduler's round-robin:
    its API key under --api-keys (hashed: the tag is logged and kept, the key is not), else its address (the
    socket's peer: proxy headers are never read)."""
    token = _bearer(headers) if item_set(settings.api_keys) else None
    if token is not None:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "addr:" + (client_host if client_host is not None else "unknown")
