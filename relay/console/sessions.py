"""Console sessions (in memory: a restart logs everyone out, nothing to leak on disk) and the
login rate limit."""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.console.users import Principal

COOKIE = "relay_session"
TTL = 8 * 3600.0  # a working day
# Failed logins: at most this many per client address and per user name in WINDOW seconds.
MAX_FAILURES = 5
WINDOW = 300.0


@dataclass
class Session:
    id: str
    principal: Principal
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> Session:
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32),
                          self.clock() + TTL)
        with self._lock:
            now = self.clock()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.expires <= self.clock():
                self._sessions.pop(session_id or "", None)
                return None
            return session

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


class LoginLimiter:
    """Failed logins counted per client address and per name: a password guesser gets
    MAX_FAILURES tries per WINDOW, whichever it varies."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - WINDOW:
            times.popleft()
        return times

    def blocked_for(self, address: str, name: str) -> float:
        """Seconds until a login from this address for this name may be tried (0: now)."""
        with self._lock:
            wait = 0.0
            for key in (f"addr:{address}", f"name:{name}"):
                times = self._recent(key)
                if len(times) >= MAX_FAILURES:
                    wait = max(wait, times[0] + WINDOW - self.clock())
            return wait

    def failed(self, address: str, name: str) -> None:
        with self._lock:
            for key in (f"addr:{address}", f"name:{name}"):
                self._recent(key).append(self.clock())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(f"name:{name}", None)
