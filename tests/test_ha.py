"""High availability with an existing balancer, on 127.0.0.1, all real: two `dicom-relay run`
(each with its own spool) behind Debian's HAProxy, configured by `dicom-relay haproxy` (DICOM
health check), forwarding to Orthanc. A modality sends a 300-instance study through the
balancer, 20 instances per association, resending what it was not acknowledged, as
modalities do (pynetdicom, scripted). One relay is killed with SIGKILL in the middle of an
association: the survivor takes the new associations, nothing is refused; what the dead
relay had acknowledged waits in its spool and arrives once it is restarted. A relay whose
port is open but which never answers is taken out by the DICOM health check."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomdata import ct_series
from peers import ENGINES, Orthanc, RelayProcess, free_port, relay_config, spool_files, wait_until
from relay.ops.haproxy import associate_rq
from relay.ops.metrics import open_connections

pytestmark = pytest.mark.e2e

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture
def haproxy_bin() -> str:
    if not Path(HAPROXY).exists():  # a failure under REQUIRE_ALL=1 (conftest.py)
        pytest.skip("Debian's haproxy is not installed (tests/run installs it)")
    return HAPROXY


def _render(config: Path, relays: list[int], listen: int, out: Path, check: str = "dicom"
            ) -> Path:
    subprocess.run([sys.executable, "-m", "relay", "haproxy", "--config", str(config),
                    *(a for port in relays for a in ("--relay", f"127.0.0.1:{port}")),
                    "--listen", f"127.0.0.1:{listen}", "--inter", "500ms", "--run-as", "",
                    "--check", check, "--output", str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


class Modality:
    """Sends files through the balancer, `per_association` at a time; whatever got no
    success is sent again on a new association (after `pause`), until all are stored."""

    def __init__(self, port: int, files: list[Path], per_association: int = 20,
                 gap: float = 0.01) -> None:
        self.port = port
        self.pending = list(files)
        self.per_association = per_association
        self.gap = gap
        self.acknowledged: set[Path] = set()
        self.associations = 0
        self.refused = 0  # associations not established
        self.broken = 0  # associations that ended before all their objects were answered
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = AE(ae_title="CT01")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            while self.pending:
                chunk = self.pending[:self.per_association]
                assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMRELAY")
                if not assoc.is_established:
                    self.refused += 1
                    time.sleep(0.5)
                    continue
                self.associations += 1
                stored = []
                for path in chunk:
                    status = assoc.send_c_store(path) if assoc.is_established else None
                    if status is None or "Status" not in status:
                        break
                    if status.Status == 0:
                        stored.append(path)
                    time.sleep(self.gap)
                if assoc.is_established:
                    assoc.release()
                if len(stored) < len(chunk):
                    self.broken += 1
                    self.resent += len(chunk) - len(stored)
                    time.sleep(0.5)  # a modality waits a little before it tries again
                self.acknowledged.update(stored)
                self.pending = [p for p in self.pending if p not in self.acknowledged]
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.parametrize("engine", ENGINES)
def test_two_relays_behind_haproxy_survive_a_kill_9(tmp_path: Path, dcmtk: Path,
                                                    haproxy_bin: str, engine: str) -> None:
    pacs = Orthanc(tmp_path / "pacs").start()
    ports = [free_port(), free_port()]
    spools = [tmp_path / f"spool{i}" for i in (1, 2)]
    # Each relay holds a study until it is quiet for 3 s: what the killed one acknowledged
    # is still in its spool when it dies, and must arrive after its restart.
    configs = [relay_config(tmp_path / f"relay{i + 1}.toml", port=ports[i], spool=spools[i],
                            engine=engine, destinations=[("pacs", pacs.aet, pacs.dicom_port,
                                           "hold_until_stable = 3")])
               for i in (0, 1)]
    listen = free_port()
    ha_cfg = _render(configs[0], ports, listen, tmp_path / "haproxy.cfg")
    assert subprocess.run([haproxy_bin, "-c", "-f", str(ha_cfg)], capture_output=True,
                          timeout=30).returncode == 0
    relays = [RelayProcess(c, tmp_path / f"r{i}") for i, c in enumerate(configs)]
    for i, relay in enumerate(relays):
        relay.log_path.parent.mkdir()
        relay.start(ports[i])
    log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    balancer = subprocess.Popen([haproxy_bin, "-db", "-f", str(ha_cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: open_connections(listen) is not None and _listening(listen), 20,
                   what="haproxy listening")
        uids = ct_series(tmp_path / "study", 300)
        files = sorted((tmp_path / "study").iterdir())
        modality = Modality(listen, files)
        started = time.monotonic()
        thread = threading.Thread(target=modality.run)
        thread.start()
        # Kill relay 1 in the middle of the study, while an association is open on it.
        # (A health check holds a connection for a few ms; an association of 20 objects for
        # a second or more: one open for 0.2 s is the modality's.)
        since: list[float] = []

        def association_on_relay1() -> bool:
            if len(modality.acknowledged) < 100 or not open_connections(ports[0]):
                since.clear()
                return False
            since.append(time.monotonic())
            return since[-1] - since[0] >= 0.2

        wait_until(association_on_relay1, 120, interval=0.01,
                   what="an association on relay 1, a third of the way")
        relays[0].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        relays[0].proc.wait()  # type: ignore[union-attr]
        killed_at = len(modality.acknowledged)
        thread.join(timeout=300)
        assert modality.error is None, modality.error
        assert not modality.pending and len(modality.acknowledged) == 300
        sent_in = time.monotonic() - started
        # DCMTK's storescp serves each association in a forked process that outlives the
        # relay (and its storescp) by the rest of that association: the modality sees it end
        # normally, its objects are in the spool. The other receivers die with the relay.
        assert modality.broken >= 1 or engine == "dcmtk", "the kill landed in an association"
        # The survivor drains what it got; the dead relay's acknowledged objects wait.
        wait_until(lambda: not spool_files(spools[1], "out") and not spool_files(
            spools[1], "incoming"), 60, what="relay 2's spool drained")
        # Acknowledged by relay 1, waiting in its spool (DCMTK's storescp leaves complete
        # objects in receiving/, each marked .done, handed over at the next start).
        held = [p for folder in ("incoming", "work", "out") for p in spool_files(spools[0], folder)]
        held += [p.with_suffix("") for p in (spools[0] / "receiving").glob("*.done")]
        waiting = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in held}
        at_pacs = set(pacs.tags_by_sop_uid())
        assert at_pacs | waiting == set(uids), "nothing lost: at the PACS or in relay 1's spool"
        missing_before_restart = len(set(uids) - at_pacs)
        restarted = time.monotonic()
        relays[0] = RelayProcess(configs[0], tmp_path / "r0").start(ports[0])
        wait_until(lambda: set(pacs.tags_by_sop_uid()) == set(uids), 120,
                   what="every instance at Orthanc once relay 1 is back")
        drained_in = time.monotonic() - restarted
        try:
            wait_until(lambda: not spool_files(spools[0], "out"), 30, what="relay 1 drained")
        except TimeoutError as exc:
            left = [str(p.relative_to(spools[0])) for p in spool_files(spools[0], "out")]
            tail = relays[0].log_path.read_text(errors="replace").splitlines()[-40:]
            raise AssertionError(f"{exc}: left in out/: {left[:20]}; relay 1's log ends:\n"
                                 + "\n".join(tail)) from None
    finally:
        for relay in relays:
            relay.stop()
        balancer.terminate()
        balancer.wait(timeout=20)
        log.close()
        pacs.close()
    lines = (tmp_path / "haproxy.log").read_text(errors="replace").splitlines()
    # Connection log lines (tcplog) of associations: those that carried bytes (the test's
    # own check that the balancer listens carried none).
    served = [m.group(1) for line in lines
              if (m := re.search(r" dicom relays/(relay\d) \S+ (\d+) ", line)) and int(m.group(2))]
    down = next(i for i, line in enumerate(lines) if "relays/relay1 is DOWN" in line)
    # Once its check failed, every association went to the survivor, and the modality saw
    # no refusal (a connection the dead relay's closed port refuses before the check has
    # failed is tried on the other relay: retries, option redispatch).
    after = [m.group(1) for line in lines[down:] if (m := re.search(r" dicom relays/(relay\d) ",
                                                                     line))]
    assert after and set(after) == {"relay2"}, lines[down:]
    assert modality.refused == 0, "an association was refused"
    print(f"\nHA ({engine}): 300 instances, {modality.associations} associations "
          f"({served.count('relay1')} on relay 1, {served.count('relay2')} on relay 2, "
          f"{len(after)} after relay 1 was marked down, all on relay 2), "
          f"relay 1 killed after {killed_at} acknowledged; {modality.broken} association(s) "
          f"broken, {modality.resent} instance(s) resent, {modality.refused} refused; all "
          f"acknowledged in {sent_in:.1f} s; {len(waiting)} waited in relay 1's spool "
          f"({missing_before_restart} missing at the PACS until its restart, delivered "
          f"{drained_in:.1f} s after it)")


class Unanswering:
    """A relay that hangs: its port accepts connections, and nothing is ever answered."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[Any] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # kept open, never read from, never written to

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_relay_that_accepts_and_never_answers_is_taken_out(
        tmp_path: Path, dcmtk: Path, haproxy_bin: str) -> None:
    # (A killed relay closes its port, which a plain TCP check sees too; a hung one does
    # not: only an association request that gets no A-ASSOCIATE-AC tells.)
    pacs = Orthanc(tmp_path / "pacs").start()
    hung = Unanswering()
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       destinations=[("pacs", pacs.aet, pacs.dicom_port)])
    listen = free_port()
    ha_cfg = _render(cfg, [hung.port, port], listen, tmp_path / "haproxy.cfg")
    relay = RelayProcess(cfg, tmp_path).start(port)
    log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    balancer = subprocess.Popen([haproxy_bin, "-db", "-f", str(ha_cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "relays/relay1 is DOWN" in (tmp_path / "haproxy.log").read_text(
            errors="replace"), 60, what="the hung relay taken out by the DICOM check")
        uids = ct_series(tmp_path / "study", 6)
        ae = AE(ae_title="CT01")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for path in sorted((tmp_path / "study").iterdir()):  # one association each
            assoc = ae.associate("127.0.0.1", listen, ae_title="DICOMRELAY")
            assert assoc.is_established, "an association went to the hung relay"
            assert assoc.send_c_store(path).Status == 0
            assoc.release()
        wait_until(lambda: set(pacs.tags_by_sop_uid()) == set(uids), 60,
                   what="all six at the PACS through the relay that answers")
    finally:
        balancer.terminate()
        balancer.wait(timeout=20)
        log.close()
        relay.stop()
        hung.close()
        pacs.close()
    lines = (tmp_path / "haproxy.log").read_text(errors="replace").splitlines()
    down = next(i for i, line in enumerate(lines) if "relays/relay1 is DOWN" in line)
    served = [m.group(1) for line in lines[down:]
              if (m := re.search(r" dicom relays/(relay\d) ", line))]
    assert served == ["relay2"] * 6, lines[down:]


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def test_the_health_check_is_an_association_request_the_relay_accepts() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    data = associate_rq("DICOMRELAY", "HAPROXY-CHECK")
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    assert pdu.called_ae_title == "DICOMRELAY" and pdu.calling_ae_title == "HAPROXY-CHECK"
    [context] = pdu.presentation_context
    assert context.abstract_syntax == "1.2.840.10008.1.1"
    assert data[0] == 0x01 and int.from_bytes(data[2:6], "big") == len(data) - 6


def test_the_rendered_config_refuses_a_check_the_relays_would_refuse(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path / "relay.toml", port=11112, spool=tmp_path / "spool",
                       destinations=[("pacs", "PACS", 104)],
                       receiver='allowed_calling_aets = ["CT01"]')

    def render(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "haproxy", "--config", str(cfg),
                               "--relay", "10.0.0.11", "--relay", "[fd00::12]:11113", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    refused = render()
    assert refused.returncode == 2
    assert "allowed_calling_aets does not include the health check's AE title" in \
        refused.stderr
    tcp = render("--check", "tcp")
    assert tcp.returncode == 0, tcp.stderr
    assert "server relay1 10.0.0.11:11112" in tcp.stdout
    assert "server relay2 [fd00::12]:11113" in tcp.stdout
    assert "tcp-check" not in tcp.stdout and "check inter 2s" in tcp.stdout
    # Behind the balancer every connection comes from one host: the per-host share must be
    # the whole (issue 23), and the command says so.
    assert "set [receiver] max_associations_per_host = 10" in tcp.stderr
    bad = render("--check", "tcp", "--inter", "soon")
    assert bad.returncode == 2 and "--inter: expected a duration" in bad.stderr
