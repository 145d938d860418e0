"""Config errors name the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.load import load_config
from relay.config.model import ConfigError
from relay.edit.rules import KeywordRule, XPathRule

REPO = Path(__file__).resolve().parent.parent
MINIMAL = """
[[destinations]]
name = "central"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""


def _load(tmp_path: Path, text: str):  # noqa: ANN202
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return load_config(path)


def test_example_config_parses() -> None:
    cfg = load_config(REPO / "templates" / "relay.toml")
    assert cfg.receiver.ae_title == "DICOMRELAY" and cfg.receiver.port == 11112
    assert [d.name for d in cfg.destinations] == ["central"]
    assert isinstance(cfg.rules[0], KeywordRule)
    assert cfg.rules[0].describe() == "PatientID := EthnicGroup"
    # Relative spool paths are relative to the config file's folder.
    assert cfg.spool.path == (REPO / "templates" / "spool").resolve()


def test_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL)
    assert cfg.toolkit.engine == "auto"
    assert cfg.spool.path == Path("/srv/dicom_repo")
    assert cfg.sender.calling_ae_title == "DICOMRELAY"


def test_original_xpath_rule_loads(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + """
[[rules]]
xpath = '//DicomAttribute[@keyword="PatientID"]/Value'
value_from_xpath = '//DicomAttribute[@keyword="EthnicGroup"]/Value/text()'
""")
    assert isinstance(cfg.rules[0], XPathRule)


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[receiver]\nport = "abc"', r"receiver\.port: expected an integer 1-65535, got str 'abc'"),
    ("[receiver]\nport = 70000", r"receiver\.port: expected an integer 1-65535, got int 70000"),
    ('[receiver]\nae_title = "WAY_TOO_LONG_AE_TITLE"', r"receiver\.ae_title: expected an AE"),
    ('[toolkit]\nengine = "orthanc"', r"toolkit\.engine: expected one of 'auto', 'dcm4che'"),
    ('[receiver]\nprot = 1', r"receiver\.prot: expected one of the known keys: ae_title"),
    ('[spool]\npath = 5', r"spool\.path: expected a folder path, got int 5"),
    ('[sender]\nretry_initial = 10\nretry_max = 1',
     r"sender\.retry_max: expected a number >= retry_initial"),
    ('[sender]\nbatch_wait = -1', r"sender\.batch_wait: expected a number 0-60, got int -1"),
    ('[receiver]\nmax_associations = 4\nmax_associations_per_host = 5',
     r"receiver\.max_associations_per_host: expected at most max_associations \(4\), got int 5"),
    ('[receiver]\nmax_object_mb = 0', r"receiver\.max_object_mb: expected an integer 1-"),
    ('[[destinations]]\nname = "x"\nae_title = "A"\nhost = "h"',
     r"\[\[destinations\]\]\[1\]\.port: expected an integer 1-65535 \(this key is required\)"),
    ('[[destinations]]\nname = "central"\nae_title = "A"\nhost = "h"\nport = 1',
     r"\[\[destinations\]\]\[1\]\.name: expected a unique name"),
    ('[[destinations]]\nname = "../etc"\nae_title = "A"\nhost = "h"\nport = 1',
     r"\[\[destinations\]\]\[1\]\.name: expected a name of letters"),
    ('[[rules]]\nset = "PatientID"\ncopy_form = "EthnicGroup"',
     r"\[\[rules\]\]\[0\]\.copy_form: expected one of the known keys"),
    ('[[rules]]\nset = "PatientIdentifier"\ncopy_from = "EthnicGroup"',
     r"\[\[rules\]\]\[0\]: set: 'PatientIdentifier' is not a DICOM keyword"),
    ('[[rules]]\nset = "PatientID"', r"\[\[rules\]\]\[0\]: set: expected exactly one of copy_from"),
    ("[[rules]]\nxpath = '//DicomAttribute['\nvalue = 'x'", r"\[\[rules\]\]\[0\]: xpath: expected"),
    ('[[rules]]\nxslt = "missing.xsl"', r"\[\[rules\]\]\[0\]: xslt: cannot read stylesheet"),
    ('[[rules]]\nset = "PatientID"\nvalue = "x"\non_missing = "drop"',
     r"\[\[rules\]\]\[0\]\.on_missing: expected one of 'keep', 'fail'"),
])
def test_errors_name_file_key_and_expectation(tmp_path: Path, snippet: str,
                                               expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        _load(tmp_path, MINIMAL + "\n" + snippet + "\n")
    assert str(info.value).startswith(str(tmp_path / "relay.toml") + ": ")


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"relay\.toml: not valid TOML"):
        _load(tmp_path, "[receiver\nport = 1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config(tmp_path / "nope.toml")


def test_audit_defaults_to_the_spool_and_can_be_switched(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL)
    assert cfg.audit_path == Path("/srv/dicom_repo/audit.jsonl")
    assert cfg.audit.patient_values is True
    cfg = _load(tmp_path, MINIMAL + '[audit]\npath = "logs/audit.jsonl"\npatient_values = false\n')
    assert cfg.audit_path == (tmp_path / "logs" / "audit.jsonl").resolve()
    assert cfg.audit.patient_values is False
    assert _load(tmp_path, MINIMAL + "[audit]\nenabled = false\n").audit_path is None
    with pytest.raises(ConfigError, match=r"audit\.patient_values: expected true or false"):
        _load(tmp_path, MINIMAL + '[audit]\npatient_values = "no"\n')


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not really a certificate, only its path is checked here")
    with pytest.raises(ConfigError, match=r"receiver\.tls\.certificate: expected certificate "
                                          r"and private_key for a TLS receiver"):
        _load(tmp_path, MINIMAL + f'[receiver.tls]\nca = "{pem}"\n')
    with pytest.raises(ConfigError, match=r"receiver\.tls\.ca: expected an existing PEM file"):
        _load(tmp_path, MINIMAL + f'[receiver.tls]\ncertificate = "{pem}"\n'
              f'private_key = "{pem}"\nca = "missing.pem"\n')
    with pytest.raises(ConfigError, match=r"receiver\.tls\.ca: expected the CA"):
        _load(tmp_path, MINIMAL + f'[receiver.tls]\ncertificate = "{pem}"\n'
              f'private_key = "{pem}"\n')
    cfg = _load(tmp_path, MINIMAL.replace("port = 104", f'port = 104\ntls = {{ ca = "{pem}" }}'))
    assert cfg.destinations[0].tls is not None and cfg.destinations[0].tls.ca == pem


def test_query_and_modalities(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + """
[receiver]
ae_title = "RELAY"
allowed_calling_aets = ["WS1", "WS2", "CT01"]

[query]
destination = "central"
retrieve = "move"
allowed_calling_aets = ["WS1"]

[[modalities]]
ae_title = "WS1"
host = "10.0.1.20"
port = 104
""")
    assert cfg.query is not None
    assert (cfg.query.port, cfg.query.retrieve, cfg.query.move_ae_title) == (11113, "move",
                                                                             "RELAY")
    assert cfg.query.allowed_calling_aets == ("WS1",)
    modality = cfg.modality("WS1 ")
    assert modality is not None and modality.describe() == "WS1@10.0.1.20:104"
    assert cfg.modality("WS2") is None
    assert _load(tmp_path, MINIMAL).query is None


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[query]\ndestination = "nowhere"',
     r"query\.destination: expected the name of a \[\[destinations\]\] entry \(central\)"),
    ('[query]\ndestination = "central"\nport = 11112',
     r"query\.port: expected a port other than \[receiver\]\.port \(11112\)"),
    ('[query]\ndestination = "central"\nretrieve = "fetch"',
     r"query\.retrieve: expected one of 'get', 'move'"),
    ('[receiver]\nallowed_calling_aets = ["A"]\n[query]\ndestination = "central"\n'
     'allowed_calling_aets = ["B"]',
     r"query\.allowed_calling_aets: expected AE titles that \[receiver\]"),
    ('[[modalities]]\nae_title = "WS1"\nhost = "h"',
     r"\[\[modalities\]\]\[0\]\.port: expected an integer 1-65535"),
    ('[[modalities]]\nae_title = "WS1"\nhost = "h"\nport = 1\n'
     '[[modalities]]\nae_title = "WS1"\nhost = "h"\nport = 2',
     r"\[\[modalities\]\]\[1\]\.ae_title: expected an AE title no other"),
])
def test_query_errors_name_the_key(tmp_path: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, MINIMAL + "\n" + snippet + "\n")


def test_query_destination_must_be_dimse(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"query\.destination: expected a DIMSE destination"):
        _load(tmp_path, """
[[destinations]]
name = "web"
url = "http://127.0.0.1:8042/dicom-web"

[query]
destination = "web"
""")


def test_query_and_modalities_changes_need_a_restart(tmp_path: Path) -> None:
    from relay.pipeline.reload import applicable, restart_only_changes

    old = _load(tmp_path, MINIMAL)
    new = _load(tmp_path, MINIMAL + '[query]\ndestination = "central"\n[[modalities]]\n'
                'ae_title = "WS1"\nhost = "h"\nport = 1\n')
    assert restart_only_changes(old, new) == [
        "reload: [query] changed: it needs a restart; kept as it was until then",
        "reload: [[modalities]] changed: it needs a restart; kept as it was until then"]
    kept = applicable(old, new)
    assert kept.query is None and kept.modalities == ()


def test_commitment(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL.replace("port = 104", "port = 104\ncommitment = true") + """
[receiver]
allowed_calling_aets = ["CT01"]

[commitment]
timeout = 600

[[modalities]]
ae_title = "CT01"
host = "10.0.1.20"
port = 104
""")
    assert cfg.commitment is not None
    assert (cfg.commitment.port, cfg.commitment.timeout) == (11113, 600.0)
    assert cfg.destinations[0].commitment
    assert _load(tmp_path, MINIMAL).commitment is None
    assert _load(tmp_path, MINIMAL + "[commitment]\nenabled = false\n").commitment is None
    # Sharing [query]'s port by default: one SCP serves both.
    shared = _load(tmp_path, MINIMAL + '[query]\ndestination = "central"\nport = 4000\n'
                   "[commitment]\n")
    assert shared.commitment is not None and shared.commitment.port == 4000


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[commitment]\nport = 11112', r"commitment\.port: expected a port other than "
     r"\[receiver\]\.port \(11112\)"),
    ('[commitment]\ntimeout = 0', r"commitment\.timeout: expected"),
    ('[commitment]\nwhen = 1', r"commitment"),
    ('[receiver]\nallowed_calling_aets = ["CT01", "MR01"]\n[commitment]\n[[modalities]]\n'
     'ae_title = "CT01"\nhost = "h"\nport = 1',
     r"commitment\.enabled: expected a \[\[modalities\]\] entry .* none for MR01"),
])
def test_commitment_errors_name_the_key(tmp_path: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, MINIMAL + "\n" + snippet + "\n")


def test_commitment_is_for_dimse_destinations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"commitment: expected no DIMSE key in a DICOMweb"):
        _load(tmp_path, '[[destinations]]\nname = "web"\nurl = "http://127.0.0.1:8042/dw"\n'
              "commitment = true\n")
