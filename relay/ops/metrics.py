"""Prometheus metrics (`[metrics] listen = "127.0.0.1:9110"`), with the official client.

Two kinds of figures, as Prometheus expects them:
- counters the pipeline increments as things happen (received, delivered, retried, failed,
  receive→delivered latency). They start from zero at each start, which is Prometheus'
  convention (rate() and increase() handle the reset);
- gauges read from the spool itself when scraped (queue depth and oldest queued age per
  destination, quarantined objects, held studies, associations open): the spool is the truth,
  so they are right from the first scrape after a restart, backlog included.

`dicom-relay status` prints the same figures: the gauges from the spool (`spool_figures`), the
counters from a running relay's /metrics when it serves one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay.config.model import join_host_port
from relay.events import (
    Deferred,
    Delivered,
    DestinationDown,
    Failed,
    Handler,
    Received,
    Reloaded,
    Subscriber,
    Transcoded,
    Unrouted,
)
from relay.ops.servers import shutdown_now
from relay.receive.floor import free_bytes
from relay.spool import SIDECAR_SUFFIX, Spool, is_ready

log = logging.getLogger("relay.metrics")

PREFIX = "dicom_relay"
# Counter names (without Prometheus' _total), for what reads them back (`status`).
RECEIVED = f"{PREFIX}_received_objects"
DELIVERED = f"{PREFIX}_delivered_objects"
RETRIED = f"{PREFIX}_retried_objects"
FAILED = f"{PREFIX}_failed_objects"
HTTP_STATUS = f"{PREFIX}_http_status_objects"
# A scrape: sample name -> [(labels, value)].
Samples = dict[str, list[tuple[dict[str, str], float]]]
# Receive → delivered, seconds: from a small object on an idle relay (tens of ms) to a study
# held until complete or a destination down for an hour.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


@dataclass(frozen=True)
class QueueFigures:
    destination: str
    objects: int
    oldest_age: float  # seconds since the oldest queued object was queued; 0 when empty
    configured: bool  # False: out/<name>/ of a destination no longer in the config


def spool_figures(spool: Spool, configured: list[str], now: float | None = None
                  ) -> tuple[list[QueueFigures], dict[str, int], dict[str, int]]:
    """(queue per destination, objects per spool folder, quarantined objects per reason),
    read from the folders: what is on disk, whoever put it there."""
    now = time.time() if now is None else now
    queues = []
    names = list(configured)
    if spool.out.is_dir():
        names += sorted(e.name for e in os.scandir(spool.out)
                        if e.is_dir(follow_symlinks=False) and e.name not in configured)
    for name in names:
        count, oldest = _count(spool.outbox(name))
        queues.append(QueueFigures(name, count, max(0.0, now - oldest) if count else 0.0,
                                   name in configured))
    folders = {"receiving": _count(spool.receiving)[0], "incoming": _count(spool.incoming)[0],
               "work": _count(spool.work)[0]}
    quarantined = {}
    if spool.failed.is_dir():
        for entry in os.scandir(spool.failed):
            if entry.is_dir(follow_symlinks=False):
                quarantined[entry.name] = _count(Path(entry.path))[0]
    folders["failed"] = sum(quarantined.values())
    return queues, folders, quarantined


def _count(folder: Path) -> tuple[int, float]:
    """Complete objects in a folder (no partial files, no sidecars) and the oldest mtime."""
    count, oldest = 0, float("inf")
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not is_ready(Path(entry.name)) or entry.name.endswith(SIDECAR_SUFFIX):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    oldest = min(oldest, entry.stat(follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    continue  # delivered while we looked
                count += 1
    except FileNotFoundError:
        pass
    return count, oldest


def open_connections(port: int, proc: Path = Path("/proc/net")) -> int | None:
    """Established TCP connections to a local port (each is an association, or about to be
    one), whichever process holds them: the receiver may be storescp. None off Linux."""
    return tcp_sockets(port, "01", proc)


def listening(port: int, proc: Path = Path("/proc/net")) -> bool | None:
    """Whether some process listens on a local TCP port (the receiver, whichever process
    it is); None off Linux."""
    count = tcp_sockets(port, "0A", proc)
    return None if count is None else count > 0


def tcp_sockets(port: int, state: str, proc: Path = Path("/proc/net")) -> int | None:
    """TCP sockets of a local port in a state (/proc/net/tcp's st: 01 established,
    0A listening)."""
    found = False
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st …; addresses are HEXIP:HEXPORT
            if len(fields) > 3 and fields[3] == state and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count if found else None


class Metrics(Subscriber):
    """The relay's metrics, in a registry of its own (tests run several relays in one
    process). Counted from the event stream; `serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._received = Counter(RECEIVED, "Objects received and "
                                 "processed, by calling AE title", ["calling_ae"], registry=r)
        self._received_bytes = Counter(f"{PREFIX}_received_bytes", "Bytes of the objects "
                                       "received, by calling AE title", ["calling_ae"],
                                       registry=r)
        self._delivered = Counter(DELIVERED, "Objects a destination "
                                  "confirmed (C-STORE success or a warning that means stored)",
                                  ["destination"], registry=r)
        self._retried = Counter(RETRIED, "Sends that will be tried again, "
                                "by destination and reason", ["destination", "reason"],
                                registry=r)
        self._failed = Counter(FAILED, "Objects quarantined in failed/, by "
                               "destination ('' before routing) and reason",
                               ["destination", "reason"], registry=r)
        self._latency = Histogram(f"{PREFIX}_delivery_latency_seconds", "From the object's "
                                  "arrival in the spool to its destination's confirmation",
                                  ["destination"], buckets=LATENCY_BUCKETS, registry=r)
        self._http = Counter(HTTP_STATUS, "Objects sent to a DICOMweb "
                             "destination, by the HTTP status of their STOW-RS request",
                             ["destination", "code"], registry=r)
        self._transcoded = Counter(f"{PREFIX}_transcoded_objects", "Objects decompressed for "
                                   "a destination that refused their transfer syntax",
                                   ["destination"], registry=r)
        self._reloads = Counter(f"{PREFIX}_config_reloads", "Configuration reloads (SIGHUP), "
                                "by result", ["result"], registry=r)
        self._server: Any = None
        self._calling_aes: set[str] = set()
        self._labels_lock = threading.Lock()

    # --- the event stream ------------------------------------------------------------------

    def handlers(self) -> list[tuple[type[Any], Handler]]:
        return [(Received, self._on_received), (Delivered, self._on_delivered),
                (Deferred, self._on_deferred), (DestinationDown, self._on_down),
                (Failed, self._on_failed), (Unrouted, self._on_unrouted),
                (Transcoded, self._on_transcoded), (Reloaded, self._on_reloaded)]

    def _on_received(self, e: Received) -> None:
        self.received(e.calling_ae or "", e.size)

    def _on_delivered(self, e: Delivered) -> None:
        self.delivered(e.destination, e.latency)
        self._count_http(e.destination, e.http_status)

    def _on_deferred(self, e: Deferred) -> None:
        self.retried(e.destination, e.reason)
        self._count_http(e.destination, e.http_status)

    def _on_down(self, e: DestinationDown) -> None:
        self.retried(e.destination, "local-failure" if e.local_failure else "unavailable",
                     e.sent)
        for code in e.http_statuses:
            self.http_status(e.destination, code)

    def _on_failed(self, e: Failed) -> None:
        self.failed(e.destination or "", e.reason)
        self._count_http(e.destination or "", e.http_status)

    def _on_unrouted(self, e: Unrouted) -> None:
        if e.kept:
            self.failed("", "unrouted")

    def _on_transcoded(self, e: Transcoded) -> None:
        self.transcoded(e.destination)

    def _on_reloaded(self, e: Reloaded) -> None:
        self.reloaded(e.applied)

    def _count_http(self, destination: str, code: int | None) -> None:
        if code is not None:
            self.http_status(destination, code)

    # --- the counters ----------------------------------------------------------------------

    def received(self, calling_ae: str, size: int) -> None:
        label = self._calling_ae_label(calling_ae)
        self._received.labels(label).inc()
        self._received_bytes.labels(label).inc(size)

    def _calling_ae_label(self, calling_ae: str) -> str:
        """The calling AE as a label value: every AE title a peer chooses would be a new
        series (150 AEs gave 600), so past MAX_CALLING_AES they fold into one; AE titles
        that are not printable text are one label too."""
        if not calling_ae.isascii() or not calling_ae.isprintable() or "\\" in calling_ae:
            return INVALID_AE
        with self._labels_lock:
            if calling_ae in self._calling_aes:
                return calling_ae
            if len(self._calling_aes) >= MAX_CALLING_AES:
                return OTHER_AES
            self._calling_aes.add(calling_ae)
            return calling_ae

    def delivered(self, destination: str, latency: float | None) -> None:
        self._delivered.labels(destination).inc()
        if latency is not None:
            self._latency.labels(destination).observe(max(0.0, latency))

    def retried(self, destination: str, reason: str, count: int = 1) -> None:
        self._retried.labels(destination, reason).inc(count)

    def failed(self, destination: str, reason: str) -> None:
        self._failed.labels(destination, reason).inc()

    def http_status(self, destination: str, code: int) -> None:
        self._http.labels(destination, str(code)).inc()

    def transcoded(self, destination: str) -> None:
        self._transcoded.labels(destination).inc()

    def reloaded(self, ok: bool) -> None:
        self._reloads.labels("applied" if ok else "refused").inc()

    # --- the scrape-time view of the running relay -----------------------------------------

    def watch(self, state: Callable[[], RelayState]) -> None:
        """Register the gauges read at each scrape from the running relay and its spool."""
        self.registry.register(_StateCollector(state))

    def serve(self, listen: tuple[str, int]) -> None:
        """Serve /metrics on (host, port) in a thread; OSError when the port is taken."""
        server = BoundedHTTPServer(listen, MetricsHandler.factory(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        log.info("metrics at http://%s/metrics", join_host_port(*listen))

    def close(self) -> None:
        if self._server is not None:
            shutdown_now(self._server)
            self._server.server_close()
            self._server = None


# Calling AE titles that get a label of their own; the others are counted under OTHER_AES.
MAX_CALLING_AES = 64
OTHER_AES = "(other)"
INVALID_AE = "(invalid)"


class BoundedHTTPServer(ThreadingHTTPServer):
    """prometheus_client's server has no timeout and a thread per connection: 400 requests
    left unfinished held 409 threads for 30 s and more, and 1021 of them used up the file
    descriptors the pipeline needed. Here a request must come within REQUEST_TIMEOUT, and at
    most MAX_REQUESTS are served at once (the others are closed at once)."""

    daemon_threads = True
    block_on_close = False
    MAX_REQUESTS = 8
    REQUEST_TIMEOUT = 5.0

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        handler.timeout = self.REQUEST_TIMEOUT  # StreamRequestHandler: the socket's timeout
        self._slots = threading.BoundedSemaphore(self.MAX_REQUESTS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the scraper tries again
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass
class RelayState:
    """What the gauges read at scrape time (a callback builds it from the running relay)."""

    spool: Spool
    destinations: list[str]
    held: dict[str, int]  # destination → studies held
    receiver_port: int | None  # None: this process does not receive
    receiver_restarts: int
    version: str
    engine: str
    floor: int = 0  # bytes the receiver keeps free ([spool] min_free_mb, or its default)
    # Storage commitment ([commitment]): transactions pending, instances reported committed,
    # reported failed (None: not served).
    commitment: tuple[int, int, int] | None = None


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], RelayState]) -> None:
        self.state = state
        self._lock = threading.Lock()  # scrapes may overlap; the folders are read once each

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        with self._lock:
            s = self.state()
            queues, folders, quarantined = spool_figures(s.spool, s.destinations)
        depth = GaugeMetricFamily(f"{PREFIX}_queued_objects", "Objects waiting in out/<dest>/ "
                                  "(configured: 0 for a destination no longer configured)",
                                  labels=["destination", "configured"])
        age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest "
                                "object waiting for the destination (0: none waiting)",
                                labels=["destination"])
        for q in queues:
            depth.add_metric([q.destination, "1" if q.configured else "0"], q.objects)
            age.add_metric([q.destination], q.oldest_age)
        yield depth
        yield age
        spool = GaugeMetricFamily(f"{PREFIX}_spool_objects", "Objects in the spool's "
                                  "receiving/, incoming/, work/ and failed/ folders",
                                  labels=["folder"])
        for folder, count in folders.items():
            spool.add_metric([folder], count)
        yield spool
        failed = GaugeMetricFamily(f"{PREFIX}_quarantined_objects", "Objects in failed/, by "
                                   "reason (sub-folder)", labels=["reason"])
        for reason, count in sorted(quarantined.items()):
            failed.add_metric([reason], count)
        yield failed
        held = GaugeMetricFamily(f"{PREFIX}_held_studies", "Studies held until complete "
                                 "(hold_until_stable)", labels=["destination"])
        for dest, count in s.held.items():
            held.add_metric([dest], count)
        yield held
        paused = s.spool.paused()
        pause = GaugeMetricFamily(f"{PREFIX}_destination_paused", "1: sending to the "
                                  "destination is paused (the console, the API); its queue "
                                  "fills", labels=["destination"])
        for dest in s.destinations:
            pause.add_metric([dest], 1 if dest in paused else 0)
        yield pause
        if s.receiver_port is not None:
            connections = open_connections(s.receiver_port)
            if connections is not None:
                yield GaugeMetricFamily(f"{PREFIX}_associations_open", "TCP connections open "
                                        "on the receiver's port (associations)",
                                        value=connections)
            yield CounterMetricFamily(f"{PREFIX}_receiver_restarts", "Times the receiver "
                                      "process died and was restarted", value=s.receiver_restarts)
        try:
            free = free_bytes(s.spool.root)
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free space on the spool's "
                                    "file system", value=free)
            yield GaugeMetricFamily(f"{PREFIX}_spool_free_floor_bytes", "Below this much free "
                                    "space the receiver takes no new object "
                                    "([spool] min_free_mb)", value=s.floor)
        if s.commitment is not None:
            pending, committed, not_committed = s.commitment
            yield GaugeMetricFamily(f"{PREFIX}_commitment_pending_transactions", "Storage "
                                    "commitment requests not reported yet", value=pending)
            yield CounterMetricFamily(f"{PREFIX}_commitment_committed_instances", "Instances "
                                      "reported committed to the modalities that asked",
                                      value=committed)
            yield CounterMetricFamily(f"{PREFIX}_commitment_failed_instances", "Instances "
                                      "reported failed (Failed SOP Sequence)",
                                      value=not_committed)
        info = InfoMetricFamily(f"{PREFIX}_build", "Version and engine of the running relay")
        info.add_metric([], {"version": s.version, "engine": s.engine})
        yield info


def scrape(listen: tuple[str, int], timeout: float = 5.0) -> Samples:
    """A running relay's /metrics: sample name → [(labels, value)]. OSError when none
    answers."""
    host, port = listen
    if host in ("0.0.0.0", ""):  # noqa: S104
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    url = f"http://{join_host_port(host, port)}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only
        text = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def counters(samples: Samples) -> dict[tuple[str, str], float]:
    """(delivered|retried|failed|received, destination or calling AE) -> count, from a
    scrape; {} when the relay serves no metrics."""
    if not samples:
        return {}
    counts: dict[tuple[str, str], float] = {}
    for what, name, label in (("delivered", DELIVERED, "destination"),
                              ("retried", RETRIED, "destination"),
                              ("failed", FAILED, "destination"),
                              ("received", RECEIVED, "calling_ae")):
        for labels, value in samples.get(f"{name}_total", []):
            key = (what, labels.get(label, ""))
            counts[key] = counts.get(key, 0) + value
    return counts or {("delivered", ""): 0}


def http_statuses(samples: Samples) -> dict[str, dict[str, float]]:
    """DICOMweb destination -> HTTP status -> objects, from a scrape."""
    found: dict[str, dict[str, float]] = {}
    for labels, value in samples.get(f"{HTTP_STATUS}_total", []):
        found.setdefault(labels.get("destination", ""), {})[labels.get("code", "?")] = value
    return found
