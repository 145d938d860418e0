"""The console's and the history's goals, measured (nothing asserted):

  history on against off: 500 small objects through the embedded engine, time until all are
      at the sink, alternating runs (goal: on <= 1.05 x off)
  study search over 100,000 studies (1,000,000 events): p50 / p95 of the searches the
      console makes (PatientID, AccessionNumber, a name's beginning, the latest studies), on
      SQLite and on PostgreSQL (goal: p95 <= 100 ms)
  the overview page with that history: p50 / p95 of GET / (goal: <= 200 ms)

    .venv/bin/python bench/history.py            # the full run (minutes)
    .venv/bin/python bench/history.py --smoke    # tiny sizes, for CI: shape, not speed
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
from run import Sink, dcmsend  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from dicomdata import ct_series  # noqa: E402
from peers import (  # noqa: E402
    EG_RULE,
    PG_BIN,
    PostgreSQL,
    RelayProcess,
    free_port,
    relay_config,
    wait_for_port,
    wait_until,
)
from relay.history.schema import deliveries, events, objects, studies  # noqa: E402
from relay.history.store import HistoryStore, sqlite_url  # noqa: E402

UID = "1.2.826.0.1.3680043.9.7"
STEPS = ("received", "edited", "routed", "queued", "delivered")


def relay_run(work: Path, files: list[Path], history: bool, tag: str) -> float:
    sink = Sink(work / f"sink-{tag}")
    port = free_port()
    cfg = relay_config(work / f"relay-{tag}.toml", port=port, spool=work / f"spool-{tag}",
                       rules=EG_RULE, destinations=[("sink", "SINK", sink.port)],
                       extra=f"[history]\nenabled = {'true' if history else 'false'}\n")
    relay = RelayProcess(cfg, work).start(port)
    started = time.monotonic()
    dcmsend(files, port, "DICOMRELAY")
    wait_until(lambda: sink.count() >= len(files), 3600, interval=0.02)
    seconds = time.monotonic() - started
    relay.stop()
    sink.close()
    return seconds


def fill(store: HistoryStore, count: int) -> None:
    """`count` studies of 2 objects, 5 events each (10 events a study), two relays."""
    store.upgrade()
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    now = time.time()
    chunk = 5000
    with store.engine.begin() as conn:
        for start in range(0, count, chunk):
            st, ob, de, ev = [], [], [], []
            for n in range(start, min(count, start + chunk)):
                uid = f"{UID}.{n}"
                t = now - (count - n) * 30  # one study every 30 s, the newest now
                name = f"{rng.choice(['Garcia', 'Lopez', 'Perez', 'Diaz', 'Ruiz'])}{n}^Ana"
                st.append({"study_instance_uid": uid, "patient_id": f"P{n}",
                           "patient_id_sent": f"MRN{n}", "patient_name": name,
                           "patient_name_folded": name.casefold(),
                           "accession_number": f"A{n}", "calling_ae": "CT01",
                           "first_received": t, "last_event": t + 5})
                for i in range(2):
                    obj = f"{uid}.{i}~x.dcm"
                    relay = "relay-a" if n % 2 else "relay-b"
                    ob.append({"relay": relay, "obj": obj, "sop_instance_uid": f"{uid}.{i}",
                               "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                               "series_instance_uid": f"{uid}.9", "study_instance_uid": uid,
                               "modality": "CT", "calling_ae": "CT01", "size": 40000,
                               "received": t, "state": "received", "updated": t + 5})
                    de.append({"relay": relay, "obj": obj, "destination": "pacs",
                               "state": "delivered", "status": "0x0000", "updated": t + 5})
                    for k, step in enumerate(STEPS):
                        ev.append({"relay": relay, "time": t + k, "step": step, "obj": obj,
                                   "destination": "pacs" if k >= 3 else None,
                                   "status": "0x0000" if step == "delivered" else None,
                                   "reason": None, "detail": None, "actor": None})
            for table, rows in ((studies, st), (objects, ob), (deliveries, de), (events, ev)):
                conn.execute(insert(table), rows)


def timed(call: object, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def page(store: HistoryStore, uid: str) -> None:
    store.study(uid)
    store.timeline(uid)


def searches(store: HistoryStore, count: int, repeat: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(3)  # noqa: S311 - test data, not secrets
    return {
        "PatientID": timed(lambda: store.search(f"P{rng.randrange(count)}"), repeat),
        "PatientID as sent": timed(lambda: store.search(f"MRN{rng.randrange(count)}"), repeat),
        "AccessionNumber": timed(lambda: store.search(f"A{rng.randrange(count)}"), repeat),
        "a name's beginning": timed(lambda: store.search(
            f"{rng.choice(['garcia', 'lopez', 'perez'])}{rng.randrange(1, 10)}"), repeat),
        "latest (empty search)": timed(lambda: store.search(""), repeat),
        "a study's page": timed(lambda: page(store, f"{UID}.{rng.randrange(count)}"), repeat),
    }


def overview(work: Path, db: Path, repeat: int) -> tuple[float, float]:
    sink = Sink(work / "sink-overview")
    port, console = free_port(), free_port()
    cfg = relay_config(work / "overview.toml", port=port, spool=work / "spool-overview",
                       destinations=[("pacs", "SINK", sink.port)],
                       extra=f'[history]\nurl = "{sqlite_url(db)}"\nrelay_name = "relay-a"\n'
                             f'[console]\nlisten = "127.0.0.1:{console}"\n')
    subprocess.run([sys.executable, "-m", "relay", "user", "add", "bench", "--role", "viewer",
                    "--password-stdin", "--config", str(cfg)], input="bench-pass-1\n",
                   text=True, check=True, capture_output=True)
    relay = RelayProcess(cfg, work).start(port)
    wait_for_port(console)
    web = requests.Session()
    base = f"http://127.0.0.1:{console}"
    page = web.get(base + "/login", timeout=30)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    web.post(base + "/login", data={"csrf": csrf.group(1), "name": "bench",
                                    "password": "bench-pass-1"}, timeout=30)

    def get() -> None:
        answer = web.get(base + "/", timeout=30)
        assert answer.status_code == 200 and "Overview" in answer.text

    try:
        get()  # warm
        return timed(get, repeat)
    finally:
        relay.stop()
        sink.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    objects_n, runs, studies_n, repeat = (20, 1, 500, 5) if args.smoke else (500, 3, 100_000, 200)
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        work = Path(tmp)
        ct_series(work / "small", objects_n)
        files = sorted((work / "small").iterdir())
        on, off = [], []
        for run in range(runs):  # alternating: the machine's drift hits both alike
            off.append(relay_run(work, files, False, f"off{run}"))
            on.append(relay_run(work, files, True, f"on{run}"))
        t_on, t_off = statistics.median(on), statistics.median(off)
        print(f"| history on / off, {objects_n} small objects (median of {runs}) | "
              f"{t_on:.2f} s / {t_off:.2f} s | {t_on / t_off:.2f} x |")
        db = work / "history.sqlite"
        started = time.monotonic()
        sqlite_store = HistoryStore(sqlite_url(db), "relay-a")
        fill(sqlite_store, studies_n)
        print(f"(SQLite: {studies_n} studies, {studies_n * 10} events written in "
              f"{time.monotonic() - started:.0f} s)")
        results = {"SQLite": searches(sqlite_store, studies_n, repeat)}
        sqlite_store.close()
        if (PG_BIN / "initdb").exists():
            pg = PostgreSQL().start()
            try:
                pg_store = HistoryStore(pg.url, "relay-a")
                started = time.monotonic()
                fill(pg_store, studies_n)
                with pg_store.engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
                print(f"(PostgreSQL: written in {time.monotonic() - started:.0f} s)")
                results["PostgreSQL"] = searches(pg_store, studies_n, repeat)
                pg_store.close()
            finally:
                pg.close()
        for engine, figures in results.items():
            for what, (p50, p95) in figures.items():
                print(f"| search, {studies_n} studies, {engine}: {what} | "
                      f"p50 {p50 * 1000:.1f} ms | p95 {p95 * 1000:.1f} ms |")
        p50, p95 = overview(work, db, max(5, repeat // 4))
        print(f"| overview page, {studies_n} studies in the history | p50 {p50 * 1000:.0f} ms "
              f"| p95 {p95 * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
