"""The console's HTTP server: FastAPI on uvicorn, in a thread of the relay's process (`run`,
`process`), so that its pages and API act on the running relay directly."""

from __future__ import annotations

import html
import logging
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from relay import __version__
from relay.console.api import api_router
from relay.console.control import Control
from relay.console.pages import LoginRequired, pages_router
from relay.console.sessions import LoginLimiter, Sessions
from relay.console.users import Users, UsersFileError, dummy_hash
from relay.history.store import HistoryStore
from relay.pipeline.relay import Relay

log = logging.getLogger("relay.console")


class UsersFile:
    """The users file, read again when it changed (`user remove` applies at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._users = Users(path)
        self._lock = threading.Lock()

    def __call__(self) -> Users:
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._users = Users(self.path)
                    self._stamp = stamp
                except UsersFileError as exc:
                    log.error("%s (the last good one stays)", exc)
            return self._users


def make_app(control: Control, users: UsersFile, *, secure_cookies: bool = False,
             sessions: Sessions | None = None, limiter: LoginLimiter | None = None) -> FastAPI:
    app = FastAPI(title="dicom-relay", version=__version__,
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    app.include_router(api_router(control, users))
    app.include_router(pages_router(control, users, sessions or Sessions(),
                                    limiter or LoginLimiter(), secure_cookies))

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='')}",
                                status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # The API answers JSON; a page answers a page.
        if request.url.path.startswith("/api/"):
            return await http_exception_handler(request, exc)
        return HTMLResponse(
            "<!doctype html><meta charset='utf-8'><title>dicom-relay</title>"
            f"<h1>{exc.status_code}</h1><p id='message'>{html.escape(str(exc.detail))}</p>"
            "<p><a href='/'>dicom-relay</a></p>", status_code=exc.status_code)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        # Pages hold patient data: never cached, never framed, no scripts but our own.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        return response

    return app


# Seconds a stopping console waits for its connections to close.
STOP_GRACE = 2.0


class ConsoleServer:
    def __init__(self, relay: Relay) -> None:
        cfg = relay.config
        assert cfg.console.listen is not None
        self.host, self.port = cfg.console.listen
        store = None
        if cfg.history.enabled:
            store = HistoryStore(cfg.history_url, cfg.relay_name)
        self.control = Control(relay, store)
        self.users = UsersFile(cfg.users_file)
        dummy_hash()  # now, so that the first login of an unknown name takes no longer
        tls = cfg.console.tls
        self.app = make_app(self.control, self.users, secure_cookies=tls is not None)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning",
            access_log=False, timeout_keep_alive=5, limit_concurrency=64, lifespan="off",
            ssl_certfile=str(tls.certificate) if tls and tls.certificate else None,
            ssl_keyfile=str(tls.private_key) if tls and tls.private_key else None))
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"[console].listen {self.host}:{self.port}: the console could "
                              "not start there (see the lines above)")
            time.sleep(0.05)
        scheme = "https" if self.server.config.ssl_certfile else "http"
        log.info("console and API at %s://%s:%d/ (users: %s)", scheme, self.host, self.port,
                 self.users.path)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            # A response under way gets a moment to finish. An idle keep-alive connection
            # over TLS closes only once the client answers close_notify, which a client
            # that is not reading never does: uvicorn would wait for it until our join
            # timed out (10 s at every stop, past `docker stop`'s own 10 s grace).
            self.thread.join(timeout=STOP_GRACE)
            if self.thread.is_alive():
                self.server.force_exit = True  # stop waiting for those connections
                self.thread.join(timeout=5)
        if self.control.store is not None:
            self.control.store.close()
