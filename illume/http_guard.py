"""The guards every HTTP server of illume puts in front of its routes: the annotation page (illume/annotate/)
and the reward model service (reward/serve.py). A low layer of its own, so that both can use it (the reward
package sits below the annotation app and must not import it).

A request meets them in this order (`add_guards` adds them so):
- `TrustedHostMiddleware` with `allowed_hosts(bound host, extra)`: a `Host` header the server was not bound
  under gets 400 (a web page that DNS-rebinds its own name to 127.0.0.1 reaches nothing).
- `BodyLimit`: a body over the limit gets 413, refused on its Content-Length before a byte is read, a streamed
  body as soon as it passes the limit, so the server never holds more than that.
- `Authenticate`: who is asking, settled from the headers and query alone, before the body is read or parsed
  (401 without a valid token); the open paths (static files, a health check) skip it.

Plus `validation_error`, one readable 422 for a malformed body (the fields named, the input never echoed),
`is_loopback` and `serve` (uvicorn, one process).
"""

from __future__ import annotations

import gc
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
"""`Host` names a loopback-bound server answers to (besides the extra names it is given)."""
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""Binds that listen on every interface."""
IDENTITY = "illume.identity"
"""Key of the request scope where `Authenticate` puts who is asking (what its `identify` returned)."""


class Authenticate:
    """ASGI middleware: settles who is asking from the headers and query alone, before any route runs.

    FastAPI reads and parses a request's body before it solves the route's dependencies, so a token
    checked in a dependency would be checked after the body of anyone who reaches the port was read and
    parsed. Here a request without a valid token is answered (`{"detail": ...}`, as the routes answer)
    without its body being read; the others carry what `identify` returned in the scope (`IDENTITY`).

    Args:
        app: The app behind it.
        identify: The request (headers and query; reading its body fails) to who is asking, or an
            HTTPException (401, 403). It may read a store, so it runs in a worker thread.
        is_open: Whether a path needs no token (static files, a health check); default: none.
    """

    def __init__(self, app: ASGIApp, identify: Callable[[Request], Any],
                 is_open: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.identify = identify
        self.is_open = is_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            scope[IDENTITY] = await run_in_threadpool(self.identify, Request(scope))
        except HTTPException as error:
            await JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit; an HTTPException, so that FastAPI's body reading
    passes it on (it turns other errors into 400) and the app answers it as JSON."""

    def __init__(self, max_bytes: int, setting: str) -> None:
        super().__init__(413, f"request body over the server's limit of {max_bytes} bytes ({setting})")


class BodyLimit:
    """ASGI middleware: refuses (413) a request body over `max_bytes` without holding more than that.

    A declared Content-Length over the limit is answered before anything is read; a streamed (chunked)
    body is counted as it arrives and refused once it passes the limit. Starlette >= 1.x and FastAPI
    >= 0.16x ship the same (`RequestBodyLimitMiddleware`, `FastAPI(max_body_size=)`), but the versions
    pyproject.toml allows do not all have it, and FastAPI's sits outside an app's own middleware, where
    it would run before the Host check.

    Args:
        app: The app behind it.
        max_bytes: The largest body (bytes) passed on.
        setting: The setting that sets it, named in the 413's message (`annotate.max_body_bytes`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, setting: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes, self.setting)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if started:  # too late to answer 413: let the server drop the connection
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = _BodyTooLarge(self.max_bytes, self.setting)
        await JSONResponse({"detail": error.detail}, error.status_code)(scope, receive, send)


def allowed_hosts(host: str, extra: Sequence[str] = (), setting: str = "allowed_hosts") -> list[str]:
    """The `Host` header names (without port) the server answers when bound to `host`.

    The bound host's own names, then `extra` (names, or "*.example.org" for a domain's hosts): for a
    loopback bind the loopback names; for a wildcard bind (0.0.0.0, ::) this machine's name, fully
    qualified name and addresses (as getaddrinfo resolves its name) and the loopback names; for any other
    host, that host.

    Raises:
        ValueError: An `extra` pattern with a "*" anywhere but a leading "*." (or alone); the message
            names `setting`, where the pattern came from.
    """
    for pattern in extra:
        if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
            raise ValueError(f"{setting}: {pattern!r} is not a host name or '*.domain' pattern")
    if host in WILDCARD_HOSTS:
        names = {socket.gethostname(), socket.getfqdn(), *_addresses(socket.gethostname()), *LOOPBACK_NAMES}
    elif is_loopback(host):
        names = {host, *LOOPBACK_NAMES}
    else:
        names = {host}
    return sorted({_host_name(name) for name in names} | {pattern.lower() for pattern in extra})


def _addresses(name: str) -> list[str]:
    """The addresses `name` resolves to; none if it does not resolve."""
    try:
        return [info[4][0] for info in socket.getaddrinfo(name, None)]
    except OSError:
        return []


def _host_name(name: str) -> str:
    """`name` as a Host header carries it: lower case, an IPv6 address in brackets (without a zone)."""
    bare = name.strip("[]").split("%")[0].lower()
    try:
        return f"[{bare}]" if ipaddress.ip_address(bare).version == 6 else bare
    except ValueError:
        return bare


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def errors_response(errors: Sequence[dict[str, Any]], status_code: int = 422) -> JSONResponse:
    """One readable reason (`detail`) and the field errors (`errors`: {field, message}) from pydantic's
    errors (`ValidationError.errors()`: `loc`, `msg`), never echoing the input."""
    rows = []
    for e in errors:
        where = ".".join(str(part) for part in e.get("loc", ()) if part not in ("body", "query", "path"))
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        rows.append({"field": where or None, "message": message})
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in rows)
    return JSONResponse({"detail": detail or "malformed request", "errors": rows}, status_code=status_code)


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """The app's handler of a malformed request: 422 as `errors_response` words it."""
    return errors_response(error.errors())


def add_guards(app: FastAPI, *, identify: Callable[[Request], Any], is_open: Callable[[str], bool], host: str,
               extra_hosts: Sequence[str], hosts_setting: str, max_body_bytes: int, body_setting: str) -> None:
    """Put the three guards in front of `app`'s routes, in the order of the module doc.

    Args:
        identify, is_open: `Authenticate`'s.
        host: The interface the server binds (its names are answered: `allowed_hosts`).
        extra_hosts, hosts_setting: The other `Host` names answered, and the setting they came from.
        max_body_bytes, body_setting: `BodyLimit`'s limit, and the setting it came from.
    """
    # Added innermost first, so a request meets them as Host check -> body limit -> token -> route: a foreign
    # Host is refused before anything else, and nobody without a token gets their body read.
    app.add_middleware(Authenticate, identify=identify, is_open=is_open)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, setting=body_setting)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host, extra_hosts, hosts_setting),
                       www_redirect=False)


def serve(app: Any, host: str, port: int, log_level: str = "warning") -> None:
    """Serve an ASGI app with uvicorn, one process, no access log."""
    import uvicorn

    # Everything alive now (the imports and the app: ~10^5 objects) lives as long as the server: kept out of
    # the cyclic GC, whose full collections over it would stall every request in flight (scripts/bench_store.py
    # saw 60-150 ms with torch imported).
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
