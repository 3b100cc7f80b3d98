"""Access control, as dependencies.

Admin (the writing /experts endpoints): with PLUGMOE_ADMIN_TOKEN set, `Authorization: Bearer <token>` is
required (401 without, 403 wrong); unset, only loopback clients may write.
Generation: with PLUGMOE_API_KEYS set, a listed key (or the admin token) is required.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthError
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, accepted: frozenset[str] | set[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in accepted)


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.admin_token:
        token = _bearer(request)
        if token is None:
            raise AuthError(401, "this endpoint needs `Authorization: Bearer <admin token>`")
        if not _matches(token, {settings.admin_token}):
            raise AuthError(403, "the admin token is wrong")
        return
    host = request.client.host if request.client else None
    if not is_loopback(host):
        raise AuthError(
            403, f"without PLUGMOE_ADMIN_TOKEN set, only loopback clients may change experts (this client: {host})"
        )


def require_api_key(request: Request, settings: SettingsDep) -> None:
    keys = settings.api_key_set()
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise AuthError(401, "this endpoint needs `Authorization: Bearer <api key>`")
    if not _matches(token, keys | ({settings.admin_token} if settings.admin_token else set())):
        raise AuthError(403, "the API key is not valid")


Admin = Depends(require_admin)
ApiKey = Depends(require_api_key)
