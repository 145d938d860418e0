"""What a stop wakes rather than waits out: the receive stage's inotify reads
(relay.receive.inotify) and the servers' loops (relay.servers)."""

from __future__ import annotations

import socketserver
import threading
from pathlib import Path

from inotify_simple import flags

from relay.receive.inotify import WakeableINotify
from relay.receive.watch import IncomingWatcher
from relay.servers import shutdown_now
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
    assert [p.name for p in seen] in ([], ["x.dcm"])
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
