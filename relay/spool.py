"""The spool: a folder state machine that never loses an object.

    incoming/  →  work/  →  out/<dest>/  →  (deleted on C-STORE success)
                   ↘ failed/<reason>/<name> + <name>.json (why, when, which rule or peer)

Pure file moves, no DICOM knowledge. Every move is a rename (or hard link) inside one file
system, so a crash leaves each object in exactly one well-defined place. New files are written
under a temporary name, fsynced, then renamed in.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Suffix of files still being written (ours and dcm4che storescp's): never processed.
PARTIAL_SUFFIX = ".part"
SIDECAR_SUFFIX = ".json"
log = logging.getLogger("relay.spool")
_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")
_REASON_RE = re.compile(r"[^A-Za-z0-9-]+")


def safe_name(sop_instance_uid: str | None) -> str:
    """A spool file name for an object: its UID when it is a well-formed UID, plus a random
    part so two copies of one instance never overwrite each other. Never a path taken from
    peer-supplied text as it is (`../../x` stays inside the spool)."""
    uid = (sop_instance_uid or "").strip().rstrip("\x00")
    stem = uid if _UID_RE.match(uid) and ".." not in uid else "object"
    return f"{stem}~{uuid.uuid4().hex[:12]}.dcm"


def transcoding_path(queued: Path) -> Path:
    """Where a destination's decompressed copy of a queued object is written before it
    replaces that destination's link (a partial name: never sent, dropped at start-up)."""
    return queued.with_name(f".{queued.name}.transcoded{PARTIAL_SUFFIX}")


def is_ready(path: Path) -> bool:
    """Whether a name in incoming/ is a finished object (not a partial or hidden file)."""
    name = path.name
    return not (name.startswith(".") or name.endswith(PARTIAL_SUFFIX))


def sync_filesystem(path: Path) -> None:
    """syncfs(2) on the file system holding `path`: every file and folder written there is on
    disk when it returns (Linux; elsewhere os.sync(), which flushes every file system)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# From this size an edited object's commit syncs its edited copies alone (Spool.commit):
# below it, a file's own sync costs more than writing the original along in the group's.
WRITTEN_ONCE_FROM = 1024 * 1024


def _written_once(claimed: Path, copies: list[Path]) -> bool:
    """Whether an object's commit syncs only its copies: a large object whose copies are
    all files of their own (an unchanged object's copy is its original, linked)."""
    try:
        original = claimed.stat()
        if original.st_size < WRITTEN_ONCE_FROM:
            return False
        for edited in copies:
            with contextlib.suppress(FileNotFoundError):  # replaced by destinations' own
                if os.path.samestat(original, edited.stat()):
                    return False
    except OSError:
        return False
    return True


def _sync_if_queued(edited: Path) -> None:
    """fdatasync an edited copy that is linked into an outbox (a global edit that every
    destination replaced with its own is only in work/, about to go: not written)."""
    try:
        fd = os.open(edited, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_nlink > 1:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _drop(committed: list[tuple[Path, list[Path]]]) -> None:
    for claimed, copies in committed:
        for edited in copies:
            edited.unlink(missing_ok=True)
        claimed.unlink(missing_ok=True)


@dataclass(frozen=True)
class Failure:
    """What a sidecar in failed/ says."""

    reason: str
    detail: str
    stage: str  # receive | process | send
    destination: str | None = None
    when: float = 0.0

    def to_json(self) -> str:
        return json.dumps({
            "reason": self.reason, "detail": self.detail, "stage": self.stage,
            "destination": self.destination,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.when or time.time())),
        }, indent=2) + "\n"


class Spool:
    """Folders and the transitions between them. Safe to use from several threads/processes:
    a claim is an atomic rename, so exactly one worker wins each file."""

    def __init__(self, root: Path, destinations: list[str] | tuple[str, ...] = (), *,
                 keep_delivered: bool = False) -> None:
        self.root = Path(root)
        # [spool] keep_delivered_hours > 0: a delivered copy moves to delivered/<dest>/
        # (resent from the console, pruned by age) instead of being deleted.
        self.keep_delivered = keep_delivered
        self.kept = self.root / "delivered"
        self.incoming = self.root / "incoming"
        # For toolkits that write objects in place under their final name (DCMTK storescp):
        # they write here and move complete objects into incoming/.
        self.receiving = self.root / "receiving"
        self.work = self.root / "work"
        self.out = self.root / "out"
        self.failed = self.root / "failed"
        self.destinations = tuple(destinations)

    def create(self) -> Spool:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.incoming, self.receiving, self.work, self.out, self.failed):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for dest in self.destinations:
            self.outbox(dest).mkdir(mode=0o700, exist_ok=True)
        return self

    def outbox(self, destination: str) -> Path:
        return self.out / destination

    # --- objects processed again for one destination ----------------------------------------

    @property
    def only_folder(self) -> Path:
        return self.root / "only"

    def set_only(self, name: str, destination: str) -> None:
        """The object `name`, processed again, goes to `destination` only (several calls:
        to each of them). A mark in the spool: a restart keeps it."""
        self.only_folder.mkdir(mode=0o700, exist_ok=True)
        mark = self.only_folder / name
        wanted = self.only_for(name) or set()
        wanted.add(destination)
        tmp = self.only_folder / f".{name}{PARTIAL_SUFFIX}"
        tmp.write_text("\n".join(sorted(wanted)) + "\n", encoding="utf-8")
        os.replace(tmp, mark)
        _fsync_dir(self.only_folder)

    def only_for(self, name: str) -> set[str] | None:
        """The destinations an object processed again is kept to (None: every one)."""
        try:
            text = (self.only_folder / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return {line for line in text.splitlines() if line}

    def clear_only(self, name: str) -> None:
        (self.only_folder / name).unlink(missing_ok=True)

    # --- pausing a destination (the console, the API) ---------------------------------------

    @property
    def paused_folder(self) -> Path:
        return self.root / "paused"

    def set_paused(self, destination: str, paused: bool) -> None:
        """Keep (or drop) a mark that survives a restart: its queue fills, nothing is sent."""
        mark = self.paused_folder / destination
        if paused:
            self.paused_folder.mkdir(mode=0o700, exist_ok=True)
            mark.touch(mode=0o600)
            _fsync_dir(self.paused_folder)
        else:
            mark.unlink(missing_ok=True)

    def is_paused(self, destination: str) -> bool:
        return (self.paused_folder / destination).exists()

    def paused(self) -> set[str]:
        try:
            return {p.name for p in self.paused_folder.iterdir()}
        except FileNotFoundError:
            return set()

    # --- receiving -------------------------------------------------------------------------

    def partial_path(self, name: str) -> Path:
        """Where a receiver writes an object before it is complete."""
        return self.incoming / f".{name}{PARTIAL_SUFFIX}"

    def commit_incoming(self, partial: Path, name: str) -> Path:
        """Rename a completely written (and fsynced) object into incoming/."""
        final = self.incoming / name
        os.replace(partial, final)
        return final

    def write_incoming(self, name: str, *parts: bytes | memoryview) -> Path:
        """Write a new incoming object from its parts, in order: temporary name, fsync,
        rename. Parts are written as they are (a memoryview of a receive buffer is never
        copied)."""
        partial = self.partial_path(name)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        os.close(fd)
        return self.commit_incoming(partial, name)

    def quarantine_unfinished(self, paths: list[Path], detail: str) -> int:
        """Objects a receiver left behind when it died: maybe cut short, never acknowledged
        (the modality got no success and sends again). Kept in failed/, never forwarded."""
        for path in paths:
            self.fail(path, Failure("incomplete-receive", detail, "receive"))
        if paths:
            log.warning("%d object(s) left half-received by the receiver: quarantined in "
                        "failed/incomplete-receive/", len(paths))
        return len(paths)

    # --- processing ------------------------------------------------------------------------

    def ready_incoming(self) -> list[Path]:
        """Finished objects waiting in incoming/, oldest first."""
        return _oldest_first(p for p in _files(self.incoming) if is_ready(p))

    def claim(self, path: Path) -> Path | None:
        """Move an incoming object to work/; None if another worker took it first."""
        target = self.work / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def claim_back(self, claimed: Path) -> Path:
        """Return a claimed object to incoming/ untouched (processing could not finish)."""
        target = self.incoming / claimed.name
        os.rename(claimed, target)
        return target

    def recover(self) -> int:
        """At start-up: objects left in work/ by a crash go back to incoming/, and edited
        copies that were never published are dropped (they are rebuilt from the original)."""
        count = 0
        for path in _files(self.work):
            if path.name.endswith(PARTIAL_SUFFIX):
                path.unlink()
                continue
            os.rename(path, self.incoming / path.name)
            count += 1
        # A publish cut short leaves a temporary link in out/<dest>/; its original is still in
        # work/ (now back in incoming/) and will be published again.
        for dest in self.destinations:
            if self.outbox(dest).is_dir():
                for path in self.outbox(dest).glob(f".*{PARTIAL_SUFFIX}"):
                    path.unlink()
        return count

    def kept_path(self, claimed: Path) -> Path:
        """A second name for a claimed original, kept for a destination whose own rules
        failed on it (quarantined under it) while the others' copies go on."""
        return self.work / f".{claimed.name}{PARTIAL_SUFFIX}"

    def edited_path(self, claimed: Path, variant: int | None = None) -> Path:
        """Where the edit of a claimed object is written (variant: a destination's own edit
        of it); unpublished, these are dropped at start-up and rebuilt."""
        extra = "" if variant is None else f".{variant}"
        return self.work / f"{claimed.name}.edited{extra}{PARTIAL_SUFFIX}"

    def publish(self, claimed: Path, edited: Path | Mapping[str, Path], *,
                durable: bool = True) -> list[Path]:
        """Hand an edited object to its destinations (one hard link each: `edited` for every
        destination, or destination -> its own edit), then drop the claimed original. Until
        the last step the original is still in work/, so a crash here repeats the edit (a
        duplicate at worst, never a loss). Returns the queued paths in the mapping's order.

        durable=False links only: the caller must `commit` (claimed, edits) later, which
        makes the links and the edited data durable first and only then drops the original."""
        copies = ({dest: edited for dest in self.destinations} if isinstance(edited, Path)
                  else dict(edited))
        if not copies:
            raise RuntimeError("no destinations to publish to: refusing to drop an object")
        queued = []
        for dest, source in copies.items():
            target = self.outbox(dest) / claimed.name
            try:
                os.link(source, target)
            except FileExistsError:
                # Published before a crash (its original came back from work/): replace
                # that copy with this one atomically. When both are the very same file (an
                # unchanged object's edit is a link to its original), rename(2) does
                # nothing and leaves the temporary name behind: it is removed here.
                tmp = self.outbox(dest) / f".{claimed.name}{PARTIAL_SUFFIX}"
                tmp.unlink(missing_ok=True)
                os.link(source, tmp)
                os.replace(tmp, target)
                tmp.unlink(missing_ok=True)
            queued.append(target)
        if durable:
            for dest in copies:
                _fsync_dir(self.outbox(dest))
            for source in set(copies.values()):
                source.unlink()
            claimed.unlink()
        return queued

    def commit(self, published: Sequence[tuple[Path, Path | Iterable[Path]]]) -> None:
        """Make many unsynced publishes durable, then drop their originals and edits from
        work/: nothing leaves work/ before its copies in out/ are on disk.

        Most with one sync of the spool's file system: one syncfs instead of a file and a
        folder fsync per object, a fraction of the cost when objects arrive in hundreds. An
        edited object of WRITTEN_ONCE_FROM bytes or more has its edited copies synced one by
        one (and out/'s folders) instead, and its original dropped before the syncfs: the
        original is no longer needed once its copies are on disk, and a toolkit's receiver
        had not synced it, so the disk never has to write it (measured: large objects went
        at the speed of writing each one twice). As `publish(durable=True)` does."""
        if not published:
            return
        one_by_one: list[tuple[Path, list[Path]]] = []
        grouped: list[tuple[Path, list[Path]]] = []
        for claimed, edits in published:
            copies = [edits] if isinstance(edits, Path) else list(edits)
            (one_by_one if _written_once(claimed, copies) else grouped).append((claimed, copies))
        if one_by_one:
            for _claimed, copies in one_by_one:
                for edited in copies:
                    _sync_if_queued(edited)
            for dest in self.destinations:
                _fsync_dir(self.outbox(dest))
            _drop(one_by_one)
        if grouped:
            sync_filesystem(self.root)
            _drop(grouped)

    # --- sending ---------------------------------------------------------------------------

    def queued(self, destination: str) -> list[Path]:
        return _oldest_first(p for p in _files(self.outbox(destination)) if is_ready(p))

    def delivered(self, path: Path) -> None:
        """The destination answered C-STORE success: this copy may go (or, kept for a
        resend, out of the queue into delivered/<dest>/)."""
        if not self.keep_delivered:
            path.unlink(missing_ok=True)
            return
        folder = self.kept / path.parent.name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to keep
            os.replace(path, folder / path.name)

    def kept_copy(self, destination: str, name: str) -> Path | None:
        """A delivered copy kept for a resend, if it still is."""
        path = self.kept / destination / name
        return path if path.is_file() else None

    def resend(self, destination: str, name: str) -> Path:
        """A kept delivered copy back into its destination's queue."""
        target = self.outbox(destination) / name
        os.replace(self.kept / destination / name, target)
        return target

    def prune_delivered(self, older_than: float) -> int:
        """Delivered copies kept since before `older_than` go. Their inode's change time
        says when they moved here (a file's modification time is its arrival, and its
        other names in other queues must keep it)."""
        gone = 0
        if not self.kept.is_dir():
            return 0
        for folder in self.kept.iterdir():
            if not folder.is_dir():
                continue
            for path in _files(folder):
                try:
                    if path.stat().st_ctime < older_than:
                        path.unlink()
                        gone += 1
                except FileNotFoundError:
                    continue
        return gone

    # --- failing ---------------------------------------------------------------------------

    def failed_folder(self, reason: str) -> Path:
        """failed/<reason>/: the reason made a safe folder name."""
        return self.failed / (_REASON_RE.sub("-", reason).strip("-") or "unknown")

    def fail(self, path: Path, failure: Failure) -> Path:
        """Quarantine an object under failed/<reason>/ with a JSON sidecar saying why."""
        folder = self.failed_folder(failure.reason)
        reason = folder.name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A partial file (".x.part") is kept under a visible name so status/retry see it.
        name = path.name.lstrip(".").removesuffix(PARTIAL_SUFFIX) or "object"
        if failure.destination:
            name = f"{failure.destination}--{name}"
        target = folder / name
        sidecar = folder / (name + SIDECAR_SUFFIX)
        tmp = folder / f".{name}{SIDECAR_SUFFIX}{PARTIAL_SUFFIX}"
        try:
            tmp.write_text(failure.to_json(), encoding="utf-8")
            os.chmod(tmp, 0o600)
            os.replace(tmp, sidecar)
        except OSError as exc:
            # A full disk must not keep the object where it was (work/ would hold it until
            # the next start): it goes aside all the same, its reason in the folder's name
            # and in this line.
            tmp.unlink(missing_ok=True)
            log.error("%s: no room for its sidecar in failed/%s/ (%s); quarantined without "
                      "it: %s", name, reason, exc.strerror or exc, failure.detail)
        os.rename(path, target)
        return target

    def failures(self) -> Iterator[tuple[Path, dict[str, object]]]:
        """Each quarantined object with its sidecar, most recent first."""
        if not self.failed.is_dir():
            return
        items = []
        for folder in self.failed.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.endswith(SIDECAR_SUFFIX) or not is_ready(path):
                    continue
                items.append((path, self.failure(path)))
        items.sort(key=lambda it: _mtime(it[0]), reverse=True)
        yield from items

    def failure(self, path: Path) -> dict[str, object]:
        """A quarantined object's sidecar (why it is there)."""
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict):
            info = {"reason": path.parent.name, "detail": "(sidecar missing or unreadable)"}
        return info

    def requeue(self, path: Path, info: dict[str, object]) -> Path:
        """Put a quarantined object back: to its destination's queue if it failed sending
        there, otherwise to incoming/ to be processed again (an object that failed a
        destination's own edit is the original: it must go through those rules again)."""
        dest = info.get("destination")
        name = path.name
        if isinstance(dest, str) and dest in self.destinations and info.get("stage") != "route":
            prefix = f"{dest}--"
            name = name[len(prefix):] if name.startswith(prefix) else name
            target = self.outbox(dest) / name
        else:
            if isinstance(dest, str):
                name = name.removeprefix(f"{dest}--")
                # Its own rules failed for that destination only: processed again, it goes
                # there only (the others had their copies).
                self.set_only(name, dest)
            target = self.incoming / name
        os.rename(path, target)
        path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)
        return target


def _files(folder: Path) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _oldest_first(paths: Iterator[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: (_mtime(p), p.name))
