"""The typed configuration: what a relay.toml says, as frozen dataclasses.

This module imports no other part of the relay, so that every stage may import it. The
values a destination carries that are built by a stage (its filter, its rules, a
de-identification profile) are typed here by what the relay asks of them (Protocols), and
built by relay.config.load from the stage packages.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lxml import etree
    from pydicom.dataset import Dataset

ENGINES = ("auto", "dcm4che", "dcmtk", "embedded")
CONVERTERS = ("embedded", "toolkit")
ON_MISSING = ("keep", "fail")
UNROUTED = ("keep", "delete")
TRANSCODE = ("never", "on-refusal")
RETRIEVE = ("get", "move")


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: key: expected …, got …`."""


# --- what the stages build from the config --------------------------------------------------


class EditRule(Protocol):
    """One rule of the three XML forms (relay.edit.rules): keyword, XPath, XSLT."""

    @property
    def on_missing(self) -> str:
        """What a missing source means: "keep" (forward unchanged) or "fail"."""
        ...

    def apply(self, root: etree._Element) -> etree._Element:
        """Edit the NativeDicomModel document; return its (possibly new) root.

        Raises MissingSource before changing anything, so `on_missing = "keep"` can go on
        with the document as it was.
        """
        ...

    def describe(self) -> str: ...

    def reads(self) -> frozenset[int] | None:
        """The top-level tags this rule reads or writes, or None: it may look at anything."""
        ...


@runtime_checkable
class Deidentification(Protocol):
    """A de-identification step of a destination's rules (relay.edit.deidentify)."""

    @property
    def profile(self) -> str: ...

    def apply(self, ds: Dataset) -> None: ...

    def describe(self) -> str: ...


@runtime_checkable
class PixelRedaction(Protocol):
    """A `redact` step of a destination's rules (relay.edit.burnedin.Redaction)."""

    def apply(self, ds: Dataset, path: Path) -> str | None: ...

    def regions_for(self, ds: Dataset) -> tuple[Any, ...]: ...

    def describe(self) -> str: ...


# A destination's own rules: the XML forms, de-identification and pixel redaction, in their
# order.
DestinationRule = EditRule | Deidentification | PixelRedaction


class KeyMatch(Protocol):
    """One key of a destination's filter (relay.route.filters.KeyFilter)."""

    @property
    def key(self) -> str: ...

    @property
    def include(self) -> tuple[str, ...]: ...

    @property
    def exclude(self) -> tuple[str, ...]: ...

    def matches(self, value: str) -> bool: ...

    def explain(self, value: str) -> str: ...


class Filter(Protocol):
    """A destination's filter (relay.route.filters.DestinationFilter)."""

    @property
    def keys(self) -> tuple[KeyMatch, ...]: ...

    @property
    def attribute_keywords(self) -> tuple[str, ...]: ...

    def failing_key(self, values: Mapping[str, str]) -> KeyMatch | None: ...


# --- the tables ---------------------------------------------------------------------------


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
    # Connections one host may hold (0: max_associations - 2, so that a host flooding the
    # receiver always leaves room for the others; behind a balancer, set it to
    # max_associations: every connection then comes from the balancer).
    max_associations_per_host: int = 0
    # A peer silent this long is disconnected (association negotiation gets half of it); a
    # C-STORE whose data stops coming for request_timeout is aborted.
    idle_timeout: float = 60.0
    request_timeout: float = 60.0
    # One object's data set at most (megabytes), as received and once inflated (a deflated
    # transfer syntax): larger ones are refused.
    max_object_mb: int = 2048
    tls: TLSConfig | None = None  # set: TLS only, plain connections are refused

    @property
    def per_host(self) -> int:
        """Connections one host may hold."""
        return self.max_associations_per_host or max(1, self.max_associations - 2)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("/srv/dicom_repo")
    # Below this much free space (megabytes) the receiver takes no new object; None: the
    # larger of 1 GiB and twice the largest object seen (relay.receive.floor).
    min_free_mb: float | None = None
    # Delivered copies kept this long in delivered/<dest>/ so that a study can be sent
    # again from the console (0: deleted at once, as always).
    keep_delivered_hours: float = 0.0


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
class HistoryConfig:
    enabled: bool = True
    # None: SQLite at <spool>/history.sqlite. "postgresql://user@host/db": one history
    # shared by several relays.
    url: str | None = None
    relay_name: str = ""  # "": the host name
    keep_days: float = 90.0  # 0: never pruned


@dataclass(frozen=True)
class ConsoleConfig:
    # (host, port) of the console and the API, served by `run` and `process`; None: off.
    listen: tuple[str, int] | None = None
    users_file: Path | None = None  # None: users.json beside the config file
    tls: TLSConfig | None = None  # [console.tls] cert, key


@dataclass(frozen=True)
class Modality:
    """A [[modalities]] entry: a peer the relay connects to on its own, by AE title (a
    C-MOVE destination named by a requester; storage commitment's reports)."""

    ae_title: str
    host: str
    port: int
    tls: TLSConfig | None = None

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class QueryConfig:
    """[query]: C-FIND, C-MOVE and C-GET through the relay, answered by a destination."""

    destination: str  # the [[destinations]] entry (DIMSE) that answers queries
    port: int = 11113  # where the relay serves query/retrieve (every engine)
    retrieve: str = "get"  # how the relay fetches from the PACS: get | move
    move_ae_title: str = "DICOMRELAY"  # the relay's AE title as a C-MOVE destination
    allowed_calling_aets: tuple[str, ...] = ()  # narrows [receiver].allowed_calling_aets


@dataclass(frozen=True)
class CommitmentConfig:
    """[commitment]: Storage Commitment Push Model served through the relay."""

    port: int = 11113  # where the SCP listens (every engine); shared with [query] if equal
    timeout: float = 3600.0  # seconds: instances not confirmed by then are reported failed


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: TLSConfig | None = None
    # Which objects it gets (None: every object).
    filter: Filter | None = field(default=None, compare=False)
    # Its own rules, applied after the global ones, and a key that is equal for destinations
    # whose rules are written the same (same result: they share one file).
    rules: tuple[DestinationRule, ...] = field(default=(), compare=False)
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
    # Ask this PACS for storage commitment too: an instance counts as committed there only
    # when it reported so (not on C-STORE success).
    commitment: bool = False

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
    history: HistoryConfig = field(default_factory=HistoryConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    query: QueryConfig | None = None  # None: no query/retrieve through the relay
    commitment: CommitmentConfig | None = None  # None: storage commitment not served
    modalities: tuple[Modality, ...] = ()
    destinations: tuple[Destination, ...] = ()
    rules: tuple[EditRule, ...] = ()  # the global rules, in order
    log_level: str = "INFO"

    @property
    def audit_path(self) -> Path | None:
        if not self.audit.enabled:
            return None
        return self.audit.path or self.spool.path / "audit.jsonl"

    @property
    def history_url(self) -> str:
        return self.history.url or f"sqlite:///{self.spool.path / 'history.sqlite'}"

    @property
    def users_file(self) -> Path:
        return self.console.users_file or self.source.parent / "users.json"

    @property
    def relay_name(self) -> str:
        return self.history.relay_name or socket.gethostname()

    def modality(self, ae_title: str) -> Modality | None:
        """The [[modalities]] entry of an AE title (AE titles compare without their
        padding), or None."""
        for modality in self.modalities:
            if modality.ae_title == ae_title.strip():
                return modality
        return None

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"{self.source}: no destination named {name!r} (known: {known})")


# --- addresses ----------------------------------------------------------------------------

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


def describe_value(value: Any) -> str:
    """A value as a config error shows what it got: `str 'eleven'`."""
    return f"{type(value).__name__} {value!r}"
