"""The placement-group cleanup releases only groups nothing uses, and spares a live one."""

from __future__ import annotations

import time

import pytest

from raysrec.tuning.placement import release_leaked_train_groups, supported

pytestmark = pytest.mark.slow


@pytest.fixture
def place(ray_local):
    """``place(group)``: a 1-CPU actor in ``group`` (a Train worker's stand-in), answering ``ping``."""
    ray = ray_local
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not supported():
        pytest.skip(f"the cleanup is gated off on Ray {ray.__version__}")

    @ray.remote(num_cpus=1)
    class Worker:
        def ping(self):
            return "pong"

    def place(group):
        worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
        assert ray.get(worker.ping.remote(), timeout=60) == "pong"
        return worker
    return place


def test_cleanup_releases_an_abandoned_group_and_spares_a_live_one(ray_local, place):
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group

    live = placement_group([{"CPU": 1}])
    abandoned = placement_group([{"CPU": 1}])
    ray.get([live.ready(), abandoned.ready()], timeout=60)
    worker = place(live)
    try:
        assert release_leaked_train_groups(min_age_s=3600) == []        # both too young to be judged
        time.sleep(1.0)
        released = release_leaked_train_groups(min_age_s=0.5)
        assert released == [abandoned.id.hex()]
        assert ray.get(worker.ping.remote(), timeout=60) == "pong"       # the live group's actor is untouched
        table = ray.util.placement_group_table()
        assert table[live.id.hex()]["state"] == "CREATED" and table[abandoned.id.hex()]["state"] == "REMOVED"
    finally:
        ray.kill(worker)
        remove_placement_group(live)


def test_after_the_search_every_group_it_created_goes_even_with_a_worker_still_in_it(ray_local, place):
    """After the search no Train group it made is in use, but a stopped trial's worker can still be winding down
    in its group: the group goes all the same (else the export's scoring task waits for its CPUs for ever),
    while a group the caller held before the search stays."""
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group

    from raysrec.tuning.placement import held_groups, release_after_search

    callers = placement_group([{"CPU": 1}])
    ray.get(callers.ready(), timeout=60)
    before = held_groups()
    assert callers.id.hex() in before
    trials = placement_group([{"CPU": 1}])
    ray.get(trials.ready(), timeout=60)
    worker = place(trials)
    try:
        assert release_leaked_train_groups(min_age_s=0, spare=before) == []   # mid-search: both are spared
        assert release_after_search(before) == [trials.id.hex()]
        table = ray.util.placement_group_table()
        assert table[trials.id.hex()]["state"] == "REMOVED" and table[callers.id.hex()]["state"] == "CREATED"

        @ray.remote(num_cpus=1)
        def one():
            return 1
        assert ray.get(one.remote(), timeout=60) == 1                   # the trial's CPU is free again
    finally:
        ray.kill(worker)
        remove_placement_group(callers)
