"""The free-space floor's bookkeeping (unit level; the real thing on a full tmpfs is
tests/faults/test_disk_full.py): the default floor, and when a toolkit's receiver is
stopped and started again."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.receive.floor import DEFAULT_FLOOR, MB, Floor, FloorKeeper


class FakeFloor(Floor):
    free_now = 0

    def free(self) -> int:
        return self.free_now


def test_the_default_floor_is_a_gib_or_twice_the_largest_object(tmp_path: Path) -> None:
    floor = Floor(tmp_path)
    assert floor.bytes == DEFAULT_FLOOR
    floor.seen(700 * MB)
    assert floor.bytes == 1400 * MB
    assert Floor(tmp_path, configured=5 * MB).bytes == 5 * MB


def test_the_keeper_stops_below_the_floor_and_starts_again_with_room(tmp_path: Path) -> None:
    floor = FakeFloor(tmp_path, configured=10 * MB)
    floor.seen(2 * MB)
    calls: list[str] = []
    keeper = FloorKeeper(floor, tmp_path, lambda why: calls.append(f"pause: {why}"),
                         lambda: calls.append("resume"))
    floor.free_now = 11 * MB
    keeper.check()
    assert calls == []
    floor.free_now = 9 * MB
    keeper.check()
    keeper.check()
    assert len(calls) == 1 and calls[0].startswith("pause: below the free-space floor")
    floor.free_now = 13 * MB  # the floor, and one of the largest objects: not yet
    keeper.check()
    assert calls[-1] != "resume"
    floor.free_now = 14 * MB  # the floor and two of the largest
    keeper.check()
    assert calls[-1] == "resume" and not keeper.paused


@pytest.mark.parametrize("free", [0, 5 * MB])
def test_an_object_that_would_go_below_the_floor_has_no_room(tmp_path: Path, free: int) -> None:
    floor = FakeFloor(tmp_path, configured=10 * MB)
    floor.free_now = free + 10 * MB
    assert floor.room_for(free) and not floor.room_for(free + 1)
