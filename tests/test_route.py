"""The route stage at unit level: filters, their config errors, per-destination rules, and the
processor handing each destination its copy (no network: the senders only collect)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled, copy_with_new_uids
from relay.config.load import load_config
from relay.config.model import ConfigError
from relay.edit.editor import Editor
from relay.events import Identity
from relay.pipeline.processor import Processor, Setup
from relay.route.filters import DestinationFilter, key_filter, route, value_as_text
from relay.route.router import Router
from relay.spool import Spool


def _filter(**keys: str | list[str]) -> DestinationFilter:
    return DestinationFilter(tuple(key_filter(k, v) for k, v in keys.items()))


def test_every_key_must_match_any_item_glob_and_negation() -> None:
    flt = _filter(Modality=["CT", "MR"], calling_ae="!TEST*", StationName="CT0?")
    assert flt.why_not({"Modality": "CT", "calling_ae": "SCANNER1", "StationName": "CT01"}) \
        is None
    assert flt.why_not({"Modality": "US", "calling_ae": "SCANNER1", "StationName": "CT01"}) \
        == "Modality 'US' matches none of CT, MR"
    assert flt.why_not({"Modality": "MR", "calling_ae": "TESTBOX", "StationName": "CT01"}) \
        == "calling_ae 'TESTBOX' is excluded by !TEST*"
    assert flt.why_not({"Modality": "MR", "calling_ae": "X", "StationName": "CT010"}) \
        == "StationName 'CT010' matches none of CT0?"
    # Case-sensitive, whole value, absent is empty.
    assert flt.why_not({"Modality": "ct", "calling_ae": "X", "StationName": "CT01"})
    assert _filter(Modality="C").why_not({"Modality": "CT"})
    assert _filter(Modality="!*").why_not({}) == "Modality absent or empty is excluded by !*"
    assert _filter(InstitutionName="*").why_not({}) is None


def test_values_as_text() -> None:
    from pydicom.multival import MultiValue

    assert value_as_text(MultiValue(str, ["ORIGINAL", "PRIMARY"])) == "ORIGINAL\\PRIMARY"
    assert value_as_text(None) == "" and value_as_text(3) == "3"


def test_route_says_why_not() -> None:
    routing = route({"Modality": "US", "calling_ae": "A"},
                    [("diagnostic", _filter(Modality=["CT", "MR"])), ("backup", None),
                     ("research", _filter(calling_ae="B"))])
    assert routing.to == ("backup",)
    assert routing.not_to == {"diagnostic": "Modality 'US' matches none of CT, MR",
                              "research": "calling_ae 'A' matches none of B"}


@pytest.mark.parametrize(("table", "message"), [
    ('Modalty = "CT"', r"filter\.Modalty: expected a DICOM keyword of a top-level attribute"),
    ('Modality = "C[T]"', r"filter\.Modality: expected glob patterns with \* and \? only"),
    ('Modality = 3', r"filter\.Modality: expected a glob pattern or a list of them"),
    ('Modality = "!"', r"filter\.Modality: expected a pattern after '!'"),
    ('ReferencedImageSequence = "x"', r"filter\.ReferencedImageSequence: expected an "
                                      r"attribute with a value, not a sequence"),
])
def test_filter_errors_name_file_and_key(tmp_path: Path, table: str, message: str) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[[destinations]]\nname = "d"\nae_title = "D"\nhost = "h"\nport = 104\n'
                   f'[destinations.filter]\n{table}\n')
    with pytest.raises(ConfigError, match=rf"relay\.toml: \[\[destinations\]\]\[0\]\.{message}"):
        load_config(cfg)


@pytest.mark.parametrize(("extra", "message"), [
    ("hold_until_stable = -1", r"\[\[destinations\]\]\[0\]\.hold_until_stable: expected a "
                               "number 0-604800"),
    ("hold_until_stable = 60\nhold_max = 30", r"hold_max: expected a number of seconds >= "
                                               "hold_until_stable"),
    ('[[destinations.rules]]\ndeidentify = "full"\nsecret_file = "k"',
     r"\[\[destinations\]\]\[0\]\.rules\[0\]\.deidentify: expected one of 'basic'"),
    ('[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "nope"',
     r"rules\[0\]\.secret_file: expected a readable secret file.*head -c 32 /dev/urandom"),
    ('[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "short"',
     r"rules\[0\]\.secret_file: expected a secret file of at least 16 bytes"),
    ('[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "k"\nkeep = ["Age"]',
     r"rules\[0\]\.keep: expected a list of DICOM keywords"),
    ('[[destinations.rules]]\nset = "PatientID"', r"rules\[0\]: expected exactly one of|"
                                                   r"rules\[0\]: set: "),
    ('[[destinations.rules]]\nredact = "US"', r"rules\[0\]\.redact: expected a list of tables "
                                             r"such as \{ Modality = \"US\""),
    ('[[destinations.rules]]\nredact = [{ Modality = "US" }]',
     r"rules\[0\]\.redact\[0\]\.regions: expected a list of \[x, y, width, height\]"),
    ('[[destinations.rules]]\nredact = [{ Modality = "US", regions = [[0, 0, 0, 10]] }]',
     r"redact\[0\]\.regions: expected \[x, y, width, height\]: four whole numbers"),
    ('[[destinations.rules]]\nredact = [{ regions = [[0, 0, 10, 10]] }]',
     r"redact\[0\]: expected at least one attribute the objects must match"),
    ('[[destinations.rules]]\nredact = [{ Modaliti = "US", regions = [[0, 0, 10, 10]] }]',
     r"redact\[0\]\.Modaliti: expected a DICOM keyword"),
    ('[[destinations.rules]]\nredact = [{ Rows = 60, Columns = 80, regions = [[0, 50, 80, 20]] '
     '}]', r"redact\[0\]\.regions: expected regions inside the 80 x 60 image"),
    ('[[destinations.rules]]\nredact = [{ Modality = "US", regions = [[0, 0, 1, 1]] }]\n'
     'deidentify = "basic"\nsecret_file = "k"', r"rules\[0\]\.redact: expected one of the known "
                                            r"keys: deidentify, secret_file"),
])
def test_destination_errors_name_file_and_key(tmp_path: Path, extra: str, message: str) -> None:
    (tmp_path / "k").write_bytes(b"k" * 32)
    (tmp_path / "short").write_bytes(b"k" * 8)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[[destinations]]\nname = "d"\nae_title = "D"\nhost = "h"\nport = 104\n'
                   f'{extra}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


@pytest.mark.parametrize(("rule", "key"), [
    ('deidentify = "basic"', "deidentify"),
    ('redact = [{ Modality = "US", regions = [[0, 0, 1, 1]] }]', "redact"),
])
def test_deidentify_and_redact_are_destination_rules_only(tmp_path: Path, rule: str,
                                                           key: str) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"[[rules]]\n{rule}\n")
    with pytest.raises(ConfigError, match=rf"\[\[rules\]\]\[0\]\.{key}: expected it in a "
                       r"destination's own rules"):
        load_config(cfg)


def test_called_ae_is_refused_where_the_engine_cannot_know_it(tmp_path: Path) -> None:
    from relay.toolkits.select import select_engine

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[toolkit]\nengine = "dcmtk"\n[[destinations]]\nname = "d"\nae_title = "D"\n'
                   'host = "h"\nport = 104\n[destinations.filter]\ncalled_ae = "RELAY"\n')
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.filter\.called_ae: the "
                       "dcmtk engine cannot know the called AE title"):
        select_engine(load_config(cfg))


class Collect:
    """Stands in for a DestinationSender: what it was given to send."""

    def __init__(self, destination: object) -> None:
        self.destination = destination
        self.queued: list[Path] = []

    def enqueue(self, path: Path, received: float | None = None,
                identity: Identity | None = None) -> None:
        self.queued.append(path)


def _processor(tmp_path: Path, toml: str) -> tuple[Processor, dict[str, Collect], Spool]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret").write_bytes(b"s" * 32)
    cfg_path = tmp_path / "relay.toml"
    cfg_path.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n'
                        '[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n' + toml)
    cfg = load_config(cfg_path)
    spool = Spool(cfg.spool.path, [d.name for d in cfg.destinations]).create()
    senders = {d.name: Collect(d) for d in cfg.destinations}
    router = Router(cfg.destinations, called_ae="DICOMRELAY")
    processor = Processor(spool, Setup(Editor(cfg.rules), router, senders,  # type: ignore[arg-type]
                                       cfg.process.unrouted))
    return processor, senders, spool


THREE = '''
[[destinations]]
name = "diagnostic"
ae_title = "PACS"
host = "h"
port = 104
[destinations.filter]
Modality = ["CT", "MR"]
calling_ae = "!TEST*"

[[destinations]]
name = "backup"
ae_title = "BACKUP"
host = "h"
port = 104

[[destinations]]
name = "research"
ae_title = "RESEARCH"
host = "h"
port = 104
[destinations.filter]
Modality = "CT"
[[destinations.rules]]
deidentify = "basic"
secret_file = "secret"

[[destinations]]
name = "research2"
ae_title = "RESEARCH2"
host = "h"
port = 104
[[destinations.rules]]
deidentify = "basic"
secret_file = "secret"
'''


def _incoming(spool: Spool, name: str, source: str, eg: str) -> Path:
    path = spool.incoming / name
    copy_with_new_uids(bundled(source), path, ethnic_group=eg)
    return path


def _read(path: Path):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def test_each_destination_gets_its_copy(tmp_path: Path) -> None:
    processor, senders, spool = _processor(tmp_path, THREE)
    ct = _incoming(spool, "ct.dcm", "CT_small.dcm", "EG-CT")
    mr = _incoming(spool, "mr.dcm", "MR_small.dcm", "EG-MR")
    for path in (ct, mr):
        assert processor.process(path)
    assert [p.name for p in senders["diagnostic"].queued] == ["ct.dcm", "mr.dcm"]
    assert [p.name for p in senders["backup"].queued] == ["ct.dcm", "mr.dcm"]
    assert [p.name for p in senders["research"].queued] == ["ct.dcm"]
    assert [p.name for p in senders["research2"].queued] == ["ct.dcm", "mr.dcm"]
    diag, backup = senders["diagnostic"].queued[0], senders["backup"].queued[0]
    research, research2 = senders["research"].queued[0], senders["research2"].queued[0]
    # Same rules, same file: hard links (global edit only; the two de-identified copies).
    assert diag.stat().st_ino == backup.stat().st_ino
    assert research.stat().st_ino == research2.stat().st_ino != diag.stat().st_ino
    assert _read(diag).PatientID == "EG-CT"
    anon = _read(research)
    assert anon.PatientID.startswith("ANON-") and anon.PatientIdentityRemoved == "YES"
    assert anon.StudyInstanceUID.startswith("2.25.")
    assert list(spool.work.iterdir()) == [], "nothing left behind in work/"


def test_unrouted_objects_are_kept_or_deleted(tmp_path: Path) -> None:
    only_ct = ('[[destinations]]\nname = "ct"\nae_title = "CT"\nhost = "h"\nport = 104\n'
               '[destinations.filter]\nModality = "CT"\n')
    processor, senders, spool = _processor(tmp_path / "keep", only_ct)
    mr = _incoming(spool, "mr.dcm", "MR_small.dcm", "EG")
    processor.process(mr)
    assert senders["ct"].queued == []
    [kept] = [p for p in (spool.failed / "unrouted").iterdir() if p.suffix == ".dcm"]
    sidecar = json.loads(kept.with_name(kept.name + ".json").read_text())
    assert sidecar["detail"] == "ct: Modality 'MR' matches none of CT"
    assert list(spool.work.iterdir()) == []

    processor, senders, spool = _processor(tmp_path / "delete",
                                           '[process]\nunrouted = "delete"\n' + only_ct)
    mr = _incoming(spool, "mr.dcm", "MR_small.dcm", "EG")
    processor.process(mr)
    assert list(spool.failed.rglob("*.dcm")) == [] and list(spool.work.iterdir()) == []


def test_a_failing_destination_edit_spares_the_others(tmp_path: Path) -> None:
    rules = '''
[[destinations]]
name = "ok"
ae_title = "OK"
host = "h"
port = 104

[[destinations]]
name = "strict"
ae_title = "STRICT"
host = "h"
port = 104
[[destinations.rules]]
set = "PatientName"
copy_from = "OtherPatientNames"
on_missing = "fail"
'''
    processor, senders, spool = _processor(tmp_path, rules)
    ct = _incoming(spool, "ct.dcm", "CT_small.dcm", "EG")
    processor.process(ct)
    assert [p.name for p in senders["ok"].queued] == ["ct.dcm"]
    assert senders["strict"].queued == []
    [kept] = [p for p in spool.failed.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert kept.name == "strict--ct.dcm" and kept.parent.name == "missing-source"
    # It is the original (the global rule not applied), so a retry goes through every rule.
    assert _read(kept).PatientID != "EG"
    info = json.loads(kept.with_name(kept.name + ".json").read_text())
    assert info["stage"] == "route" and info["destination"] == "strict"
    assert spool.requeue(kept, info) == spool.incoming / "ct.dcm"
    # Processed again, it goes to the destination it failed at only: "ok" had its copy.
    assert spool.only_for("ct.dcm") == {"strict"}
    processor.process(spool.incoming / "ct.dcm")
    assert [p.name for p in senders["ok"].queued] == ["ct.dcm"]  # no second copy
    [again] = [p for p in spool.failed.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert again.name == "strict--ct.dcm"  # its rule still fails: aside again
    assert spool.only_for("ct.dcm") is None
    assert not [p for p in spool.work.iterdir()]  # no copy left behind


def test_only_to_keeps_a_routing_to_some_destinations() -> None:
    from relay.route.filters import Routing, only_to

    routing = only_to(Routing(("a", "b", "c"), {"d": "Modality 'MR' is not CT"},
                              {"d": "modality"}), ["b"])
    assert routing.to == ("b",)
    assert routing.not_to == {"d": "Modality 'MR' is not CT",
                              "a": "retried for b only (the others had it)",
                              "c": "retried for b only (the others had it)"}
    assert routing.refused_by == {"d": "modality", "a": "retry", "c": "retry"}


def test_a_destinations_copy_is_byte_identical_outside_its_own_rules(tmp_path: Path) -> None:
    from pydicom.dataelem import RawDataElement

    own = ('[[destinations]]\nname = "plain"\nae_title = "P"\nhost = "h"\nport = 104\n'
           '[[destinations]]\nname = "own"\nae_title = "O"\nhost = "h"\nport = 104\n'
           '[[destinations.rules]]\nset = "StationName"\nvalue = "RELAY-OWN"\n')
    processor, senders, spool = _processor(tmp_path, own)
    processor.process(_incoming(spool, "mr.dcm", "MR_small.dcm", "EG"))
    [plain], [mine] = senders["plain"].queued, senders["own"].queued
    a, b = _read(plain), _read(mine)
    assert b.StationName == "RELAY-OWN" and a.StationName != "RELAY-OWN"
    station = 0x00081010
    # The same tags both ways (a copy that lost or gained an attribute fails), then the
    # same bytes for every one of them but StationName.
    assert set(a.keys()) - {station} == set(b.keys()) - {station}  # noqa: SIM118 - tags
    for tag in a.keys():  # noqa: SIM118 - tags, not elements
        if tag == station:
            continue
        raw_a, raw_b = a.get_item(tag), b.get_item(tag)
        if isinstance(raw_a, RawDataElement) and isinstance(raw_b, RawDataElement):
            assert raw_a.value == raw_b.value, f"{tag} changed"
        else:  # pydicom already decoded it (an empty value): compare what it decoded
            assert a[tag].value == b[tag].value, f"{tag} changed"
    assert a.PixelData == b.PixelData and a.file_meta.TransferSyntaxUID == \
        b.file_meta.TransferSyntaxUID


def test_a_full_disk_after_the_edit_puts_the_object_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    processor, senders, spool = _processor(tmp_path, THREE)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # Linking the edited copies into the destinations' queues (the audit log, a subscriber
    # of the event stream, is no longer on the delivery path: its failure is logged).
    monkeypatch.setattr(spool, "publish", full_disk)
    ct = _incoming(spool, "ct.dcm", "CT_small.dcm", "EG")
    with pytest.raises(OSError):
        processor.process(ct)
    assert ct.exists(), "back in incoming/, to be processed again"
    assert list(spool.work.iterdir()) == [] and all(not s.queued for s in senders.values())
