"""What a stop wakes rather than waits out: the receive stage's inotify reads
(relay.receive.inotify) and the servers' loops (relay.ops.servers)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from pathlib import Path

from inotify_simple import flags

from peers import RelayProcess, free_port, relay_config, wait_until
from relay.ops.servers import shutdown_now
from relay.receive.inotify import WakeableINotify
from relay.receive.watch import IncomingWatcher
from relay.spool import Spool


def test_a_read_waiting_without_a_timeout_ends_when_woken(tmp_path: Path) -> None:
    watch = WakeableINotify()
    watch.add_watch(str(tmp_path), flags.CLOSE_WRITE)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(watch.read(None)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive(), "nothing happened: it is still waiting"
    watch.wake()
    reader.join(10)
    assert not reader.is_alive() and got == [[]]
    (tmp_path / "late.dcm").write_bytes(b"x")
    assert watch.read(None) == [], "once woken, every read returns at once"
    watch.close()


def test_events_are_read_as_before(tmp_path: Path) -> None:
    watch = WakeableINotify()
    watch.add_watch(str(tmp_path), flags.CLOSE_WRITE)
    assert watch.read(0) == []
    (tmp_path / "a.dcm").write_bytes(b"x")
    assert [e.name for e in watch.read(1000)] == ["a.dcm"]
    watch.close()
    watch.wake()  # after close: harmless


def test_the_watcher_stops_waiting_for_arrivals_when_woken(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    watcher = IncomingWatcher(spool)
    stop = threading.Event()
    seen: list[Path] = []
    done = threading.Event()

    def watch() -> None:
        seen.extend(watcher.paths(stop, poll_ms=3_600_000))  # an hour: only a wake ends it
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    (spool.incoming / "x.dcm").write_bytes(b"x")
    stop.set()
    watcher.wake()
    assert done.wait(10)
    # Seen by the start-up scan, the watch, both (harmless: claiming decides), or neither.
    assert {p.name for p in seen} <= {"x.dcm"}
    watcher.close()


def test_a_servers_loop_ends_without_waiting_for_its_poll() -> None:
    server = socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    loop = threading.Thread(target=server.serve_forever, args=(3600,), daemon=True)  # an hour
    loop.start()
    stopper = threading.Thread(target=shutdown_now, args=(server,), daemon=True)
    stopper.start()
    stopper.join(10)
    loop.join(10)
    assert not stopper.is_alive() and not loop.is_alive()
    server.server_close()
    shutdown_now(server)  # a closed server: nothing to wake, no error


def test_a_relay_stops_cleanly_with_a_silent_peer_connected(tmp_path: Path) -> None:
    """A connection that has sent nothing yet (pynetdicom's Sta2) when the relay stops: the
    embedded receiver hangs up on it rather than abort it (pynetdicom refuses, a traceback)
    or wait for it (its child then outlived SIGTERM, killed after 5 s)."""
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       destinations=[("sink", "SINK", free_port())])
    relay = RelayProcess(cfg, tmp_path).start()
    try:
        wait_until(lambda: "running (receive + process+send)" in relay.output(), 60,
                   what="the relay running")
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.5)  # for the receiver to take it (it logs nothing for a bare connection)
        assert relay.stop() == 0
    finally:
        relay.stop()
    silent.close()
    log = relay.output()
    assert "Traceback" not in log, log[-3000:]
    assert "did not stop on SIGTERM" not in log, "the receiving child waited for the peer"
