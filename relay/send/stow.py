"""The DICOMweb sender: STOW-RS (PS3.18 10.5) to a destination with `url`, over HTTP(S).

It has the same small interface as an engine's sending side (send, release, echo), so the
destination's sender does not ask which kind it talks to: DIMSE destinations are sent to
through the engine, DICOMweb ones through this. With `requests` (urllib3 underneath): a
kept-alive session per destination, TLS with a CA of our choosing, streamed request bodies.

Each request is `multipart/related; type="application/dicom"`, many instances bounded by count
and bytes, streamed from disk part by part (never a whole request in memory). Per instance,
the answer comes from the response's ReferencedSOPSequence / FailedSOPSequence:
- stored (with or without a warning) -> delivered;
- FailureReason 0xA7xx, HTTP 5xx / 408 / 429, timeouts, connection errors -> retried
  (Retry-After honoured);
- any other FailureReason, and HTTP 4xx -> failed/ with the code and the server's message
  (401/403 name the credentials key).
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from relay import __version__
from relay.config.model import Destination
from relay.send.results import (
    DestinationUnavailable,
    Outcome,
    SendResult,
    ToolFailure,
    Transport,
    classify_status,
    read_outgoing,
)

log = logging.getLogger("relay.stow")

# One request carries at most this much (a study of large objects becomes several requests:
# each is one transaction for the server, and one retry unit for us).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_REQUEST_INSTANCES = 200
# A batch goes as this many requests at once (each on its own kept-alive connection): a
# server stores one request's instances one after the other, two requests use two cores.
# 500 small instances to Orthanc: 2.8-3.0 s in one stream, 1.8-2.0 s in two (measured).
PARALLEL_REQUESTS = 2
MIN_SPLIT = 10  # instances per request below which a batch is not split for parallelism
CHUNK = 1024 * 1024
RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# DICOM JSON tags (PS3.18 Table 10.5.3-1)
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


@dataclass(frozen=True)
class Part:
    path: Path
    sop_instance_uid: str
    size: int


class MultipartBody:
    """A multipart/related request body read from the files as it is sent: `requests` sees
    a stream of known length (Content-Length, no chunked encoding, which not every server
    takes) and reads it a block at a time."""

    def __init__(self, parts: list[Part], boundary: str) -> None:
        self.boundary = boundary
        self._pieces: list[bytes | Part] = []
        for part in parts:
            self._pieces.append(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {part.size}\r\n\r\n".encode("ascii"))
            self._pieces.append(part)
            self._pieces.append(b"\r\n")
        self._pieces.append(f"--{boundary}--\r\n".encode("ascii"))
        self.length = sum(len(p) if isinstance(p, bytes) else p.size for p in self._pieces)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            sent = 0
            with open(piece.path, "rb") as fp:
                while chunk := fp.read(CHUNK):
                    sent += len(chunk)
                    yield chunk
            if sent != piece.size:  # changed under us: the Content-Length would lie
                raise OSError(f"{piece.path}: its size changed while it was being sent")


def request_groups(parts: list[Part], max_bytes: int = MAX_REQUEST_BYTES,
                   max_count: int = MAX_REQUEST_INSTANCES) -> list[list[Part]]:
    """Split parts into requests of at most max_count instances and max_bytes (an instance
    larger than max_bytes goes alone)."""
    groups: list[list[Part]] = []
    size = 0
    for part in parts:
        if not groups or len(groups[-1]) >= max_count or (
                groups[-1] and size + part.size > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += part.size
    return groups


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _items(body: Any, tag: str) -> list[dict[str, Any]]:
    seq = body.get(tag, {}) if isinstance(body, dict) else {}
    value = seq.get("Value", []) if isinstance(seq, dict) else []
    return [item for item in value if isinstance(item, dict)]


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag, {})
    value = element.get("Value", []) if isinstance(element, dict) else []
    return value[0] if value else None


def results_from_response(parts: list[Part], http_status: int, body: Any, message: str,
                          credentials: str, wait: float | None = None) -> list[SendResult]:
    """One result per part from a STOW-RS response: its HTTP status, its DICOM JSON body
    (None when there is none or it is not JSON) and the server's message (for sidecars)."""
    def each(outcome: Outcome, status: int | None, detail: str,
             retry: float | None = None) -> list[SendResult]:
        return [SendResult(p.path, outcome, status, detail, http_status=http_status,
                           retry_after=retry) for p in parts]

    said = f"HTTP {http_status}" + (f": {message}" if message else "")
    if http_status in RETRY_HTTP or http_status >= 500:
        return each(Outcome.RETRY, None, said, wait)
    if http_status in (401, 403):
        return each(Outcome.FAILED, None, f"{said} (check {credentials})")
    if http_status >= 400 and http_status != 409:
        return each(Outcome.FAILED, None, said)
    stored: dict[str, int] = {}
    for item in _items(body, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            stored[str(uid)] = int(_first(item, WARNING_REASON) or 0)
    failed: dict[str, int | None] = {}
    for item in _items(body, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            reason = _first(item, FAILURE_REASON)
            failed[str(uid)] = int(reason) if reason is not None else None
    results = []
    for part in parts:
        uid = part.sop_instance_uid
        if uid in stored:
            code = stored[uid]
            detail = f"HTTP {http_status}" + (f", warning 0x{code:04X}" if code else "")
            results.append(SendResult(part.path, classify_status(code) if code else
                                      Outcome.DELIVERED, code, detail,
                                      http_status=http_status))
        elif uid in failed:
            reason = failed[uid]
            if reason is None:
                results.append(SendResult(part.path, Outcome.FAILED, None,
                                          f"{said} (failed, no FailureReason given)",
                                          http_status=http_status))
            else:
                results.append(SendResult(part.path, classify_status(reason), reason,
                                          f"{said} (FailureReason 0x{reason:04X})",
                                          http_status=http_status))
        elif http_status == 200:
            # 200: "stored all the instances" (PS3.18 10.5.3.1), listed or not.
            results.append(SendResult(part.path, Outcome.DELIVERED, 0, "HTTP 200",
                                      http_status=http_status))
        elif http_status == 409:
            results.append(SendResult(part.path, Outcome.FAILED, None, said,
                                      http_status=http_status))
        else:  # 202 (or another 2xx) without a word about it: send it again, to be sure
            results.append(SendResult(part.path, Outcome.RETRY, None,
                                      f"{said}: not in the response", http_status=http_status))
    return results


def _message(response: requests.Response) -> str:
    """The server's own words, short: a JSON error's message, or the start of the text."""
    text = response.text[:2000] if response.content else ""
    try:
        body = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300]
    if isinstance(body, dict):
        for key in ("Message", "message", "Details", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:300]
    return ""


class StowSender:
    """Sends to DICOMweb destinations (the sending half of an engine's interface)."""

    name = "dicomweb"
    # Each request is a transaction with its own cost at the server (Orthanc: ~10 ms even for
    # one instance, measured): a batch waits this long for more to join it, so a stream goes
    # as a few requests of many instances, not one per instance (see SenderConfig.batch_wait).
    batch_wait = 0.25

    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.max_request_bytes = max_request_bytes
        self._sessions: dict[tuple[str, int], requests.Session] = {}
        self._lock = threading.Lock()

    def _session(self, destination: Destination, slot: int = 0) -> requests.Session:
        """The kept-alive session of this destination's worker slot (a session is used by
        one thread at a time)."""
        with self._lock:
            session = self._sessions.get((destination.name, slot))
            if session is None:
                session = requests.Session()
                session.headers["User-Agent"] = f"dicom-relay/{__version__}"
                self._sessions[(destination.name, slot)] = session
        tls = destination.tls
        session.verify = (False if tls is not None and not tls.require_peer_certificate
                          else str(tls.ca) if tls is not None and tls.ca else True)
        if tls is not None and tls.certificate and tls.private_key:
            session.cert = (str(tls.certificate), str(tls.private_key))
        return session

    @staticmethod
    def credentials_key(destination: Destination) -> str:
        if destination.token_file:
            return f"destination {destination.name}'s token_file ({destination.token_file})"
        if destination.username:
            return (f"destination {destination.name}'s username and password_file "
                    f"({destination.password_file})")
        return f"destination {destination.name}: no token_file or username is configured"

    @staticmethod
    def _auth_headers(destination: Destination) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Read at each request: a token renewed on disk is used at once."""
        try:
            if destination.token_file:
                token = Path(destination.token_file).read_text(encoding="utf-8").strip()
                return {"Authorization": f"Bearer {token}"}, None
            if destination.username and destination.password_file:
                password = Path(destination.password_file).read_text(encoding="utf-8")
                return {}, (destination.username, password.rstrip("\r\n"))
        except OSError as exc:
            raise ToolFailure(f"local tool failure: cannot read {destination.name}'s "
                              f"credentials: {exc}") from None
        return {}, None

    def send(self, files: list[Path], destination: Destination, calling_ae: str, timeout: float,
             keep_open: bool = False) -> Iterator[SendResult]:
        del calling_ae, keep_open  # HTTP has no AE titles; the session stays open anyway
        ready, unreadable = read_outgoing(files)
        yield from unreadable
        parts = []
        for item in ready:
            try:
                parts.append(Part(item.path, item.sop_instance_uid, item.path.stat().st_size))
            except OSError as exc:
                yield SendResult(item.path, Outcome.FAILED, None, f"cannot read it: {exc}")
        per_request = max(MIN_SPLIT, -(-len(parts) // PARALLEL_REQUESTS))
        groups = request_groups(parts, self.max_request_bytes,
                                min(MAX_REQUEST_INSTANCES, per_request))
        if len(groups) <= 1:
            for group in groups:
                yield from self._post(group, destination, timeout, 0)
            return
        # Each worker slot has its own session (connection); results come as requests end.
        with ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="stow") as pool:
            slots = [i % PARALLEL_REQUESTS for i in range(len(groups))]
            futures = [pool.submit(list, self._post(group, destination, timeout, slot))
                       for group, slot in zip(groups, slots, strict=True)]
            for future in as_completed(futures):
                yield from future.result()

    def _post(self, parts: list[Part], destination: Destination, timeout: float, slot: int
              ) -> Iterator[SendResult]:
        try:
            headers, auth = self._auth_headers(destination)
        except ToolFailure as exc:
            yield from (SendResult(p.path, Outcome.RETRY, None, str(exc), local_failure=True)
                        for p in parts)
            return
        body = MultipartBody(parts, uuid.uuid4().hex)
        headers.update({"Content-Type": body.content_type,
                        "Accept": "application/dicom+json, application/json"})
        url = f"{destination.url}/studies"
        # Reading: the server answers once it stored them all; allow for the request's size.
        read_timeout = timeout + len(parts) * 0.5 + body.length / 5e6
        try:
            response = self._session(destination, slot).post(
                url, data=body, headers=headers, auth=auth, timeout=(timeout, read_timeout))
        except requests.exceptions.SSLError as exc:
            detail = f"{url}: TLS: {_reason(exc)}"
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            detail = f"{url}: {_reason(exc)}"
        except OSError as exc:  # a file changed or vanished while it was being sent
            detail = f"{url}: request not completed: {exc}"
        else:
            body_json = None
            if response.content:
                try:
                    body_json = response.json()
                except ValueError:
                    body_json = None
            yield from results_from_response(
                parts, response.status_code, body_json, _message(response),
                self.credentials_key(destination),
                retry_after(response.headers.get("Retry-After")))
            return
        yield from (SendResult(p.path, Outcome.RETRY, None, detail) for p in parts)

    def release(self, destination: Destination) -> None:
        with self._lock:
            sessions = [self._sessions.pop(key) for key in list(self._sessions)
                        if key[0] == destination.name]
        for session in sessions:
            session.close()

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        """A QIDO-RS query for one study: the server is there and takes our credentials."""
        del calling_ae
        headers, auth = self._auth_headers(destination)
        headers["Accept"] = "application/dicom+json, application/json"
        url = f"{destination.url}/studies"
        try:
            response = self._session(destination).get(url, params={"limit": "1"},
                                                      headers=headers, auth=auth,
                                                      timeout=timeout)
        except requests.exceptions.RequestException as exc:
            raise DestinationUnavailable(f"{destination.name}: {url}: {_reason(exc)}") from None
        if response.status_code in (401, 403):
            raise DestinationUnavailable(
                f"{destination.name}: HTTP {response.status_code} {_message(response)} "
                f"(check {self.credentials_key(destination)})")
        if response.status_code not in (200, 204):
            raise DestinationUnavailable(f"{destination.name}: {url}: HTTP "
                                         f"{response.status_code} {_message(response)}")


def _reason(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, not its whole repr chain."""
    while exc.__context__ is not None and exc.args and "Max retries" in str(exc.args[0]):
        exc = exc.__context__
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known",
                   "CERTIFICATE_VERIFY_FAILED", "Connection reset", "Remote end closed"):
        if marker in text:
            return marker if marker != "CERTIFICATE_VERIFY_FAILED" else \
                "the server's certificate does not chain to the configured CA"
    return text[:300]


def transport_for(destination: Destination, engine: Transport, stow: StowSender | None = None
                  ) -> Transport:
    """Who sends to this destination: the engine (DIMSE) or a STOW-RS sender (DICOMweb)."""
    if destination.kind == "dicomweb":
        return stow if stow is not None else StowSender()
    return engine
