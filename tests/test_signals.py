"""The relay's signal handlers (SIGTERM, SIGINT, SIGHUP) and its main loop.

A handler runs in the main thread between two of its steps, wherever it is. A relay in CI once
ignored SIGTERM for good: its handler called Event.set(), which takes the Event's lock, and the
signal had landed while the main thread held that very lock (leaving stop_event.wait() in
Relay.wait()). These tests put the main thread in exactly that place, in a child process that
a hang cannot take the test run down with.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peers import REPO, free_port, relay_config

# The child: a relay (not started) with the handlers serve() installs, a signal that lands
# while the main thread holds stop_event's lock, then the main loop's pause (the signal must
# end it at once: 600 s would outlast the test's 30) and the main loop itself.
CHILD = """
import os, signal, sys
from relay.cli.common import load
from relay.cli.serve import handle_signals
from relay.pipeline.relay import Relay
from relay.toolkits.select import select_engine

config = load(sys.argv[1])  # as `dicom-relay run` does, its logging too
relay = Relay(config, select_engine(config))
handle_signals(relay)
with relay.stop_event._cond:  # where the main thread is as it leaves stop_event.wait()
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    for _ in range(10_000):  # check points: the handler runs in here, lock held
        pass
print("handled", relay.stop_signal, relay.reload_requested, flush=True)
relay._pause(600)  # the main loop's wait between looks: the signal ends it at once
print("woken", flush=True)
if sys.argv[2] != "SIGHUP":
    relay.wait()
    print("wait returned", flush=True)
"""


def _child(tmp_path: Path, signame: str) -> str:
    config = relay_config(tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "spool",
                          destinations=[("pacs", "PACS", free_port())])
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(config), signame], cwd=REPO,
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{signame} hung the relay: its handler waits for a lock the "
                             "main thread holds, or the signal did not wake its main loop"
                             ) from None
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_a_stop_signal_landing_while_the_main_thread_holds_a_lock_stops_the_relay(
        tmp_path: Path) -> None:
    for signame, number in (("SIGTERM", 15), ("SIGINT", 2)):
        out = _child(tmp_path, signame)
        assert f"handled {number} False" in out
        assert "woken" in out
        assert "wait returned" in out
        # Logged by the main loop, not the handler.
        assert f"{signame}: stopping (objects in hand are finished" in out


def test_a_hangup_landing_while_the_main_thread_holds_a_lock_is_noted_for_a_reload(
        tmp_path: Path) -> None:
    out = _child(tmp_path, "SIGHUP")
    assert "handled None True" in out
    assert "woken" in out
