"""The console's guards without a browser (the browser test clicks the rest): login attempts
limited, TLS with Secure cookies, patient values masked where the audit keeps none, `check`
warning about a console open to the network without TLS, and pages that need a login."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from security.pki import make_pki

from console.studies import study
from console.test_api import Api, token
from peers import (
    EG_RULE,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    wait_for_port,
    wait_until,
)
from relay.console.sessions import MAX_FAILURES, WINDOW, LoginLimiter

pytestmark = pytest.mark.e2e


def _relay(tmp: Path, extra: str, scp: ScriptedSCP) -> tuple[RelayProcess, int, Path]:
    port = free_port()
    config = relay_config(tmp / "relay.toml", port=port, spool=tmp / "spool", rules=EG_RULE,
                          destinations=[("pacs", "PACS", scp.port)], extra=extra)
    subprocess.run([sys.executable, "-m", "relay", "user", "add", "maria", "--role", "admin",
                    "--password-stdin", "--config", str(config)], input="right-pass-1\n",
                   text=True, check=True, capture_output=True)
    return RelayProcess(config, tmp).start(port), port, config


def _login(session: requests.Session, base: str, password: str, **kw: object
           ) -> requests.Response:
    page = session.get(base + "/login", timeout=30, **kw)  # type: ignore[arg-type]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return session.post(base + "/login", data={"csrf": csrf.group(1), "name": "maria",
                                                "password": password, "next": "/"},
                        timeout=30, allow_redirects=False, **kw)  # type: ignore[arg-type]


def test_the_config_page_hides_secrets() -> None:
    from relay.console.control import hide_secrets

    text = ('[history]\nurl = "postgresql://relay:s3cr3t@db/relay"\n'
            '[[destinations]]\npassword = "hunter2"\nToken = \'abc\'\nname = "pacs"\n')
    shown = hide_secrets(text)
    assert "s3cr3t" not in shown and "hunter2" not in shown and "abc" not in shown
    assert "postgresql://relay:(hidden)@db/relay" in shown and 'name = "pacs"' in shown


def test_the_limiter_counts_per_address_and_per_name() -> None:
    now = [1000.0]
    limiter = LoginLimiter(clock=lambda: now[0])
    for _ in range(MAX_FAILURES):
        assert limiter.blocked_for("10.0.0.1", "maria") == 0
        limiter.failed("10.0.0.1", "maria")
    assert limiter.blocked_for("10.0.0.1", "maria") == pytest.approx(WINDOW)
    assert limiter.blocked_for("10.0.0.2", "maria") > 0  # the name is locked from anywhere
    assert limiter.blocked_for("10.0.0.1", "oscar") > 0  # and the address for any name
    assert limiter.blocked_for("10.0.0.2", "oscar") == 0
    now[0] += WINDOW
    assert limiter.blocked_for("10.0.0.1", "maria") == 0


def test_logins_are_limited_and_served_over_tls_with_secure_cookies(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    scp = ScriptedSCP(ae_title="PACS")
    console = free_port()
    relay, _port, _config = _relay(
        tmp_path, f'[console]\nlisten = "127.0.0.1:{console}"\n[console.tls]\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n', scp)
    try:
        wait_for_port(console)
        base = f"https://127.0.0.1:{console}"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{console}/login", timeout=10)  # no plain HTTP
        web = requests.Session()
        for _ in range(MAX_FAILURES):
            assert _login(web, base, "wrong", verify=str(pki.ca)).status_code == 401
        # The right password now waits too: a guesser cannot tell.
        blocked = _login(web, base, "right-pass-1", verify=str(pki.ca))
        assert blocked.status_code == 429 and "Too many failed logins" in blocked.text
        other = requests.Session()  # the same address: still blocked
        assert _login(other, base, "right-pass-1", verify=str(pki.ca)).status_code == 429
        audit = (tmp_path / "spool" / "audit.jsonl")
        assert not audit.exists() or '"action": "login"' not in audit.read_text()
        # Both sessions keep their TLS connections open and read nothing: the relay still
        # stops within `docker stop`'s 10 s grace (it had waited 10 s for the console alone,
        # for a close_notify these clients never send), by itself and without a traceback.
        asked = time.monotonic()
        assert relay.stop() == 0
        assert time.monotonic() - asked < 8, "the console held the stop"
        assert "Traceback" not in relay.output()
    finally:
        relay.stop()
        scp.close()
    # After a restart (sessions and counts are in memory) the right password logs in, and
    # the session cookie is Secure, HttpOnly, SameSite=Strict.
    scp = ScriptedSCP(ae_title="PACS", port=scp.port)
    relay.start()
    try:
        wait_for_port(console)
        web = requests.Session()
        done = _login(web, base, "right-pass-1", verify=str(pki.ca))
        assert done.status_code == 303
        cookie = done.headers["set-cookie"]
        assert "relay_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        page = web.get(base + "/", verify=str(pki.ca), timeout=30)
        assert page.status_code == 200 and "maria (admin)" in page.text
        assert page.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert '"action": "login", "user": "maria"' in audit.read_text()
    finally:
        relay.stop()
        scp.close()


def test_patient_values_are_masked_where_the_audit_keeps_none(tmp_path: Path) -> None:
    scp = ScriptedSCP(ae_title="PACS")
    console = free_port()
    relay, port, config = _relay(
        tmp_path, f'[console]\nlisten = "127.0.0.1:{console}"\n[audit]\npatient_values = false\n',
        scp)
    try:
        wait_for_port(console)
        uid, files = study(tmp_path / "s", 2, patient_id="SECRET-ID-1", ethnic_group="SECRET-2",
                           name="Secreto^Nombre", accession="SECRET-ACC")
        assert dcmsend(files, port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(set(scp.received)) == 2, 30, what="2 at the PACS")
        api = Api(console, token(config, "t", "viewer"))
        found = wait_until(lambda: api.get("/studies", q="SECRET-ID-1").json()["studies"], 30,
                           what="the study found by its (masked) PatientID")
        body = api.get(f"/studies/{uid}").json()
        web = requests.Session()
        _login(web, f"http://127.0.0.1:{console}", "right-pass-1")
        pages = [web.get(f"http://127.0.0.1:{console}{path}", timeout=30).text
                 for path in ("/studies?q=SECRET-ID-1", f"/studies/{uid}")]
        # What the user typed stays in the search box; nothing the relay knows shows.
        pages[0] = pages[0].replace('value="SECRET-ID-1"', "")
        for text in [str(found), str(body), *pages]:
            assert "SECRET" not in text and "Secreto" not in text
        assert found[0]["patient_id"] == "•••"
        assert any(e["step"] == "edited" and e["detail"] == "PatientID" for e in body["events"])
    finally:
        relay.stop()
        scp.close()


def test_check_warns_of_a_console_open_to_the_network_without_tls(tmp_path: Path) -> None:
    def check(extra: str) -> str:
        config = relay_config(tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "s",
                              destinations=[("pacs", "PACS", free_port())], extra=extra)
        return subprocess.run([sys.executable, "-m", "relay", "check", "--no-echo", "--config",
                               str(config)], capture_output=True, text=True).stdout

    open_one = check('[console]\nlisten = "0.0.0.0:8080"\n')
    assert "WARNING: [console] listen = 0.0.0.0:8080 is reachable from other hosts without " \
           "TLS" in open_one
    assert "no console user or API token yet" in open_one
    local = check('[console]\nlisten = "127.0.0.1:8080"\n')
    assert "console: http://127.0.0.1:8080/" in local and "without TLS" not in local
    assert "console: off" in check("")


def test_pages_need_a_login_and_the_api_a_token(tmp_path: Path) -> None:
    scp = ScriptedSCP(ae_title="PACS")
    console = free_port()
    relay, _port, _config = _relay(tmp_path, f'[console]\nlisten = "127.0.0.1:{console}"\n',
                                   scp)
    try:
        wait_for_port(console)
        base = f"http://127.0.0.1:{console}"
        for path in ("/", "/studies", "/failed", "/destinations", "/tester", "/config"):
            answer = requests.get(base + path, allow_redirects=False, timeout=30)
            assert answer.status_code == 303 and answer.headers["location"].startswith(
                "/login?next="), path
        posted = requests.post(base + "/destinations/pacs/pause", allow_redirects=False,
                               timeout=30)
        assert posted.status_code == 303  # to the login page, nothing paused
        assert not (tmp_path / "spool" / "paused").exists()
        # A login form posted without the cookie its page set is refused (CSRF).
        forged = requests.post(base + "/login", data={"csrf": "x", "name": "maria",
                                                      "password": "right-pass-1"}, timeout=30)
        assert forged.status_code == 403
        # ?next= never leads off the site.
        web = requests.Session()
        page = web.get(base + "/login?next=//evil.example/", timeout=30)
        assert 'name="next" value="/"' in page.text
    finally:
        relay.stop()
        scp.close()
