"""What the engine adapters share: grouping files into associations of at most 128
presentation contexts, naming the object that was on the wire when an association broke, the
time a tool may take, and a tool's last words for a log line.

One place for these, so that the engines handle the same situations the same way."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from relay.send.results import Context, Outcome, SendResult

# A presentation context list holds at most 128 entries (odd IDs 1-255, PS3.8 9.3.2.2).
MAX_CONTEXTS = 128

T = TypeVar("T")


def context_groups(items: Sequence[T], context_of: Callable[[T], Context]
                   ) -> list[tuple[list[T], list[Context]]]:
    """Items in as few associations as their presentation contexts allow (at most 128
    each), in order within each: (items, their distinct contexts) per association. An item
    whose context would be the 129th waits for the next association, and later items whose
    context is already proposed still join this one."""
    groups: list[tuple[list[T], list[Context]]] = []
    pending = list(items)
    while pending:
        batch: list[T] = []
        contexts: list[Context] = []
        later: list[T] = []
        for item in pending:
            context = context_of(item)
            if context not in contexts:
                if len(contexts) == MAX_CONTEXTS:
                    later.append(item)
                    continue
                contexts.append(context)
            batch.append(item)
        groups.append((batch, contexts))
        pending = later
    return groups


def mark_in_flight(results: Iterable[SendResult], aborted: bool) -> list[SendResult]:
    """Tools that send in order and whose association broke (`aborted`): the first object
    left without a response was the one on the wire."""
    marked = []
    flagged = not aborted
    for result in results:
        if not flagged and result.outcome is Outcome.RETRY and result.status is None:
            result = replace(result, in_flight=True)
            flagged = True
        marked.append(result)
    return marked


_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_uid(text: str) -> bool:
    """A UID as PS3.5 9.1 has it: digits and dots, at most 64 characters."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def tool_timeout(timeout: float, files: int) -> float:
    """How long a tool run for `files` objects may take in all: connecting and negotiating,
    then up to `timeout` per object."""
    return timeout * (2 + files)


def last_lines(output: str, count: int = 4) -> str:
    """A tool's last words, for a log line: non-blank lines, Java stack frames left out."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line.lstrip().startswith("at ")]
    return " | ".join(lines[-count:]) or "no output"


@dataclass(frozen=True)
class GetUpdate:
    """What a toolkit's C-GET SCU reported while it ran: an object it stored (`path`, whole),
    or a C-GET response from the PACS (`status` and the sub-operation counts), or `error`:
    it could not ask (no association, the tool failed)."""

    path: Path | None = None
    uid: str = ""  # the stored object's SOP Instance UID
    status: int | None = None
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str = ""


class ToolGet(Protocol):
    """A C-GET by a toolkit's own SCU, running: iterate its updates; stop() from another
    thread ends it (the association is aborted)."""

    def __iter__(self) -> Iterator[GetUpdate]: ...

    def stop(self) -> None: ...
