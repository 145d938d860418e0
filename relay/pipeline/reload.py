"""What a reload (SIGHUP) may change in a running relay, worked out from the running and the
new configuration. Pure: the relay (relay.pipeline.relay) applies it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from relay.config.model import Config, Destination

# Settings a running relay cannot change: a reload reports them and keeps the old ones.
RESTART_ONLY = ("receiver", "spool", "toolkit", "metrics", "audit", "history", "console")
# Tables (or their absence) the running services were built with ([query] serves from them).
RESTART_ONLY_TABLES = {"query": "[query]", "commitment": "[commitment]",
                       "modalities": "[[modalities]]"}


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """One line per setting that changed but needs a restart (kept as it was until then)."""
    lines = []
    for section in (*RESTART_ONLY, "process"):
        old_value, new_value = getattr(old, section), getattr(new, section)
        if section == "process":  # unrouted applies now, workers at the next start
            new_value = replace(new_value, unrouted=old_value.unrouted)
        for item in fields(old_value):
            before, after = getattr(old_value, item.name), getattr(new_value, item.name)
            if before != after:
                lines.append(f"reload: [{section}].{item.name} changed ({_shown(before)} -> "
                             f"{_shown(after)}): it needs a restart; kept as it was until then")
    for name, table in RESTART_ONLY_TABLES.items():
        if getattr(old, name) != getattr(new, name):
            lines.append(f"reload: {table} changed: it needs a restart; kept as it was until "
                         "then")
    # Storage commitment reads which PACSes commit from the configuration it started with.
    was = {d.name: d.commitment for d in old.destinations}
    for dest in new.destinations:
        if dest.name in was and was[dest.name] != dest.commitment:
            lines.append(f"reload: [[destinations]] {dest.name}: commitment changed: storage "
                         "commitment counts it from the next restart")
    return lines


def applicable(old: Config, new: Config) -> Config:
    """The new configuration as a running relay applies it: what needs a restart kept."""
    return replace(new, **{s: getattr(old, s) for s in (*RESTART_ONLY, *RESTART_ONLY_TABLES)},
                   process=replace(old.process, unrouted=new.process.unrouted))


@dataclass(frozen=True)
class SenderChanges:
    """Which destinations' senders stay, start, stop or go with a new configuration."""

    keep: tuple[str, ...]
    start: tuple[Destination, ...]  # added, or changed (their old sender stops first)
    replaced: tuple[str, ...]  # changed: the old sender stops
    removed: tuple[str, ...]


def sender_changes(old: Config, new: Config) -> SenderChanges:
    """A destination whose table (or [sender]) changed gets a new sender."""
    running = {d.name: d for d in old.destinations}
    keep, start, replaced = [], [], []
    for dest in new.destinations:
        before = running.get(dest.name)
        if (before is not None and before.definition == dest.definition
                and new.sender == old.sender):
            keep.append(dest.name)
            continue
        start.append(dest)
        if before is not None:
            replaced.append(dest.name)
    removed = tuple(name for name in running if name not in {d.name for d in new.destinations})
    return SenderChanges(tuple(keep), tuple(start), tuple(replaced), removed)


def _shown(value: object) -> str:
    """A config value for a log line (paths and tuples as written)."""
    if value is None:
        return "unset"
    if hasattr(value, "__dataclass_fields__"):
        return "(changed)"
    return str(value)
