"""TOML file -> Config. Every error names the file, the key and what was expected.

The stages' own objects (a destination's filter, the rules, a de-identification profile)
are built here, from the stage packages, so that a config that loads is a config that runs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from relay.config.model import (
    CONVERTERS,
    ENGINES,
    ON_MISSING,
    RETRIEVE,
    TRANSCODE,
    UNROUTED,
    AuditConfig,
    CommitmentConfig,
    Config,
    ConfigError,
    ConsoleConfig,
    Destination,
    DestinationRule,
    EditRule,
    HistoryConfig,
    MetricsConfig,
    Modality,
    ProcessConfig,
    QueryConfig,
    ReceiverConfig,
    SenderConfig,
    SpoolConfig,
    TLSConfig,
    ToolkitConfig,
    split_host_port,
)
from relay.config.reader import Table
from relay.edit.burnedin import RedactEntry, Redaction, RedactRegion
from relay.edit.deidentify import PROFILES, Deidentifier, DeidentifyError, read_secret
from relay.edit.rules import KeywordRule, RuleError, XPathRule, XSLTRule
from relay.route.filters import DestinationFilter, FilterError, key_filter

# DICOM AE titles: 1-16 characters of the default character repertoire, no backslash,
# not all spaces (PS3.5 6.2, VR AE).
AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
AE_WHAT = "an AE title (1-16 printable ASCII characters, no backslash)"
# Destination names become folder names under spool/out/: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _receiver(t: Table) -> ReceiverConfig:
    t.check_keys(["ae_title", "host", "port", "allowed_calling_aets", "allowed_hosts",
                  "max_associations", "max_associations_per_host", "idle_timeout",
                  "request_timeout", "max_object_mb", "tls"])
    d = ReceiverConfig()
    hosts = t.str_list("allowed_hosts", what="an IP address or network such as 10.1.0.0/16")
    for host in hosts:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise t.error("allowed_hosts", "a list of IP addresses or networks such as "
                          "10.1.0.0/16", host) from None
    max_associations = t.int("max_associations", d.max_associations, lo=1, hi=1000)
    per_host = t.int("max_associations_per_host", 0, lo=0, hi=1000)
    if per_host > max_associations:
        raise t.error("max_associations_per_host", f"at most max_associations "
                      f"({max_associations})", per_host)
    return ReceiverConfig(
        ae_title=t.str("ae_title", d.ae_title, pattern=AE_RE, what=AE_WHAT).strip(),
        host=t.str("host", d.host, what="an IP address or host name to listen on"),
        port=t.int("port", d.port, lo=1, hi=65535),
        allowed_calling_aets=tuple(
            a.strip() for a in t.str_list("allowed_calling_aets", pattern=AE_RE, what=AE_WHAT)
        ),
        allowed_hosts=hosts,
        max_associations=max_associations,
        max_associations_per_host=per_host,
        idle_timeout=t.float("idle_timeout", d.idle_timeout, lo=1, hi=3600),
        request_timeout=t.float("request_timeout", d.request_timeout, lo=1, hi=3600),
        max_object_mb=t.int("max_object_mb", d.max_object_mb, lo=1, hi=1024 * 1024),
        tls=_tls(t.sub("tls"), server=True) if t.has("tls") else None,
    )


def _spool(t: Table) -> SpoolConfig:
    t.check_keys(["path", "min_free_mb", "keep_delivered_hours"])
    d = SpoolConfig()
    return SpoolConfig(
        path=t.path("path", what="a folder path") if t.has("path") else d.path,
        min_free_mb=(t.float("min_free_mb", 0, lo=0.01, hi=1e9) if t.has("min_free_mb")
                     else None),
        keep_delivered_hours=t.float("keep_delivered_hours", 0, lo=0, hi=24 * 365))


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
        calling_ae_title=t.str("calling_ae_title", receiver.ae_title, pattern=AE_RE,
                               what=AE_WHAT).strip(),
        batch_size=t.int("batch_size", d.batch_size, lo=1, hi=100000),
        batch_wait=t.float("batch_wait", 0, lo=0, hi=60) if t.has("batch_wait") else None,
        retry_initial=retry_initial,
        retry_max=retry_max,
        timeout=t.float("timeout", d.timeout, lo=1, hi=3600),
    )


def _process(t: Table) -> ProcessConfig:
    t.check_keys(["workers", "unrouted"])
    return ProcessConfig(workers=t.int("workers", ProcessConfig().workers, lo=1, hi=64),
                         unrouted=t.str("unrouted", "keep", choices=UNROUTED))


def _audit(t: Table) -> AuditConfig:
    t.check_keys(["path", "enabled", "patient_values"])
    return AuditConfig(path=t.path("path") if t.has("path") else None,
                       enabled=t.bool("enabled", True),
                       patient_values=t.bool("patient_values", True))


def _history(t: Table) -> HistoryConfig:
    t.check_keys(["enabled", "url", "relay_name", "keep_days"])
    d = HistoryConfig()
    url = None
    if t.has("url"):
        url = t.str("url", what='a database URL ("postgresql://user:password@host/db" or '
                    '"sqlite:////path/history.sqlite")')
        if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://",
                               "sqlite:///")):
            raise t.error("url", 'a postgresql:// or sqlite:/// URL', url)
    return HistoryConfig(
        enabled=t.bool("enabled", d.enabled), url=url,
        relay_name=t.str("relay_name", "", pattern=re.compile(r"^[^\x00-\x1f]{0,64}$"),
                         what="a name of at most 64 printable characters"),
        keep_days=t.float("keep_days", d.keep_days, lo=0, hi=36500))


def _console(t: Table) -> ConsoleConfig:
    t.check_keys(["listen", "users_file", "tls"])
    listen = None
    if t.has("listen"):
        text = t.str("listen", what='"host:port", e.g. "127.0.0.1:8080"')
        try:
            listen = split_host_port(text)
        except ValueError:
            raise t.error("listen", '"host:port" (e.g. "127.0.0.1:8080", "0.0.0.0:8443")',
                          text) from None
    tls = None
    if t.has("tls"):
        sub = t.sub("tls")
        sub.check_keys(["cert", "key"])
        cert = _existing_file(sub, "cert", "an existing PEM certificate file")
        key = _existing_file(sub, "key", "an existing PEM private key file")
        if cert is None or key is None:
            raise sub.error("cert" if cert is None else "key",
                            "both cert and key (the console's TLS)", show_got=False)
        tls = TLSConfig(certificate=cert, private_key=key, require_peer_certificate=False)
    return ConsoleConfig(listen=listen,
                         users_file=t.path("users_file") if t.has("users_file") else None,
                         tls=tls)


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


def _existing_file(t: Table, key: str, expected: str, what: str = "a file path"
                   ) -> Path | None:
    """An optional key naming a file that must exist (relative to the config's folder)."""
    if not t.has(key):
        return None
    path = t.path(key, what=what)
    if not path.is_file():
        raise t.error(key, expected, str(path))
    return path


def _tls(t: Table, *, server: bool) -> TLSConfig:
    t.check_keys(["ca", "certificate", "private_key", "require_peer_certificate"])
    tls = TLSConfig(**{key: _existing_file(t, key, "an existing PEM file", "a PEM file path")
                       for key in ("ca", "certificate", "private_key")},
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


def _filter(t: Table) -> DestinationFilter:
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


def _deidentify(t: Table) -> Deidentifier:
    t.check_keys(["deidentify", "secret_file", "keep", "retain_dates", "clean_descriptions"])
    profile = t.str("deidentify", choices=PROFILES)
    path = t.path("secret_file", what="the file of the secret that keys replacement UIDs "
                  "and pseudonyms (at least 16 random bytes)")
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


_REDACT_EXAMPLE = ('a list of tables such as { Modality = "US", Manufacturer = "ACME*", '
                   'Rows = 600, Columns = 800, regions = [[0, 0, 800, 60]] }')


def _redact(t: Table) -> Redaction:
    """A `redact = [...]` rule: entries of attributes to match and [x, y, width, height]
    regions to blank."""
    t.check_keys(["redact"])
    value = t.data["redact"]
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise t.error("redact", _REDACT_EXAMPLE, value)
    entries = []
    for i, item in enumerate(value):
        where = f"redact[{i}]"
        regions = item.get("regions")
        if not isinstance(regions, list) or not regions:
            raise t.error(f"{where}.regions", "a list of [x, y, width, height] regions in "
                          "pixels, e.g. [[0, 0, 800, 60]]", regions)
        parsed = []
        for region in regions:
            if not (isinstance(region, list) and len(region) == 4
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                            for n in region) and region[2] > 0 and region[3] > 0):
                raise t.error(f"{where}.regions", "[x, y, width, height]: four whole numbers, "
                              "x and y from the top left corner, width and height above 0",
                              region)
            parsed.append(RedactRegion(*region))
        keys = []
        for key, patterns in item.items():
            if key == "regions":
                continue
            if isinstance(patterns, int) and not isinstance(patterns, bool):
                patterns = str(patterns)
            try:
                keys.append(key_filter(key, patterns))
            except FilterError as exc:
                raise t.error(f"{where}.{key}", str(exc), patterns) from None
        if not keys:
            raise t.error(where, "at least one attribute the objects must match besides "
                          "regions (Modality, Manufacturer, Rows, Columns, …), so that no "
                          "other image is blanked by accident", item)
        size = {k: item[k] for k in ("Columns", "Rows") if isinstance(item.get(k), int)}
        for r in parsed:
            if r.x + r.width > size.get("Columns", r.x + r.width) or \
                    r.y + r.height > size.get("Rows", r.y + r.height):
                raise t.error(f"{where}.regions", f"regions inside the {item.get('Columns')}"
                              f" x {item.get('Rows')} image the entry matches", str(r))
        written = ", ".join(f"{k} = {item[k]!r}" for k in item if k != "regions")
        entries.append(RedactEntry(DestinationFilter(tuple(keys)), tuple(parsed),
                                   f"{written}: {', '.join(map(str, parsed))}"))
    return Redaction(tuple(entries))


def rule(t: Table) -> EditRule:
    """One rule of the three XML forms from a [[rules]] (or [[destinations.rules]]) table."""
    forms = [k for k in ("set", "xpath", "xslt") if t.has(k)]
    if len(forms) != 1:
        raise ConfigError(f"{t.file}: {t.prefix}: expected exactly one of the keys set "
                          "(keyword form), xpath (XPath form) or xslt (XSLT form)")
    on_missing = t.str("on_missing", "keep", choices=ON_MISSING)
    try:
        if forms[0] == "set":
            t.check_keys(["set", "copy_from", "value", "delete", "on_missing"])
            try:
                return KeywordRule(
                    target=t.str("set", what="a DICOM keyword such as PatientID"),
                    copy_from=t.str("copy_from") if t.has("copy_from") else None,
                    value=t.str("value") if t.has("value") else None,
                    delete=t.bool("delete", False),
                    on_missing=on_missing,
                )
            except RuleError as exc:
                raise RuleError(f"set: {exc}") from None
        if forms[0] == "xpath":
            t.check_keys(["xpath", "value_from_xpath", "value", "on_missing"])
            return XPathRule(
                xpath=t.str("xpath"),
                value_from_xpath=(t.str("value_from_xpath") if t.has("value_from_xpath")
                                  else None),
                value=t.str("value") if t.has("value") else None,
                on_missing=on_missing,
            )
        t.check_keys(["xslt", "params"])
        path = t.path("xslt", what="a stylesheet file path")
        params = t.data.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise t.error("params", "a table of string values", params)
        return XSLTRule(path, params)
    except RuleError as exc:
        raise ConfigError(f"{t.file}: {t.prefix}: {exc}") from None


def _destination_rules(t: Table) -> tuple[tuple[DestinationRule, ...], str]:
    value = t.data.get("rules", [])
    if not isinstance(value, list):
        raise t.error("rules", "an array of tables ([[destinations.rules]])", value)
    rules: list[DestinationRule] = []
    for i, item in enumerate(value):
        rt = Table(t.file, f"{t.prefix}.rules[{i}]", item)
        rules.append(_deidentify(rt) if rt.has("deidentify") else
                     _redact(rt) if rt.has("redact") else rule(rt))
    return tuple(rules), json.dumps(value, sort_keys=True, default=str) if value else ""


_DIMSE_KEYS = ("ae_title", "host", "port", "transcode", "commitment")
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
    holding = "an existing file holding the secret"
    token_file = _existing_file(t, "token_file", holding)
    username = t.str("username", what="a user name") if t.has("username") else None
    password_file = _existing_file(t, "password_file", holding)
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


def _destination(t: Table) -> Destination:
    t.check_keys(["name", *_DIMSE_KEYS, *_DICOMWEB_KEYS, "tls", "filter", "rules",
                  "hold_until_stable", "hold_max", "commitment"])
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
            "ae_title": t.str("ae_title", pattern=AE_RE, what=AE_WHAT).strip(),
            "host": t.str("host", what="an IP address or host name"),
            "port": t.int("port", None, lo=1, hi=65535),
            "transcode": t.str("transcode", "never", choices=TRANSCODE),
            "commitment": t.bool("commitment", False),
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


def _modalities(top: Table) -> tuple[Modality, ...]:
    modalities: list[Modality] = []
    for t in top.array_of_tables("modalities"):
        t.check_keys(["ae_title", "host", "port", "tls"])
        modality = Modality(
            ae_title=t.str("ae_title", pattern=AE_RE, what=AE_WHAT).strip(),
            host=t.str("host", what="an IP address or host name"),
            port=t.int("port", None, lo=1, hi=65535),
            tls=_tls(t.sub("tls"), server=False) if t.has("tls") else None)
        if any(m.ae_title == modality.ae_title for m in modalities):
            raise t.error("ae_title", "an AE title no other [[modalities]] entry has",
                          modality.ae_title)
        modalities.append(modality)
    return tuple(modalities)


def _query(t: Table, receiver: ReceiverConfig,
           destinations: tuple[Destination, ...]) -> QueryConfig:
    """[query] (absent: no query/retrieve through the relay)."""
    t.check_keys(["destination", "port", "retrieve", "move_ae_title", "allowed_calling_aets"])
    name = t.str("destination", what="the name of the [[destinations]] entry that answers "
                 "queries (a DIMSE one: ae_title, host, port)")
    dest = next((d for d in destinations if d.name == name), None)
    if dest is None:
        known = ", ".join(d.name for d in destinations) or "none configured"
        raise t.error("destination", f"the name of a [[destinations]] entry ({known})", name)
    if dest.kind != "dimse":
        raise t.error("destination", "a DIMSE destination (ae_title, host, port): queries are "
                      "C-FIND, not DICOMweb", name)
    d = QueryConfig(destination=name)
    port = t.int("port", d.port, lo=1, hi=65535)
    if port == receiver.port:
        raise t.error("port", f"a port other than [receiver].port ({receiver.port}): the "
                      "receiver owns that one (the embedded engine answers queries there "
                      "too)", port)
    allowed = tuple(a.strip() for a in t.str_list("allowed_calling_aets", pattern=AE_RE,
                                                 what=AE_WHAT))
    outside = [a for a in allowed if receiver.allowed_calling_aets
               and a not in receiver.allowed_calling_aets]
    if outside:
        raise t.error("allowed_calling_aets", "AE titles that [receiver].allowed_calling_aets "
                      "also allows (it narrows that list)", outside[0])
    return QueryConfig(
        destination=name, port=port,
        retrieve=t.str("retrieve", d.retrieve, choices=RETRIEVE),
        move_ae_title=t.str("move_ae_title", receiver.ae_title, pattern=AE_RE,
                            what=AE_WHAT).strip(),
        allowed_calling_aets=allowed)


def _commitment(t: Table, receiver: ReceiverConfig, modalities: tuple[Modality, ...],
                query: QueryConfig | None) -> CommitmentConfig | None:
    """[commitment] (absent, or enabled = false: not served)."""
    t.check_keys(["enabled", "port", "timeout"])
    if not t.bool("enabled", True):
        return None
    d = CommitmentConfig()
    port = t.int("port", query.port if query is not None else d.port, lo=1, hi=65535)
    if port == receiver.port:
        raise t.error("port", f"a port other than [receiver].port ({receiver.port}): the "
                      "receiver owns that one (the embedded engine answers storage "
                      "commitment there too)", port)
    # A report goes on a new association when the modality does not wait for it on its
    # request's: every AE title that may ask needs an address.
    known = {m.ae_title for m in modalities}
    missing = [a for a in receiver.allowed_calling_aets if a not in known]
    if missing:
        raise t.error("enabled", "a [[modalities]] entry (ae_title, host, port) for each of "
                      "[receiver].allowed_calling_aets, where storage commitment sends its "
                      f"reports; none for {', '.join(missing)}", show_got=False)
    return CommitmentConfig(port=port, timeout=t.float("timeout", d.timeout, lo=1,
                                                       hi=30 * 86400))


def _global_rules(top: Table) -> tuple[EditRule, ...]:
    rules = []
    for t in top.array_of_tables("rules"):
        if t.has("deidentify"):
            raise t.error("deidentify", "it in a destination's own rules "
                          "([[destinations.rules]]): de-identified copies go to the "
                          "destinations that need them", show_got=False)
        if t.has("redact"):
            raise t.error("redact", "it in a destination's own rules ([[destinations.rules]]"
                          "): it blanks the copies of the destinations that need it",
                          show_got=False)
        rules.append(rule(t))
    return tuple(rules)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming file, key and expectation."""
    file = Path(path)
    top = Table(file, "", _read_toml(file))
    top.check_keys(["receiver", "spool", "toolkit", "sender", "process", "audit", "metrics",
                    "history", "console", "query", "commitment", "modalities", "destinations",
                    "rules",
                    "log_level"])
    receiver = _receiver(top.sub("receiver"))
    process = _process(top.sub("process"))
    destinations = tuple(_destination(t) for t in top.array_of_tables("destinations"))
    seen: set[str] = set()
    for i, dest in enumerate(destinations):
        if dest.name in seen:
            raise ConfigError(f"{file}: [[destinations]][{i}].name: expected a unique name, "
                              f"got {dest.name!r} twice")
        seen.add(dest.name)
    rules = _global_rules(top)
    query = _query(top.sub("query"), receiver, destinations) if top.has("query") else None
    modalities = _modalities(top)
    return Config(
        source=file,
        receiver=receiver,
        spool=_spool(top.sub("spool")),
        toolkit=_toolkit(top.sub("toolkit")),
        sender=_sender(top.sub("sender"), receiver),
        process=process,
        audit=_audit(top.sub("audit")),
        metrics=_metrics(top.sub("metrics")),
        history=_history(top.sub("history")),
        console=_console(top.sub("console")),
        query=query,
        commitment=(_commitment(top.sub("commitment"), receiver, modalities, query)
                    if top.has("commitment") else None),
        modalities=modalities,
        destinations=destinations,
        rules=rules,
        log_level=top.str("log_level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    )
