"""The console's HTTP server: FastAPI on uvicorn, in a thread of the relay's process (`run`,
`process`), so that its pages and API act on the running relay directly."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from relay import __version__
from relay.console.api import api_router
from relay.console.control import Control
from relay.console.users import Users, UsersFileError
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


def make_app(control: Control, users: UsersFile) -> FastAPI:
    app = FastAPI(title="dicom-relay", version=__version__,
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    app.include_router(api_router(control, users))
    return app


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
        self.app = make_app(self.control, self.users)
        tls = cfg.console.tls
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning",
            access_log=False, timeout_keep_alive=5, limit_concurrency=64,
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
            self.thread.join(timeout=10)
        if self.control.store is not None:
            self.control.store.close()
