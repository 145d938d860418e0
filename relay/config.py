"""TOML configuration → typed config.

Every error names the file, the key and what was expected, because the person reading it is a
PACS administrator looking at a systemd journal, not at a Python traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("auto", "dcm4che", "dcmtk", "embedded")
CONVERTERS = ("embedded", "toolkit")
ON_MISSING = ("keep", "fail")
# DICOM AE titles: 1-16 characters of the default character repertoire, no backslash,
# not all spaces (PS3.5 6.2, VR AE).
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# Destination names become folder names under spool/out/: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: key: expected …, got …`."""


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS. For the receiver: our certificate and key, and the CA that peers'
    certificates must chain to. For a destination: the CA its certificate must chain to, and
    optionally our client certificate and key."""

    ca: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    require_peer_certificate: bool = True


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "DICOMRELAY"
    host: str = "0.0.0.0"  # noqa: S104 - a relay listens for modalities on the network
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # IP addresses or networks (CIDR); empty: any
    max_associations: int = 10
    # A peer silent this long is disconnected (association negotiation gets half of it); a
    # C-STORE whose data stops coming for request_timeout is aborted.
    idle_timeout: float = 60.0
    request_timeout: float = 60.0
    tls: TLSConfig | None = None  # set: TLS only, plain connections are refused


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("/srv/dicom_repo")


@dataclass(frozen=True)
class ToolkitConfig:
    engine: str = "auto"
    dcm4che_home: Path = Path("/opt/dcm4che-toolkit")
    # Where DCMTK's executables live. Never found by bare name on PATH: pynetdicom's console
    # scripts `storescp`/`storescu` shadow DCMTK's inside a virtualenv.
    dcmtk_bin: Path = Path("/usr/bin")
    converter: str = "embedded"


@dataclass(frozen=True)
class SenderConfig:
    calling_ae_title: str = "DICOMRELAY"
    batch_size: int = 200
    # A batch smaller than batch_size waits until its oldest object has been queued this long
    # (seconds) for more to join it. None: the engine's own default (Engine.batch_wait).
    batch_wait: float | None = None
    retry_initial: float = 2.0
    retry_max: float = 300.0
    timeout: float = 30.0


UNROUTED = ("keep", "delete")


@dataclass(frozen=True)
class ProcessConfig:
    workers: int = 2
    # An object no destination's filter takes: kept in failed/unrouted/, or deleted (after
    # its audit line).
    unrouted: str = "keep"


@dataclass(frozen=True)
class AuditConfig:
    path: Path | None = None  # None: audit.jsonl at the spool's root
    enabled: bool = True
    patient_values: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    # (host, port) where /metrics is served by `run` and `process`; None: no metrics server.
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: TLSConfig | None = None
    # Which objects it gets (relay.route.DestinationFilter; None: every object).
    filter: Any = field(default=None, compare=False)
    # Its own rules, applied after the global ones (EditRule and Deidentifier instances), and
    # a key that is equal for destinations whose rules are written the same (same result:
    # they share one file).
    rules: tuple[Any, ...] = field(default=(), compare=False)
    rules_key: str = field(default="", compare=False)
    # Objects of a study wait until none came for this long (seconds; 0: sent as they
    # arrive), or until hold_max after the first arrived.
    hold_until_stable: float = 0.0
    hold_max: float = 3600.0
    # Its table as written (canonical JSON): a reload replaces the destination's sender only
    # when this (or [sender]) changed.
    definition: str = field(default="", compare=False)
    # A DICOMweb destination: STOW-RS to {url}/studies (ae_title/host/port are then unused).
    url: str | None = None
    token_file: Path | None = None  # Authorization: Bearer <its content>
    username: str | None = None  # HTTP basic, with password_file
    password_file: Path | None = None
    # DIMSE: what the destination refuses in its transfer syntax is sent decompressed
    # (Explicit VR Little Endian) with "on-refusal", quarantined with "never".
    transcode: str = "never"

    @property
    def kind(self) -> str:
        """'dicomweb' (STOW-RS over HTTP) or 'dimse' (C-STORE through the engine)."""
        return "dicomweb" if self.url else "dimse"

    def describe(self) -> str:
        """Where it is, for log lines: AE@host:port or the URL."""
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    source: Path
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    toolkit: ToolkitConfig = field(default_factory=ToolkitConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Any, ...] = ()  # relay.rules.EditRule instances, in order
    log_level: str = "INFO"

    @property
    def audit_path(self) -> Path | None:
        if not self.audit.enabled:
            return None
        return self.audit.path or self.spool.path / "audit.jsonl"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"{self.source}: no destination named {name!r} (known: {known})")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


class Table:
    """One TOML table being read: knows its file and key prefix for error messages."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: {prefix}: expected a table, got {_describe(data)}")
        self.data: dict[str, Any] = data

    def error(self, key: str, expected: str, got: Any = None, *,
              show_got: bool = True) -> ConfigError:
        where = f"{self.prefix}.{key}" if self.prefix else key
        tail = f", got {_describe(got)}" if show_got else ""
        return ConfigError(f"{self.file}: {where}: expected {expected}{tail}")

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                raise self.error(key, "one of the known keys: " + ", ".join(allowed),
                                 show_got=False)

    def has(self, key: str) -> bool:
        return key in self.data

    def str(self, key: str, default: str | None = None, *, choices: Iterable[str] = (),
            pattern: re.Pattern[str] | None = None, what: str = "a string") -> str:
        if key not in self.data:
            if default is None:
                raise self.error(key, f"{what} (this key is required)", show_got=False)
            return default
        value = self.data[key]
        choices = tuple(choices)
        if not isinstance(value, str):
            raise self.error(key, what, value)
        if choices and value not in choices:
            raise self.error(key, "one of " + ", ".join(repr(c) for c in choices), value)
        if pattern is not None and not pattern.match(value):
            raise self.error(key, what, value)
        return value

    def int(self, key: str, default: int | None, *, lo: int, hi: int) -> int:
        if key not in self.data:
            if default is None:
                raise self.error(key, f"an integer {lo}-{hi} (this key is required)",
                                 show_got=False)
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(key, f"an integer {lo}-{hi}", value)
        return value

    def float(self, key: str, default: float, *, lo: float, hi: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self.error(key, f"a number {lo:g}-{hi:g}", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false", value)
        return value

    def str_list(self, key: str, *, pattern: re.Pattern[str] | None = None,
                 what: str = "a string") -> tuple[str, ...]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"a list of {what}s", value)
        for item in value:
            if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
                raise self.error(key, f"a list of {what}s", item)
        return tuple(value)

    def sub(self, key: str) -> Table:
        prefix = f"{self.prefix}.{key}" if self.prefix else key
        return Table(self.file, prefix, self.data.get(key, {}))

    def array_of_tables(self, key: str) -> list[Table]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"an array of tables ([[{key}]])", value)
        return [Table(self.file, f"[[{key}]][{i}]", item) for i, item in enumerate(value)]


AE_WHAT = "an AE title (1-16 printable ASCII characters, no backslash)"


def _receiver(t: Table) -> ReceiverConfig:
    t.check_keys(["ae_title", "host", "port", "allowed_calling_aets", "allowed_hosts",
                  "max_associations", "idle_timeout", "request_timeout", "tls"])
    d = ReceiverConfig()
    hosts = t.str_list("allowed_hosts", what="an IP address or network such as 10.1.0.0/16")
    for host in hosts:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise t.error("allowed_hosts", "a list of IP addresses or networks such as "
                          "10.1.0.0/16", host) from None
    return ReceiverConfig(
        ae_title=t.str("ae_title", d.ae_title, pattern=_AE_RE, what=AE_WHAT).strip(),
        host=t.str("host", d.host, what="an IP address or host name to listen on"),
        port=t.int("port", d.port, lo=1, hi=65535),
        allowed_calling_aets=tuple(
            a.strip() for a in t.str_list("allowed_calling_aets", pattern=_AE_RE, what=AE_WHAT)
        ),
        allowed_hosts=hosts,
        max_associations=t.int("max_associations", d.max_associations, lo=1, hi=1000),
        idle_timeout=t.float("idle_timeout", d.idle_timeout, lo=1, hi=3600),
        request_timeout=t.float("request_timeout", d.request_timeout, lo=1, hi=3600),
        tls=_tls(t.sub("tls"), server=True) if t.has("tls") else None,
    )


def _spool(t: Table) -> SpoolConfig:
    t.check_keys(["path"])
    path = Path(t.str("path", str(SpoolConfig().path), what="a folder path"))
    if not path.is_absolute():
        path = (t.file.parent / path).resolve()
    return SpoolConfig(path=path)


def _toolkit(t: Table) -> ToolkitConfig:
    t.check_keys(["engine", "dcm4che_home", "dcmtk_bin", "converter"])
    d = ToolkitConfig()
    return ToolkitConfig(
        engine=t.str("engine", d.engine, choices=ENGINES),
        dcm4che_home=Path(t.str("dcm4che_home", str(d.dcm4che_home), what="a folder path")),
        dcmtk_bin=Path(t.str("dcmtk_bin", str(d.dcmtk_bin), what="a folder path")),
        converter=t.str("converter", d.converter, choices=CONVERTERS),
    )


def _sender(t: Table, receiver: ReceiverConfig) -> SenderConfig:
    t.check_keys(["calling_ae_title", "batch_size", "batch_wait", "retry_initial", "retry_max",
                  "timeout"])
    d = SenderConfig()
    retry_initial = t.float("retry_initial", d.retry_initial, lo=0.01, hi=3600)
    retry_max = t.float("retry_max", d.retry_max, lo=0.01, hi=86400)
    if retry_max < retry_initial:
        raise t.error("retry_max", f"a number >= retry_initial ({retry_initial:g})", retry_max)
    return SenderConfig(
        calling_ae_title=t.str("calling_ae_title", receiver.ae_title, pattern=_AE_RE,
                               what=AE_WHAT).strip(),
        batch_size=t.int("batch_size", d.batch_size, lo=1, hi=100000),
        batch_wait=t.float("batch_wait", 0, lo=0, hi=60) if t.has("batch_wait") else None,
        retry_initial=retry_initial,
        retry_max=retry_max,
        timeout=t.float("timeout", d.timeout, lo=1, hi=3600),
    )


def _audit(t: Table) -> AuditConfig:
    t.check_keys(["path", "enabled", "patient_values"])
    path = None
    if t.has("path"):
        path = Path(t.str("path", what="a file path"))
        if not path.is_absolute():
            path = (t.file.parent / path).resolve()
    return AuditConfig(path=path, enabled=t.bool("enabled", True),
                       patient_values=t.bool("patient_values", True))


_HOST_PORT_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+))"
                           r"(?::(?P<port>\d{1,5}))?$")


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[IPv6]:port', or 'host' when there is a default port -> (host, port);
    ValueError saying what was expected otherwise."""
    match = _HOST_PORT_RE.match(text.strip())
    if match is None or (match.group("port") is None and default_port is None):
        raise ValueError(f"{text!r}: expected host:port or [IPv6]:port")
    port = int(match.group("port") or default_port or 0)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not between 1 and 65535")
    if match.group("v6"):
        try:
            ipaddress.IPv6Address(match.group("v6"))
        except ValueError:
            raise ValueError(f"{text!r}: not an IPv6 address in the brackets") from None
        return match.group("v6"), port
    return match.group("host"), port


def join_host_port(host: str, port: int) -> str:
    """The other way round: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics(t: Table) -> MetricsConfig:
    t.check_keys(["listen"])
    if not t.has("listen"):
        return MetricsConfig()
    text = t.str("listen", what='"host:port", e.g. "127.0.0.1:9110"')
    try:
        return MetricsConfig(listen=split_host_port(text))
    except ValueError:
        raise t.error("listen", '"host:port" (e.g. "127.0.0.1:9110", "[::1]:9110", '
                      '"0.0.0.0:9110")', text) from None


def _tls_file(t: Table, key: str) -> Path | None:
    if not t.has(key):
        return None
    path = Path(t.str(key, what="a PEM file path"))
    if not path.is_absolute():
        path = (t.file.parent / path).resolve()
    if not path.is_file():
        raise t.error(key, "an existing PEM file", str(path))
    return path


def _tls(t: Table, *, server: bool) -> TLSConfig:
    t.check_keys(["ca", "certificate", "private_key", "require_peer_certificate"])
    tls = TLSConfig(ca=_tls_file(t, "ca"), certificate=_tls_file(t, "certificate"),
                    private_key=_tls_file(t, "private_key"),
                    require_peer_certificate=t.bool("require_peer_certificate", True))
    if server and (tls.certificate is None or tls.private_key is None):
        raise t.error("certificate", "certificate and private_key for a TLS receiver",
                      show_got=False)
    if (tls.certificate is None) != (tls.private_key is None):
        raise t.error("private_key", "certificate and private_key together", show_got=False)
    if tls.require_peer_certificate and tls.ca is None:
        raise t.error("ca", "the CA that peers' certificates chain to (or "
                      "require_peer_certificate = false)", show_got=False)
    return tls


def _filter(t: Table) -> Any:
    from relay.route import DestinationFilter, FilterError, key_filter

    if not t.data:
        raise t.error("", "at least one key (no [destinations.filter] at all: every object)",
                      show_got=False)
    keys = []
    for key, value in t.data.items():
        try:
            keys.append(key_filter(key, value))
        except FilterError as exc:
            raise t.error(key, str(exc), value) from None
    return DestinationFilter(tuple(keys))


def _deidentify(t: Table) -> Any:
    from pydicom.datadict import tag_for_keyword

    from relay.deidentify import PROFILES, Deidentifier, DeidentifyError, read_secret

    t.check_keys(["deidentify", "secret_file", "keep", "retain_dates", "clean_descriptions"])
    profile = t.str("deidentify", choices=PROFILES)
    path = Path(t.str("secret_file", what="the file of the secret that keys replacement UIDs "
                      "and pseudonyms (at least 16 random bytes)"))
    if not path.is_absolute():
        path = (t.file.parent / path).resolve()
    try:
        secret = read_secret(path)
    except DeidentifyError as exc:
        raise t.error("secret_file", str(exc), show_got=False) from None
    keep = t.str_list("keep", what="DICOM keyword")
    for keyword in keep:
        if tag_for_keyword(keyword) is None:
            raise t.error("keep", "a list of DICOM keywords (e.g. PatientAge, StudyDate)",
                          keyword)
    return Deidentifier(secret=secret, keep=keep, retain_dates=t.bool("retain_dates", False),
                        clean_descriptions=t.bool("clean_descriptions", False), profile=profile)


def _destination_rules(t: Table) -> tuple[tuple[Any, ...], str]:
    from relay.rules import RuleError, rule_from_table

    value = t.data.get("rules", [])
    if not isinstance(value, list):
        raise t.error("rules", "an array of tables ([[destinations.rules]])", value)
    rules = []
    for i, item in enumerate(value):
        rt = Table(t.file, f"{t.prefix}.rules[{i}]", item)
        if rt.has("deidentify"):
            rules.append(_deidentify(rt))
            continue
        try:
            rules.append(rule_from_table(rt))
        except RuleError as exc:
            raise ConfigError(f"{t.file}: {rt.prefix}: {exc}") from None
    return tuple(rules), json.dumps(value, sort_keys=True, default=str) if value else ""


TRANSCODE = ("never", "on-refusal")
_DIMSE_KEYS = ("ae_title", "host", "port", "transcode")
_DICOMWEB_KEYS = ("url", "token_file", "username", "password_file")


def _dicomweb(t: Table) -> dict[str, Any]:
    """A DICOMweb destination's own keys (url and its credentials)."""
    for key in _DIMSE_KEYS:
        if t.has(key):
            raise t.error(key, "no DIMSE key in a DICOMweb destination (one with url): a table "
                          "has url, or ae_title/host/port", show_got=False)
    url = t.str("url", what="an http:// or https:// URL, e.g. "
                "\"https://archive.example.org/dicom-web\"")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query \
            or parsed.fragment:
        raise t.error("url", "an http:// or https:// URL with a host, without ?query or "
                      "#fragment (STOW-RS goes to {url}/studies)", url)
    token_file = _secret_file(t, "token_file")
    username = t.str("username", what="a user name") if t.has("username") else None
    password_file = _secret_file(t, "password_file")
    if token_file and (username or password_file):
        raise t.error("token_file", "either token_file (Bearer) or username + password_file "
                      "(basic), not both", show_got=False)
    if username is not None and password_file is None:
        raise t.error("password_file", "it with username (HTTP basic needs both)",
                      show_got=False)
    if password_file is not None and username is None:
        raise t.error("username", "it with password_file (HTTP basic needs both)",
                      show_got=False)
    return {"url": url.rstrip("/"), "token_file": token_file, "username": username,
            "password_file": password_file, "ae_title": "", "host": parsed.hostname,
            "port": parsed.port or (443 if parsed.scheme == "https" else 80)}


def _secret_file(t: Table, key: str) -> Path | None:
    if not t.has(key):
        return None
    path = Path(t.str(key, what="a file path"))
    if not path.is_absolute():
        path = (t.file.parent / path).resolve()
    if not path.is_file():
        raise t.error(key, "an existing file holding the secret", str(path))
    return path


def _destination(t: Table) -> Destination:
    t.check_keys(["name", *_DIMSE_KEYS, *_DICOMWEB_KEYS, "tls", "filter", "rules",
                  "hold_until_stable", "hold_max"])
    rules, rules_key = _destination_rules(t)
    hold = t.float("hold_until_stable", 0.0, lo=0, hi=7 * 86400)
    hold_max = t.float("hold_max", max(3600.0, hold), lo=1, hi=30 * 86400)
    if hold and hold_max < hold:
        raise t.error("hold_max", f"a number of seconds >= hold_until_stable ({hold:g})",
                      hold_max)
    if t.has("url"):
        where = _dicomweb(t)
    else:
        for key in _DICOMWEB_KEYS[1:]:
            if t.has(key):
                raise t.error(key, "it only with url (a DICOMweb destination)", show_got=False)
        where = {
            "ae_title": t.str("ae_title", pattern=_AE_RE, what=AE_WHAT).strip(),
            "host": t.str("host", what="an IP address or host name"),
            "port": t.int("port", None, lo=1, hi=65535),
            "transcode": t.str("transcode", "never", choices=TRANSCODE),
        }
    return Destination(
        name=t.str("name", what="a name of letters, digits, '-', '_' or '.' (it names a spool "
                   "folder)", pattern=_NAME_RE),
        **where,
        tls=_tls(t.sub("tls"), server=False) if t.has("tls") else None,
        filter=_filter(t.sub("filter")) if t.has("filter") else None,
        rules=rules,
        rules_key=rules_key,
        hold_until_stable=hold,
        hold_max=hold_max,
        definition=json.dumps(t.data, sort_keys=True, default=str),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming file, key and expectation."""
    from relay.rules import RuleError, rule_from_table  # rules need config's Table

    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None

    top = Table(file, "", raw)
    top.check_keys(["receiver", "spool", "toolkit", "sender", "process", "audit", "metrics",
                    "destinations", "rules", "log_level"])
    receiver = _receiver(top.sub("receiver"))
    process = top.sub("process")
    process.check_keys(["workers", "unrouted"])
    destinations = tuple(_destination(t) for t in top.array_of_tables("destinations"))
    seen: set[str] = set()
    for i, dest in enumerate(destinations):
        if dest.name in seen:
            raise ConfigError(f"{file}: [[destinations]][{i}].name: expected a unique name, "
                              f"got {dest.name!r} twice")
        seen.add(dest.name)
    rules = []
    for t in top.array_of_tables("rules"):
        if t.has("deidentify"):
            raise t.error("deidentify", "it in a destination's own rules "
                          "([[destinations.rules]]): de-identified copies go to the "
                          "destinations that need them", show_got=False)
        try:
            rules.append(rule_from_table(t))
        except RuleError as exc:
            raise ConfigError(f"{file}: {t.prefix}: {exc}") from None
    return Config(
        source=file,
        receiver=receiver,
        spool=_spool(top.sub("spool")),
        toolkit=_toolkit(top.sub("toolkit")),
        sender=_sender(top.sub("sender"), receiver),
        process=ProcessConfig(workers=process.int("workers", ProcessConfig().workers, lo=1, hi=64),
                              unrouted=process.str("unrouted", "keep", choices=UNROUTED)),
        audit=_audit(top.sub("audit")),
        metrics=_metrics(top.sub("metrics")),
        destinations=destinations,
        rules=tuple(rules),
        log_level=top.str("log_level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    )
