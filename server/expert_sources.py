"""Where a plug's bytes come from when the client names a `source` instead of uploading the file."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import httpx

from server.errors import ExpertSourceError

MAX_DOWNLOAD_BYTES = 1 << 30


def fetch_source(source: str) -> bytes:
    """The bytes of an expert file at a local path, a file:// URL or an http(s):// URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _download(source)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and source[1:3] in (":\\", ":/")):
        path = Path(source)
    else:
        raise ExpertSourceError(
            f"source {source!r} has scheme {parsed.scheme!r}; use a local path, file:// or http(s)://"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise ExpertSourceError(f"cannot read expert file {str(path)!r}: {e.strerror or e}") from e


def _download(url: str) -> bytes:
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ExpertSourceError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPStatusError as e:
        raise ExpertSourceError(f"fetching {url} failed: HTTP {e.response.status_code}") from e
    except httpx.HTTPError as e:
        raise ExpertSourceError(f"fetching {url} failed: {type(e).__name__}: {e}") from e
