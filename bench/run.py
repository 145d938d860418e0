"""dicom-relay benchmark: the same generated data through each scenario, in one run, on
127.0.0.1, timed from the first byte sent until the last instance is stored at the sink.

    .venv/bin/python bench/run.py            # the full run (minutes) -> bench/RESULTS.md
    .venv/bin/python bench/run.py --smoke    # tiny sizes, for CI: shape, not speed

Scenarios (sink: DCMTK storescp unless said otherwise):
  direct           dcmsend -> sink (and -> Orthanc)
  relay-embedded   dcmsend -> dicom-relay (embedded engine, PatientID := EthnicGroup) -> sink
  relay-dcmtk      the same on the DCMTK engine
  relay-dcm4che    the same on the dcm4che engine, wherever a toolkit is found (DCM4CHE_HOME,
                   /opt/dcm4che-toolkit, or ../shared/dcm4che-5.24.0 beside the checkout)
  dcm4che-toolkit  the dcm4che engine with converter = "toolkit" (dcm2xml -> rules -> xml2dcm
                   in its JVM), small objects
  per-file         the original relay's shape, rebuilt with the installed toolkit: storescp
                   receives; per file dcm2xml -> xmllint (read EthnicGroup) -> dcmodify (write
                   PatientID) -> storescu (send one file) -> delete
  orthanc-router   Orthanc with a Lua OnStoredInstance: modify PatientID, send to the sink,
                   delete (the recipe in design.md)
Data sets: small (CT_small copies, new UIDs), large (multi-frame, >= 20 MB each), a backlog
already in the relay's spool at start-up, and a steady stream (a modality sending 20 objects a
second). Latency per instance: stored in the relay's spool -> stored at the sink (p50, p99),
from the audit log and the sink's file times. CPU seconds are given for the relay, the sender
(dcmsend) and the sink (storescp), to show how the shared cores are split.
The machine is shared by sender, relay and sink (2 cores): read ratios, not absolute figures.
Nothing here asserts a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # relay, without installing

from inotify_simple import INotify, flags  # noqa: E402
from pydicom import dcmread  # noqa: E402

from dicomdata import ct_series, multiframe_ct  # noqa: E402
from peers import (  # noqa: E402
    DCM4CHE_HOME,
    DCMTK_BIN,
    EG_RULE,
    Orthanc,
    RelayProcess,
    dcmtk_env,
    free_port,
    proc_stats,
    relay_config,
    wait_for_port,
    wait_until,
)

HERE = Path(__file__).resolve().parent
STREAM_RATE = 20.0  # objects per second of the steady stream: well below every engine's rate


@dataclass
class Row:
    scenario: str
    data: str
    instances: int
    seconds: float
    megabytes: float
    ratio: float | None = None
    rss_mb: float | None = None
    cpu_s: float | None = None
    sender_cpu_s: float | None = None
    sink_cpu_s: float | None = None
    latency: tuple[float, float] | None = None  # p50, p99 seconds
    note: str = ""


class Sink:
    """DCMTK storescp writing each object under its UID; counts what arrived."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.inotify = INotify()
        self.inotify.add_watch(str(folder), flags.CLOSE_WRITE)
        self.stored = 0
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(DCMTK_BIN / "storescp"), "--aetitle", "SINK", "--accept-all",
             "--output-directory", str(folder), str(self.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)

    def count(self) -> int:
        """Objects stored so far. Counted from inotify events, not by listing the folder: a
        listing of 10,000 files 50 times a second would itself load the shared cores."""
        for event in self.inotify.read(timeout=0):
            if event.name:
                self.stored += 1
        return self.stored

    def times(self) -> dict[str, float]:
        """SOP Instance UID -> when it was stored (the file's mtime)."""
        out = {}
        for entry in os.scandir(self.folder):
            uid = entry.name.split(".", 1)[1] if "." in entry.name else entry.name
            out[uid] = entry.stat().st_mtime
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.inotify.close()


def dcmsend(files: list[Path], port: int, aec: str) -> float:
    """Send like a modality; returns the CPU seconds dcmsend used."""
    argv = [str(DCMTK_BIN / "dcmsend"), "-aec", aec, "--no-halt", "127.0.0.1", str(port),
            *map(str, files)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(argv, env=dcmtk_env(), check=False, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=3600)
    if result.returncode != 0:  # what dcmsend said, not only its exit code
        raise RuntimeError(f"dcmsend to port {port} exited {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stream_send(files: list[Path], port: int, per_second: float) -> None:
    """A modality sending at a steady rate, one object every 1/per_second s, one association
    (pynetdicom, TCP_NODELAY, sending each file from disk as it is)."""
    from pynetdicom import AE, evt

    import relay.toolkits.embedded  # noqa: F401 - turns on chunked sending
    from relay.toolkits.associations import set_nodelay

    ae = AE("MODALITY")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY",
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    due = time.monotonic()
    for path in files:
        time.sleep(max(0.0, due - time.monotonic()))
        assoc.send_c_store(path)
        due += 1 / per_second
    assoc.release()


def megabytes(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def large_set(folder: Path, count: int, mb: int) -> list[Path]:
    files = [folder / f"big{i:03d}.dcm" for i in range(count)]
    for path in files:
        multiframe_ct(path, mb)
    return files


def latencies(audit: Path, sink: Sink) -> tuple[float, float] | None:
    """p50 and p99 of (stored at the sink) - (stored in the relay's spool), per instance."""
    arrived = {}
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] == "received" and "arrived" in entry:
            arrived[entry["sop_instance_uid"]] = entry["arrived"]
    stored = sink.times()
    values = sorted(stored[uid] - t for uid, t in arrived.items() if uid in stored)
    if len(values) < 2:
        return None
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))]


def run_direct(work: Path, files: list[Path], data: str) -> list[Row]:
    rows = []
    sink = Sink(work / "direct-sink")
    started = time.monotonic()
    sender_cpu = dcmsend(files, sink.port, "SINK")
    wait_until(lambda: sink.count() >= len(files), 600, interval=0.01)
    rows.append(Row("direct: dcmsend -> storescp", data, len(files),
                    time.monotonic() - started, megabytes(files), sender_cpu_s=sender_cpu,
                    sink_cpu_s=proc_stats(sink.proc.pid)[1]))
    sink.close()
    if data == "small":
        rows.append(direct_to_orthanc(work / "direct-orthanc", files, data,
                                      "direct: dcmsend -> Orthanc"))
    return rows


def direct_to_orthanc(folder: Path, files: list[Path], data: str, scenario: str) -> Row:
    """dcmsend's C-STORE straight to a new, empty Orthanc, until it has them all."""
    pacs = Orthanc(Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name))).start()
    started = time.monotonic()
    dcmsend(files, pacs.dicom_port, pacs.aet)
    wait_until(lambda: int(pacs.rest("/statistics")["CountInstances"]) >= len(files), 600,
               interval=0.02)
    row = Row(scenario, data, len(files), time.monotonic() - started, megabytes(files))
    pacs.close()
    return row


def run_relay(work: Path, engine: str, files: list[Path], data: str,
              backlog: bool = False, stream: float | None = None,
              converter: str = "embedded") -> Row:
    tag = f"{engine}-{converter}-{data}"
    sink = Sink(work / f"sink-{tag}")
    port = free_port()
    spool = work / f"spool-{tag}"
    cfg = relay_config(work / f"relay-{tag}.toml", port=port, spool=spool, engine=engine,
                       converter=converter, rules=EG_RULE,
                       destinations=[("sink", "SINK", sink.port)])
    first_forwarded = None
    if backlog:
        # Already queued at start-up: put into incoming/ as a receiver would have.
        (spool / "incoming").mkdir(parents=True)
        for f in files:
            os.link(f, spool / "incoming" / f.name)
        started = time.monotonic()
        relay = RelayProcess(cfg, work).start(port)
        wait_until(lambda: sink.count() >= 1, 600, interval=0.01)
        first_forwarded = time.monotonic() - started
    sender_cpu = None
    if not backlog:
        relay = RelayProcess(cfg, work).start(port)
        started = time.monotonic()
        if stream:
            stream_send(files, port, stream)
        else:
            sender_cpu = dcmsend(files, port, "DICOMRELAY")
    wait_until(lambda: sink.count() >= len(files), 3600, interval=0.02)
    seconds = time.monotonic() - started
    assert relay.proc is not None
    rss, cpu = proc_stats(relay.proc.pid)
    relay.stop()
    name = engine if converter == "embedded" else f"{engine}, converter {converter}"
    row = Row(f"relay ({name})", data, len(files), seconds, megabytes(files), rss_mb=rss,
              cpu_s=cpu, sender_cpu_s=sender_cpu, sink_cpu_s=proc_stats(sink.proc.pid)[1],
              latency=None if backlog else latencies(spool / "audit.jsonl", sink))
    if first_forwarded is not None:
        row.note = f"first forwarded after {first_forwarded:.2f} s"
    if stream:
        row.note = f"a steady {stream:g} objects/s from the modality"
    sink.close()
    return row


def run_per_file(work: Path, files: list[Path], data: str) -> Row:
    """The original relay's shape with the installed toolkit: one tool launch per step."""
    sink = Sink(work / f"sink-perfile-{data}")
    inbox = work / f"perfile-in-{data}"
    inbox.mkdir()
    port = free_port()
    receiver = subprocess.Popen(
        [str(DCMTK_BIN / "storescp"), "--aetitle", "DICOMRELAY", "--accept-all",
         "--output-directory", str(inbox), str(port)], env=dcmtk_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=receiver)
    started = time.monotonic()
    sender = subprocess.Popen([str(DCMTK_BIN / "dcmsend"), "-aec", "DICOMRELAY", "--no-halt",
                               "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    seen: set[str] = set()
    while done < len(files):
        ready = [e for e in os.scandir(inbox) if e.name not in seen]
        if not ready:
            time.sleep(0.01)
            continue
        for entry in ready:
            seen.add(entry.name)
            path = Path(entry.path)
            xml = path.with_suffix(".xml")
            run = dict(env=dcmtk_env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
            subprocess.run([str(DCMTK_BIN / "dcm2xml"), str(path), str(xml)], **run)
            value = subprocess.run(["xmllint", "--xpath",
                                    'string(//element[@name="EthnicGroup"])', str(xml)],
                                   capture_output=True, text=True, check=True).stdout
            subprocess.run([str(DCMTK_BIN / "dcmodify"), "-nb", "-m",
                            f"(0010,0020)={value}", str(path)], **run)
            subprocess.run([str(DCMTK_BIN / "storescu"), "-aec", "SINK", "127.0.0.1",
                            str(sink.port), str(path)], **run)
            path.unlink()
            xml.unlink()
            done += 1
    wait_until(lambda: sink.count() >= len(files), 600, interval=0.02)
    seconds = time.monotonic() - started
    sender.wait(timeout=60)
    receiver.terminate()
    receiver.wait(timeout=10)
    sink.close()
    return Row("original per-file pipeline (DCMTK tools)", data, len(files), seconds,
               megabytes(files))


LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'Lua' then return end
  local eg = tags['EthnicGroup']
  local body = '{"Replace": {"PatientID": "' .. eg .. '"}, "Force": true, ' ..
    '"Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]}'
  local modified = RestApiPost('/instances/' .. instanceId .. '/modify', body)
  local stored = ParseJson(RestApiPost('/instances', modified))
  SendToModality(stored['ID'], 'sink')
  Delete(stored['ID'])
  Delete(instanceId)
end
"""


def run_stow(work: Path, files: list[Path], data: str) -> list[Row]:
    """Orthanc reached two ways in the same run: dcmsend's C-STORE straight to it, and the
    relay (embedded engine) forwarding by STOW-RS to its DICOMweb plugin."""
    rows = [direct_to_orthanc(work / f"stow-direct-{data}", files, data,
                              "direct: dcmsend -> Orthanc (C-STORE)")]
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"stow-{data}-"))  # empty for each run
    archive = Orthanc(run / "archive", dicomweb=True).start()
    port = free_port()
    spool = run / "spool"
    cfg = relay_config(run / "relay.toml", port=port, spool=spool,
                       rules=EG_RULE, destinations=[])
    archive_url = archive.dicomweb_url
    cfg.write_text(cfg.read_text() + f'\n[[destinations]]\nname = "archive"\n'
                   f'url = "{archive_url}"\n')
    relay = RelayProcess(cfg, run).start(port)
    started = time.monotonic()
    sender_cpu = dcmsend(files, port, "DICOMRELAY")
    wait_until(lambda: int(archive.rest("/statistics")["CountInstances"]) >= len(files), 600,
               interval=0.02)
    seconds = time.monotonic() - started
    assert relay.proc is not None
    rss, cpu = proc_stats(relay.proc.pid)
    relay.stop()
    archive.close()
    rows.append(Row("relay (embedded) -> Orthanc (STOW-RS)", data, len(files), seconds,
                    megabytes(files), rss_mb=rss, cpu_s=cpu, sender_cpu_s=sender_cpu,
                    note=f"{rows[0].seconds / seconds:.2f}x the throughput of the direct "
                         "C-STORE to Orthanc in the same run (receive, edit and send on the "
                         "same 2 cores as Orthanc)"))
    # The sending stage alone, from disk like dcmsend: `dicom-relay send` to the archive.
    archive = Orthanc(run / "archive2", dicomweb=True).start()
    cfg.write_text(cfg.read_text().replace(archive_url, archive.dicomweb_url))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "relay", "send", "--config", str(cfg), "archive",
                    *map(str, files)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    wait_until(lambda: int(archive.rest("/statistics")["CountInstances"]) >= len(files), 600,
               interval=0.02)
    seconds = time.monotonic() - started
    archive.close()
    rows.append(Row("dicom-relay send -> Orthanc (STOW-RS)", data, len(files), seconds,
                    megabytes(files),
                    note=f"{rows[0].seconds / seconds:.2f}x the throughput of the direct "
                         "C-STORE to Orthanc in the same run (both from disk, Python's "
                         "start-up included)"))
    return rows


def run_orthanc_router(work: Path, files: list[Path], data: str) -> Row:
    sink = Sink(work / f"sink-orthanc-{data}")
    folder = work / f"router-{data}"
    pacs = Orthanc(folder, aet="ROUTER")
    lua = folder / "route.lua"
    lua.write_text(LUA)
    config = json.loads(pacs.config_path.read_text())
    config["LuaScripts"] = [str(lua)]
    config["DicomModalities"] = {"sink": ["SINK", "127.0.0.1", sink.port]}
    pacs.config_path.write_text(json.dumps(config))
    pacs.start()
    started = time.monotonic()
    dcmsend(files, pacs.dicom_port, "ROUTER")
    wait_until(lambda: sink.count() >= len(files), 3600, interval=0.05)
    seconds = time.monotonic() - started
    pacs.close()
    sink.close()
    return Row("Orthanc auto-router (Lua)", data, len(files), seconds, megabytes(files))


def _cpu(r: Row) -> str:
    parts = [r.cpu_s, r.sender_cpu_s, r.sink_cpu_s]
    if all(p is None for p in parts):
        return ""
    return " / ".join("-" if p is None else f"{p:.1f}" for p in parts)


def table(rows: list[Row]) -> str:
    lines = ["| scenario | data | instances | seconds | instances/s | MB/s | ratio to direct "
             "(storescp) | relay peak RSS MB | CPU s: relay / sender / sink | "
             "latency p50 / p99 s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r.latency[0]:.3f} / {r.latency[1]:.3f}" if r.latency else ""
        lines.append(
            f"| {r.scenario} | {r.data} | {r.instances} | {r.seconds:.2f} | "
            f"{r.instances / r.seconds:.1f} | {r.megabytes / r.seconds:.1f} | "
            f"{'' if r.ratio is None else f'{r.ratio:.2f}'} | "
            f"{'' if r.rss_mb is None else f'{r.rss_mb:.0f}'} | "
            f"{_cpu(r)} | {lat} | {r.note} |")
    return "\n".join(lines)


def median_rows(results: list[Row], runs: int) -> list[Row]:
    """Per scenario, the run whose time is the median of `runs` (all its figures from that
    one run), noted with the spread."""
    if runs == 1:
        return results
    by_scenario: dict[tuple[str, str], list[Row]] = {}
    for row in results:
        by_scenario.setdefault((row.scenario, row.data), []).append(row)
    kept = []
    for group in by_scenario.values():
        group.sort(key=lambda r: r.seconds)
        median = group[len(group) // 2]
        spread = ", ".join(f"{r.seconds:.2f}" for r in group)
        median.note = "; ".join(filter(None, [median.note,
                                              f"median of {len(group)} runs ({spread} s)"]))
        kept.append(median)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description="dicom-relay benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--output", type=Path, help="Markdown file for the results "
                        "(default bench/RESULTS.md, none with --smoke)")
    parser.add_argument("--repeat", type=int, default=None, help="runs of each small and "
                        "large scenario, the median reported (default 3, 1 with --smoke): "
                        "these machines are noisy")
    parser.add_argument("--only", action="append", help="run only the scenarios whose "
                        "name starts with this (direct, embedded, dcmtk, dcm4che, dcm4che-toolkit, "
                        "per-file, orthanc-router, stow); repeatable")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.smoke else 3)
    small_n, large_n, large_mb, backlog_n, perfile_n, stream_n = (
        (20, 2, 2, 60, 10, 10) if args.smoke else (500, 20, 24, 10000, 100, 200))
    engines = ["embedded", "dcmtk"] + (["dcm4che"] if DCM4CHE_HOME is not None else [])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dicom-relay-bench-") as tmp:
        work = Path(tmp)
        ct_series(work / "small", small_n)
        small = sorted((work / "small").iterdir())
        large = large_set(work / "large", large_n, large_mb)
        ct_series(work / "backlog", backlog_n)
        backlog = sorted((work / "backlog").iterdir())
        ct_series(work / "stream", stream_n)
        stream = sorted((work / "stream").iterdir())

        # (name, step, runs): the short scenarios run `repeat` times, the median is kept.
        plan: list[tuple[str, Callable[[], list[Row] | Row], int]] = [
            ("direct small", lambda: run_direct(work, small, "small"), repeat),
            ("direct large", lambda: run_direct(work, large, "large"), repeat),
        ]
        for engine in engines:
            plan += [(f"{engine} small", lambda e=engine: run_relay(work, e, small, "small"),
                      repeat),
                     (f"{engine} stream", lambda e=engine: run_relay(
                         work, e, stream, "stream", stream=STREAM_RATE), 1),
                     (f"{engine} large", lambda e=engine: run_relay(work, e, large, "large"),
                      repeat),
                     (f"{engine} backlog", lambda e=engine: run_relay(
                         work, e, backlog, "backlog", backlog=True), 1)]
        if "dcm4che" in engines:
            # The original scripts' own shape (dcm2xml -> XPath -> xml2dcm) in dcm4che's JVM.
            plan += [("dcm4che-toolkit small", lambda: run_relay(
                work, "dcm4che", small, "small", converter="toolkit"), repeat)]
        plan += [("per-file", lambda: run_per_file(work, small[:perfile_n], "small"), 1),
                 ("orthanc-router", lambda: run_orthanc_router(work, small, "small"), 1),
                 ("stow", lambda: run_stow(work, small, "small"), repeat)]
        if args.only:
            plan = [step for step in plan if any(step[0].startswith(o) for o in args.only)]
        for name, step, runs in plan:
            results: list[Row] = []
            for run in range(runs):
                print(f"bench: {name} ({run + 1}/{runs}) ...", file=sys.stderr, flush=True)
                result = step()
                results += result if isinstance(result, list) else [result]
            rows += median_rows(results, runs)

    direct = {r.data: r.seconds / r.instances for r in rows
              if r.scenario == "direct: dcmsend -> storescp"}
    if "small" in direct:
        direct["backlog"] = direct["small"]
    for r in rows:
        if r.data in direct:
            r.ratio = (r.seconds / r.instances) / direct[r.data]
    text = table(rows)
    print(text)
    if args.output or not args.smoke:
        out = args.output or HERE / "RESULTS.md"
        machine = (f"{platform.node()}: {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                   f"{platform.platform()}, Python {platform.python_version()}")
        out.write_text(f"# Benchmark results\n\n{datetime.now():%Y-%m-%d %H:%M}, {machine}.\n"
                       f"Data: small = {small_n} x CT_small (39 KB), large = {large_n} x "
                       f"{large_mb} MB multi-frame, backlog = {backlog_n} x CT_small queued at "
                       f"start-up; the per-file pipeline ran on the first {perfile_n} small "
                       "instances (ratios are per instance). Ratio: time per instance over the "
                       "direct dcmsend -> storescp send of the same data in the same run. "
                       "Sender, relay and sink share the machine's cores.\n\n"
                       f"{text}\n")
        print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
