"""The console in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver, against a relay relaying real studies from DCMTK's dcmsend to Orthanc.
The test clicks what a user clicks; a screenshot of each page lands in
artifacts/console/ (beside the checkout's tests: CI keeps the folder)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from console.studies import study
from dicomdata import bundled, copy_with_new_uids
from peers import (
    EG_RULE,
    REQUIRE_ALL,
    Orthanc,
    RelayProcess,
    dcmsend,
    free_port,
    relay_config,
    wait_for_port,
    wait_until,
)

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
PASSWORDS = {"maria": ("admin", "maria-pass-1"), "oscar": ("operator", "oscar-pass-1"),
             "vera": ("viewer", "vera-pass-1")}


def _uid(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # The diagnostic PACS takes uncompressed objects only (until it is reconfigured);
        # the archive holds each study until it is complete.
        self.pacs = Orthanc(tmp / "pacs", aet="PACS", accepted_syntaxes=UNCOMPRESSED).start()
        self.archive = Orthanc(tmp / "archive", aet="ARCHIVE").start()
        self.port, self.console = free_port(), free_port()
        self.spool = tmp / "spool"
        self.config = relay_config(
            tmp / "relay.toml", port=self.port, spool=self.spool, rules=EG_RULE,
            destinations=[("pacs", "PACS", self.pacs.dicom_port),
                          ("archive", "ARCHIVE", self.archive.dicom_port,
                           "hold_until_stable = 600")],
            extra=f'[console]\nlisten = "127.0.0.1:{self.console}"\n',
            spool_extra="keep_delivered_hours = 1")
        for name, (role, password) in PASSWORDS.items():
            subprocess.run([sys.executable, "-m", "relay", "user", "add", name, "--role", role,
                            "--password-stdin", "--config", str(self.config)],
                           input=password + "\n", text=True, check=True, capture_output=True)
        self.relay = RelayProcess(self.config, tmp).start(self.port)
        wait_for_port(self.console)
        self.base = f"http://127.0.0.1:{self.console}"

    def close(self) -> None:
        self.relay.stop()
        self.pacs.close()
        self.archive.close()


def browser(language: str = "en-US") -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--lang={language}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                            options=options)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = "Debian's chromium and chromium-driver are not installed (tests/run installs them)"
        if REQUIRE_ALL:
            pytest.fail(why)
        pytest.skip(why)
    s = Site(tmp_path_factory.mktemp("console"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def web(site: Site) -> Iterator[Any]:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    driver = browser()
    try:
        yield driver
    finally:
        driver.quit()


def by(kind: str, value: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    return {"id": By.ID, "css": By.CSS_SELECTOR, "text": By.LINK_TEXT}[kind], value


def click(driver: Any, kind: str, value: str) -> None:
    """Click what submits a form or follows a link, and wait for the next page: a click
    returns before the browser has it.

    The old page is marked in its window object, which a new document does not inherit:
    waiting for the old <html> element to go stale instead depends on how the driver
    reports a detached node (ChromeDriver 156 answers "Node with given id does not belong
    to the document", an unknown error, not a stale element)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.wait import WebDriverWait

    driver.execute_script("window.relayTestOldPage = true;")
    driver.find_element(*by(kind, value)).click()

    def next_page(d: Any) -> bool:
        try:
            return bool(d.execute_script(
                "return document.readyState === 'complete' && !window.relayTestOldPage;"))
        except WebDriverException:  # the old document went while the script ran
            return False

    WebDriverWait(driver, 30).until(next_page)


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def log_in(driver: Any, site: Site, name: str, password: str | None = None) -> None:
    driver.get(site.base + "/login")
    driver.find_element(*by("id", "name")).send_keys(name)
    driver.find_element(*by("id", "password")).send_keys(password or PASSWORDS[name][1])
    click(driver, "id", "login")


def cell(driver: Any, selector: str) -> str:
    return str(driver.find_element(*by("css", selector)).text)


def reloaded_until(driver: Any, check: Any, timeout: float, what: str) -> Any:
    def again() -> Any:
        driver.refresh()
        return check()
    return wait_until(again, timeout, interval=0.5, what=what)


def test_a_wrong_password_is_refused_and_the_right_one_logs_in(site: Site, web: Any) -> None:
    web.get(site.base + "/")
    assert "/login" in web.current_url  # every page asks for a login first
    log_in(web, site, "maria", "not-her-password")
    assert "Wrong user name or password." in web.page_source
    shot(web, "01-login-refused")
    log_in(web, site, "maria")
    assert web.current_url.rstrip("/") == site.base
    assert "maria (admin)" in web.page_source
    cookie = web.get_cookie("relay_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"


def test_the_overview_shows_a_queue_grow_while_the_pacs_is_down_and_drain(
        site: Site, web: Any) -> None:
    site.pacs.stop()
    uid, files = study(site.tmp / "ct", 6, patient_id="HC-1001", ethnic_group="MRN-555",
                       name="Gomez^Lucia", accession="ACC-1001")
    site.study_uid = uid  # type: ignore[attr-defined]
    assert dcmsend(files, site.port, "DICOMRELAY").returncode == 0
    web.get(site.base + "/")
    reloaded_until(web, lambda: cell(web, "#dest-pacs .depth") == "6", 60,
                   "6 queued for the PACS on the overview")
    reloaded_until(web, lambda: cell(web, "#dest-pacs .state") == "down", 60,
                   "the PACS shown down")
    shot(web, "02-overview-pacs-down")
    site.pacs.start()
    reloaded_until(web, lambda: cell(web, "#dest-pacs .depth") == "0", 90,
                   "the queue drained on the overview")
    # Delivered in the last hour: from the history, which its writer fills a moment later.
    reloaded_until(web, lambda: cell(web, "#dest-pacs .delivered") == "6", 30,
                   "6 delivered in the last hour")
    assert cell(web, "#dest-pacs .state") == "up"
    assert "listening on port" in cell(web, "#receiver")
    shot(web, "03-overview-drained")
    assert site.pacs.count() == 6


def test_a_search_by_patient_id_finds_the_study_and_its_timeline(site: Site, web: Any) -> None:
    click(web, "text", "Studies")
    web.find_element(*by("id", "q")).send_keys("HC-1001")
    click(web, "id", "search")
    links = web.find_elements(*by("css", "#results a.study"))
    assert [a.text for a in links] == ["HC-1001 → MRN-555"]
    shot(web, "04-studies-search")
    click(web, "css", "#results a.study")
    assert site.study_uid in web.page_source  # type: ignore[attr-defined]
    steps = [td.text for td in web.find_elements(*by("css", "#timeline td:nth-child(2)"))]
    assert steps.count("received") == 6 and steps.count("delivered") == 6
    assert steps.count("held") == 6
    assert "PatientID: 'HC-1001' -> 'MRN-555'" in cell(web, "#timeline")
    assert cell(web, "#sd-pacs .delivered") == "6" and cell(web, "#sd-archive .held") == "6"
    shot(web, "05-study-timeline")


def test_a_held_study_is_released_early(site: Site, web: Any) -> None:
    click(web, "id", "release-archive")
    assert "released" in web.page_source
    wait_until(lambda: site.archive.count() == 6, 60, what="the held study at the archive")
    reloaded_until(web, lambda: cell(web, "#sd-archive .delivered") == "6", 30,
                   "6 delivered to the archive on the study page")
    shot(web, "06-study-released")


def test_a_delivered_study_is_sent_again(site: Site, web: Any) -> None:
    site.pacs.delete_all()  # the PACS lost it
    assert site.pacs.count() == 0
    click(web, "id", "resend-pacs")
    assert "6 object(s) queued again for pacs" in web.page_source
    wait_until(lambda: site.pacs.count() == 6, 60, what="the study at the PACS again")
    shot(web, "06b-study-sent-again")


def test_a_failed_object_retried_from_the_page_reaches_orthanc(site: Site, web: Any) -> None:
    jpegs = [site.tmp / "jpeg" / f"{i}.dcm" for i in range(3)]
    uids = [copy_with_new_uids(bundled("SC_rgb_jpeg_dcmtk.dcm"), p, ethnic_group=f"JP{i}")
            for i, p in enumerate(jpegs)]
    assert dcmsend(jpegs, site.port, "DICOMRELAY").returncode == 0
    web.get(site.base + "/failed")
    reloaded_until(web, lambda: len(web.find_elements(*by("css", "input.pick"))) == 3, 60,
                   "3 JPEG objects the PACS refused, on the Failed page")
    shot(web, "07-failed")
    site.pacs.stop()  # the PACS administrator lets it take JPEG
    site.pacs.accept(None)
    site.pacs.start()
    row = next(tr for tr in web.find_elements(*by("css", "table.failed-group tr"))
               if uids[0] in tr.text)
    row.find_element(*by("css", "input.pick")).click()  # a checkbox: no page follows
    click(web, "css", "button.retry-selected")
    assert "1 object(s) requeued" in web.page_source
    wait_until(lambda: uids[0] in site.pacs.tags_by_sop_uid(), 60,
               what="the retried object at Orthanc")
    assert uids[1] not in site.pacs.tags_by_sop_uid()
    assert len(web.find_elements(*by("css", "input.pick"))) == 2
    shot(web, "08-failed-after-retry")
    # The second from its study's page (the link in its row).
    study_uid = str(dcmread(jpegs[1], stop_before_pixels=True).StudyInstanceUID)
    click(web, "css", f'table.failed-group a[href="/studies/{study_uid}"]')
    click(web, "id", "retry-study")
    assert "1 object(s) requeued" in web.page_source
    wait_until(lambda: uids[1] in site.pacs.tags_by_sop_uid(), 60,
               what="the object retried from its study's page at Orthanc")
    shot(web, "08b-study-retried")
    web.get(site.base + "/failed")
    assert len(web.find_elements(*by("css", "input.pick"))) == 1


def test_pause_and_resume(site: Site, web: Any) -> None:
    click(web, "text", "Destinations")
    click(web, "id", "pause-pacs")
    assert cell(web, "#dest-pacs .state") == "paused"
    _uid2, files = study(site.tmp / "paused", 2, patient_id="HC-2002", ethnic_group="MRN-2",
                         name="Paused^Two", accession="ACC-2002")
    before = site.pacs.count()
    assert dcmsend(files, site.port, "DICOMRELAY").returncode == 0
    reloaded_until(web, lambda: cell(web, "#dest-pacs .depth") == "2", 30,
                   "2 queued while paused")
    assert site.pacs.count() == before
    shot(web, "09-destinations-paused")
    click(web, "id", "resume-pacs")
    wait_until(lambda: site.pacs.count() == before + 2, 60, what="the 2 sent on resume")
    reloaded_until(web, lambda: cell(web, "#dest-pacs .depth") == "0", 30, "queue empty")
    click(web, "id", "echo-pacs")
    assert "echo pacs: OK" in web.page_source
    shot(web, "10-destinations-resumed")


def test_the_rule_tester_shows_the_change(site: Site, web: Any) -> None:
    sample = site.tmp / "tester" / "ct.dcm"
    copy_with_new_uids(bundled("CT_small.dcm"), sample, ethnic_group="MRN-TEST",
                       patient_id="LOCAL-9")
    click(web, "text", "Rule tester")
    web.find_element(*by("id", "files")).send_keys(str(sample))
    click(web, "id", "test")
    assert "PatientID: 'LOCAL-9' -> 'MRN-TEST'" in cell(web, "ul.changes")
    routes = web.find_element(*by("css", "ul.routes")).text
    assert "to pacs" in routes and "to archive" in routes
    shot(web, "11-rule-tester")
    assert not list((site.spool / "incoming").iterdir())  # nothing stored


def test_the_config_page_hides_secrets(site: Site, web: Any) -> None:
    click(web, "text", "Configuration")
    assert 'listen = "127.0.0.1:' in cell(web, "#config")
    click(web, "id", "reload")
    assert "reloaded" in web.page_source
    shot(web, "12-config")


def test_the_spanish_pages(site: Site, web: Any) -> None:
    web.get(site.base + "/")
    click(web, "text", "ES")
    assert web.find_element(*by("css", "h1")).text.startswith("Resumen")
    assert "Cola" in web.page_source and "Estudios" in web.page_source
    shot(web, "13-overview-es")
    click(web, "text", "EN")
    assert web.find_element(*by("css", "h1")).text.startswith("Overview")
    spanish = browser("es-ES")  # a browser that asks for Spanish gets it unasked
    try:
        spanish.get(site.base + "/login")
        assert spanish.find_element(*by("css", "h1")).text == "Iniciar sesión"
    finally:
        spanish.quit()


def test_a_form_without_its_csrf_token_is_refused(site: Site, web: Any) -> None:
    web.get(site.base + "/destinations")
    web.execute_script("document.querySelector('#pause-pacs').form"
                       ".querySelector('input[name=csrf]').remove()")
    click(web, "id", "pause-pacs")
    assert "CSRF token is missing or wrong" in web.find_element(*by("id", "message")).text
    web.get(site.base + "/destinations")
    assert cell(web, "#dest-pacs .state") == "up"  # nothing paused


def test_a_viewer_cannot_retry(site: Site, web: Any) -> None:
    web.get(site.base + "/")
    click(web, "id", "logout")
    log_in(web, site, "vera")
    web.get(site.base + "/failed")
    assert len(web.find_elements(*by("css", "input.pick"))) == 1
    assert not web.find_elements(*by("css", "button.retry-selected, button.retry-all"))
    shot(web, "14-failed-as-viewer")
    # The form a viewer is not shown, sent anyway with her own valid CSRF token.
    web.execute_script("""
        const csrf = document.querySelector('input[name=csrf]').value;
        const form = document.createElement('form');
        form.method = 'post'; form.action = '/failed/act';
        for (const [k, v] of [['csrf', csrf], ['do', 'retry-all'],
                              ['reason', document.querySelector('h2').id]]) {
            const i = document.createElement('input');
            i.type = 'hidden'; i.name = k; i.value = v; form.appendChild(i);
        }
        document.body.appendChild(form); form.submit();""")
    wait_until(lambda: "/failed/act" in web.current_url
               and web.find_elements(*by("id", "message")), 10, what="the forged form sent")
    assert "needs the role operator" in web.find_element(*by("id", "message")).text
    web.get(site.base + "/failed")
    assert len(web.find_elements(*by("css", "input.pick"))) == 1  # still there


def test_an_admin_deletes_after_a_page_that_names_the_count(site: Site, web: Any) -> None:
    click(web, "id", "logout")
    log_in(web, site, "maria")
    web.get(site.base + "/failed")
    click(web, "css", "button.delete-all")
    assert web.find_element(*by("css", "h1")).text == "Delete 1 object(s) for good?"
    shot(web, "15-delete-confirmation")
    assert len(list((site.spool / "failed").rglob("*.dcm"))) == 1  # nothing gone yet
    click(web, "id", "confirm")
    assert "1 object(s) deleted" in web.page_source
    assert not list((site.spool / "failed").rglob("*.dcm"))
    audit = (site.spool / "audit.jsonl").read_text()
    assert '"action": "delete", "user": "maria"' in audit
