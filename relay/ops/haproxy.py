"""A ready HAProxy configuration for several relays behind one address (high availability
with an existing balancer, not one of our own), rendered from templates/haproxy/ with jinja2.

Each relay keeps its own spool; HAProxy (TCP mode) gives each association to one relay and
stops sending new ones to a relay that fails its health check. The check speaks DICOM: an
A-ASSOCIATE-RQ for Verification, encoded by pynetdicom, must get an A-ASSOCIATE-AC back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)

from relay.config.model import Config, join_host_port, split_host_port
from relay.ops.systemd import templates_dir

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A-RELEASE-RQ: type 05, reserved, length 4, 4 reserved bytes (PS3.8 9.3.6).
RELEASE_RQ = "05000000000400000000"
CHECKS = ("dicom", "tcp")

@dataclass(frozen=True)
class BalancerOptions:
    listen: str = "0.0.0.0:104"  # where modalities send
    check: str = "dicom"  # dicom | tcp
    check_ae: str = "HAPROXY-CHECK"
    inter: str = "2s"
    fall: int = 2
    rise: int = 2
    maxconn: int = 2000
    run_as: str | None = "haproxy"  # Debian's haproxy user; None: as started


def associate_rq(called_ae: str, calling_ae: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    context = build_context(VERIFICATION, [IMPLICIT_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def render_haproxy(config: Config, relays: list[str], options: BalancerOptions) -> str:
    """haproxy.cfg for `relays` (addresses; the port defaults to [receiver].port)."""
    if not relays:
        raise ValueError("--relay: give at least one relay address (two or more for HA)")
    if options.check not in CHECKS:
        raise ValueError(f"--check: expected one of {', '.join(CHECKS)}, got {options.check!r}")
    if not re.fullmatch(r"\d+(ms|s|m)?", options.inter):
        raise ValueError(f"--inter: expected a duration such as 500ms or 2s, got "
                         f"{options.inter!r}")
    addresses = [join_host_port(*split_host_port(r, config.receiver.port)) for r in relays]
    listen = join_host_port(*split_host_port(options.listen, 104))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir() / "haproxy"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True, autoescape=False)  # noqa: S701 - a config file, not HTML
    return env.get_template("haproxy.cfg.j2").render(
        config=str(config.source.resolve()), listen=listen, ae_title=config.receiver.ae_title,
        relays=[(f"relay{i + 1}", a) for i, a in enumerate(addresses)],
        check=options.check, check_ae=options.check_ae,
        associate_rq=associate_rq(config.receiver.ae_title, options.check_ae).hex(),
        release_rq=RELEASE_RQ, inter=options.inter, fall=options.fall, rise=options.rise,
        maxconn=options.maxconn, run_as=options.run_as,
        idle_timeout=f"{config.receiver.idle_timeout:g}",
        # Longer than the relays' own idle timeout, so that they end idle associations.
        client_timeout=int(config.receiver.idle_timeout * 2 + 60))
