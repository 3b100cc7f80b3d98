"""Where a plug's bytes come from when the client names a `source` instead of uploading the file.

Only what the operator allowed is read:

- a local path or file:// URL must resolve (symlinks followed) under one of --source-roots and be a regular
  file: it is opened non-blocking and checked with fstat before a byte is read, so a FIFO, a device such
  as /dev/zero or a directory is refused and never blocks a thread;
- an http(s):// URL must name a host on --source-hosts; redirects are followed by hand, each hop checked
  against the same list, at most MAX_REDIRECTS of them;
- the whole fetch has one deadline (--source-timeout-s) and one size cap (--max-upload-bytes, 413 past it).

A source outside the lists is refused with the same message whether or not the path exists or the port
answers, so the error cannot be used to probe the server's filesystem or network. A path starting with `~` is
never expanded (`Path.expanduser` raises for an unknown account and finds a known one's home, so expanding it
would tell which accounts exist): every `~...` source gets one 422.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import urllib.parse
from pathlib import Path

import httpx

from server.errors import ExpertSourceError, RequestTooLargeError
from server.settings import Settings

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK = 1 << 20


class ExpertSources:
    def __init__(self, settings: Settings) -> None:
        self.roots = settings.resolved_source_roots()
        self.hosts = settings.source_host_set()
        self.max_bytes = settings.max_upload_bytes
        self.timeout_s = settings.source_timeout_s

    async def fetch(self, source: str) -> bytes:
        """The bytes of an allowed expert file. Raises ExpertSourceError (422) or RequestTooLargeError (413)."""
        try:
            source.encode("utf-8")  # a lone surrogate (JSON allows "\\ud800") names no file and no URL
            parsed = urllib.parse.urlsplit(source)
        except ValueError:  # UnicodeEncodeError, or a malformed URL such as http://[::1
            raise ExpertSourceError(
                f"source {_safe(source)} is not a valid path or URL; use a local path, file:// or http(s)://"
            ) from None
        if parsed.scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._download(source), self.timeout_s)
            except asyncio.TimeoutError:
                raise ExpertSourceError(
                    f"fetching {_safe(source)} took longer than {self.timeout_s:g} s (--source-timeout-s)"
                ) from None
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise self._not_allowed(source)
            path = urllib.parse.unquote(parsed.path)
        elif parsed.scheme == "" or (len(parsed.scheme) == 1 and source[1:3] in (":\\", ":/")):
            path = source
        else:
            raise ExpertSourceError(
                f"source {_safe(source)} has scheme {parsed.scheme!r}; use a local path, file:// or http(s)://"
            )
        return await asyncio.to_thread(self._read_local, source, path)

    # --- local files ------------------------------------------------------------------------------------

    def _read_local(self, source: str, raw: str) -> bytes:
        if not self.roots:
            raise ExpertSourceError(
                f"source {_safe(source)} is not allowed: this server reads no local files (start it with "
                "--source-roots DIR to allow a directory, or upload the file with multipart `file`)"
            )
        if "\x00" in raw:
            raise self._not_allowed(source)
        if raw.startswith("~"):  # the server's accounts are not the client's business: one answer for every ~user
            raise ExpertSourceError(
                f"source {_safe(source)} is not allowed: `~` is not expanded in a source; give the file's absolute "
                "path under the server's --source-roots"
            )
        resolved = Path(os.path.abspath(raw)).resolve()  # symlinks followed, existing or not
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise self._not_allowed(source)
        try:  # O_NONBLOCK: opening a FIFO never waits for a writer; O_NOFOLLOW: no symlink swapped in since
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ExpertSourceError(f"there is no file at {_safe(source)}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._not_allowed(source) from None
            raise ExpertSourceError(f"cannot read {_safe(source)}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ExpertSourceError(f"source {_safe(source)} is not a regular file")
            if info.st_size > self.max_bytes:
                raise self._too_large(source)
            chunks, size = [], 0
            while chunk := os.read(fd, _CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large(source)
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as e:
            raise ExpertSourceError(f"cannot read {_safe(source)}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _not_allowed(self, source: str) -> ExpertSourceError:
        return ExpertSourceError(
            f"source {_safe(source)} is not allowed: local sources must be files under the server's "
            "--source-roots, and URL sources on its --source-hosts"
        )

    def _too_large(self, source: str) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"source {_safe(source)} is over {self.max_bytes} bytes (--max-upload-bytes)", param="source"
        )

    # --- http(s) ------------------------------------------------------------------------------------------

    def _check_url(self, source: str, url: str) -> None:
        if not self.hosts:
            raise ExpertSourceError(
                f"source {_safe(source)} is not allowed: this server fetches no URLs (start it with "
                "--source-hosts HOST to allow a host, or upload the file with multipart `file`)"
            )
        try:  # a redirect's Location may be malformed (http://[::1): refused like any host off the list
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").lower()
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise self._not_allowed(source) from None
        if parts.scheme not in ("http", "https") or not ({host, f"{host}:{port}"} & self.hosts):
            raise self._not_allowed(source)

    async def _download(self, source: str) -> bytes:
        url = source
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_url(source, url)
                try:
                    async with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise ExpertSourceError(f"fetching {_safe(source)} failed: HTTP {response.status_code}")
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > self.max_bytes:
                            raise self._too_large(source)
                        return await self._read_body(source, response)
                except httpx.HTTPError as e:
                    raise ExpertSourceError(f"fetching {_safe(source)} failed ({type(e).__name__})") from None
        raise ExpertSourceError(f"fetching {_safe(source)} failed: more than {MAX_REDIRECTS} redirects")

    async def _read_body(self, source: str, response: httpx.Response) -> bytes:
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(source)
            chunks.append(chunk)
        return b"".join(chunks)


def _safe(source: str, limit: int = 200) -> str:
    """The source as given, quoted and shortened for an error message."""
    return repr(source if len(source) <= limit else source[:limit] + "...")
