"""The JSON API on a running relay (`dicom-relay run`): DCMTK's dcmsend as the modality,
pynetdicom PACS as destinations. Every endpoint, every answer code: 200 with what was done,
401 without a valid token, 403 for a role that may not, 404 for what does not exist."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread

from console.studies import study
from peers import (
    EG_RULE,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    wait_until,
)

pytestmark = pytest.mark.e2e


class Once(dict):  # type: ignore[type-arg]
    """A status answered once per InstanceNumber (then success): a refusal to retry."""

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        return self.pop(key, default)


def token(config: Path, name: str, role: str) -> str:
    out = subprocess.run([sys.executable, "-m", "relay", "token", "add", name, "--role", role,
                          "--config", str(config)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


class Api:
    def __init__(self, port: int, token: str | None) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.base + path, headers=self.headers, params=params, timeout=30)

    def post(self, path: str) -> requests.Response:
        return requests.post(self.base + path, headers=self.headers, timeout=30)


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.main = ScriptedSCP(Once({3: 0xA900}), ae_title="MAIN")  # object 3 refused once
        self.held = ScriptedSCP(ae_title="HELD")
        self.port = free_port()
        self.console_port = free_port()
        self.metrics_port = free_port()
        self.spool = tmp / "spool"
        self.config = relay_config(
            tmp / "relay.toml", port=self.port, spool=self.spool,
            destinations=[("main", "MAIN", self.main.port),
                          ("held", "HELD", self.held.port, "hold_until_stable = 600")],
            rules=EG_RULE,
            extra=f'[console]\nlisten = "127.0.0.1:{self.console_port}"\n'
                  f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n')
        self.viewer = Api(self.console_port, token(self.config, "ana", "viewer"))
        self.operator = Api(self.console_port, token(self.config, "oscar", "operator"))
        self.admin = Api(self.console_port, token(self.config, "adela", "admin"))
        self.relay = RelayProcess(self.config, tmp).start(self.port)

    def close(self) -> None:
        self.relay.stop()
        self.main.close()
        self.held.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("api"))
    try:
        uid, files = study(s.tmp / "study", 5, patient_id="RECV-77", ethnic_group="SENT-77",
                           name="Perez^Maria", accession="ACC-77")
        s.study_uid = uid  # type: ignore[attr-defined]
        assert dcmsend(files, s.port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(set(s.main.received)) == 4, 60, what="4 of 5 at MAIN")
        yield s
    finally:
        s.close()
        print(s.relay.output()[-3000:])


def test_no_token_or_a_wrong_one_gets_401_and_the_description_is_served(site: Site) -> None:
    for api in (Api(site.console_port, None), Api(site.console_port, "drt_not-a-token")):
        for path in ("/queues", "/studies", "/failed", f"/studies/{site.study_uid}"):
            assert api.get(path).status_code == 401, path
        assert api.post("/destinations/main/pause").status_code == 401
        assert api.post("/reload").status_code == 401
    spec = requests.get(f"http://127.0.0.1:{site.console_port}/api/v1/openapi.json",
                        timeout=30).json()
    assert {"/api/v1/queues", "/api/v1/studies", "/api/v1/studies/{uid}", "/api/v1/failed",
            "/api/v1/failed/{ident}/retry", "/api/v1/destinations/{name}/pause",
            "/api/v1/destinations/{name}/resume", "/api/v1/studies/{uid}/release",
            "/api/v1/reload"} <= set(spec["paths"])


def _study_found(site: Site, q: str) -> dict[str, Any]:
    found = site.viewer.get("/studies", q=q)
    assert found.status_code == 200
    studies = found.json()["studies"]
    assert [s["study_instance_uid"] for s in studies] == [site.study_uid], q
    return studies[0]


def test_a_study_is_found_by_each_value_and_counted_per_destination(site: Site) -> None:
    wait_until(lambda: site.viewer.get("/studies", q="RECV-77").json()["studies"], 30,
               what="the study in the history")
    for q in ("RECV-77", "SENT-77", "ACC-77", "perez", "Perez^Maria", site.study_uid):
        _study_found(site, q)
    assert site.viewer.get("/studies", q="NOBODY").json() == {"studies": []}

    def settled() -> dict[str, Any] | None:
        s = _study_found(site, "RECV-77")
        main = s["destinations"].get("main", {})
        return s if main.get("delivered") == 4 and main.get("failed") == 1 else None

    s = wait_until(settled, 30, what="4 delivered, 1 failed at main")
    assert s["patient_id"] == "RECV-77" and s["patient_id_sent"] == "SENT-77"
    assert s["accession_number"] == "ACC-77" and s["calling_ae"] == "MODALITY"
    assert s["instances"] == 5
    assert s["destinations"]["held"] == {"delivered": 0, "queued": 0, "held": 5, "failed": 0}
    assert s["first_received"] <= s["last_event"]


def test_a_study_page_has_its_timeline(site: Site) -> None:
    assert site.viewer.get("/studies/1.2.3.404").status_code == 404
    body = site.viewer.get(f"/studies/{site.study_uid}").json()
    steps = [(e["step"], e["destination"]) for e in body["events"]]
    for step in (("received", None), ("edited", None), ("routed", None), ("queued", "main"),
                 ("held", "held"), ("delivered", "main"), ("failed", "main")):
        assert step in steps, step
    edited = next(e for e in body["events"] if e["step"] == "edited")
    assert "PatientID: 'RECV-77' -> 'SENT-77'" in edited["detail"]
    failed = next(e for e in body["events"] if e["step"] == "failed")
    assert failed["status"] == "0xA900" and failed["sop_instance_uid"]
    assert {e["relay"] for e in body["events"]} == {body["events"][0]["relay"]}


def test_queues_say_depth_holds_and_pauses(site: Site) -> None:
    queues = {q["name"]: q for q in site.viewer.get("/queues").json()["destinations"]}
    assert queues["main"] == {"name": "main", "kind": "dimse", "depth": 0,
                              "oldest_age_seconds": 0.0, "paused": False, "held_studies": 0}
    assert queues["held"]["held_studies"] == 1 and queues["held"]["depth"] == 5
    assert queues["held"]["oldest_age_seconds"] > 0


def test_a_failed_object_is_retried_for_its_destination_only(site: Site) -> None:
    failed = site.viewer.get("/failed").json()["failed"]
    assert len(failed) == 1
    item = failed[0]
    assert item["reason"] == "status-A900" and item["destination"] == "main"
    assert item["study_instance_uid"] == site.study_uid and item["sop_instance_uid"]
    assert "0xA900" in item["detail"]
    assert site.viewer.post(f"/failed/{item['id']}/retry").status_code == 403
    assert site.operator.post("/failed/bm8tc3VjaA/retry").status_code == 404
    assert site.operator.post("/failed/Li4vLi4vcmVsYXkudG9tbA/retry").status_code == 404
    done = site.operator.post(f"/failed/{item['id']}/retry")
    assert done.status_code == 200, done.text
    assert done.json()["to"] == "out/main"
    wait_until(lambda: item["sop_instance_uid"] in site.main.received, 30,
               what="the retried object at MAIN")
    assert site.viewer.get("/failed").json() == {"failed": []}
    assert item["sop_instance_uid"] not in site.held.received  # held stays held: not resent
    audit = [json.loads(line) for line in (site.spool / "audit.jsonl").read_text().splitlines()]
    assert any(a["step"] == "requeued" and a.get("user") == "oscar" for a in audit)


def test_pause_keeps_the_queue_and_resume_sends_it(site: Site) -> None:
    assert site.viewer.post("/destinations/main/pause").status_code == 403
    assert site.operator.post("/destinations/nowhere/pause").status_code == 404
    paused = site.operator.post("/destinations/main/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    uid, files = study(site.tmp / "during-pause", 2, patient_id="P2", ethnic_group="S2",
                       name="Paused^Two", accession="ACC-2", first_number=10)
    assert dcmsend(files, site.port, "DICOMRELAY").returncode == 0
    wait_until(lambda: site.viewer.get("/queues").json()["destinations"][0]["depth"] == 2, 30,
               what="2 queued at main while paused")
    main = site.viewer.get("/queues").json()["destinations"][0]
    assert main["paused"] is True and main["depth"] == 2
    sent_while_paused = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert not sent_while_paused & set(site.main.received)
    assert (site.spool / "paused" / "main").exists()  # survives a restart
    scraped = requests.get(f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=30).text
    assert 'dicom_relay_destination_paused{destination="main"} 1.0' in scraped
    assert 'dicom_relay_destination_paused{destination="held"} 0.0' in scraped
    status = subprocess.run([sys.executable, "-m", "relay", "status", "--config",
                             str(site.config)], capture_output=True, text=True, check=True)
    main_line = next(line for line in status.stdout.splitlines() if line.startswith("main "))
    assert "PAUSED" in main_line
    assert site.viewer.post("/destinations/main/resume").status_code == 403
    assert site.operator.post("/destinations/nowhere/resume").status_code == 404
    resumed = site.operator.post("/destinations/main/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    wait_until(lambda: sent_while_paused <= set(site.main.received), 30,
               what="the 2 sent on resume")
    audit = (site.spool / "audit.jsonl").read_text()
    assert '"action": "pause"' in audit and '"user": "oscar"' in audit


def test_a_held_study_is_released_on_request(site: Site) -> None:
    assert site.viewer.post(f"/studies/{site.study_uid}/release").status_code == 403
    assert site.operator.post("/studies/1.2.3.404/release").status_code == 404
    # Delivered copies are not kept here ([spool] keep_delivered_hours = 0): nothing to resend.
    assert site.viewer.post(f"/studies/{site.study_uid}/resend/main").status_code == 403
    assert site.operator.post(f"/studies/{site.study_uid}/resend/main").status_code == 404
    done = site.operator.post(f"/studies/{site.study_uid}/release")
    assert done.status_code == 200, done.text
    assert done.json()["objects"] == {"held": 5}
    wait_until(lambda: len(set(site.held.received)) == 5, 30, what="the held study at HELD")


def test_reload_is_for_admins_and_says_what_changed_or_why_not(site: Site) -> None:
    assert site.operator.post("/reload").status_code == 403
    text = site.config.read_text()
    site.config.write_text(text.replace('name = "held"', 'name = "held2"'))
    try:
        done = site.admin.post("/reload")
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["applied"] is True
        assert body["destinations_added"] == ["held2"]
        assert body["destinations_removed"] == ["held"]
        site.config.write_text(text + "\n[sender]\nbatch_size = 0\n")
        refused = site.admin.post("/reload")
        assert refused.status_code == 409
        assert refused.json()["applied"] is False and "relay.toml" in refused.json()["refused"]
    finally:
        site.config.write_text(text)
        assert site.admin.post("/reload").status_code == 200


def test_a_removed_token_is_refused_at_once(site: Site) -> None:
    extra = Api(site.console_port, token(site.config, "temp", "viewer"))
    assert extra.get("/queues").status_code == 200
    subprocess.run([sys.executable, "-m", "relay", "user", "remove", "temp", "--config",
                    str(site.config)], check=True, capture_output=True)
    assert extra.get("/queues").status_code == 401
    mode = (site.tmp / "users.json").stat().st_mode & 0o777
    assert mode == 0o600
    assert "drt_" not in (site.tmp / "users.json").read_text()
