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
    assert callers.id.hex() in before.groups
    trials = placement_group([{"CPU": 1}])
    ray.get(trials.ready(), timeout=60)
    worker = place(trials)
    try:
        assert release_leaked_train_groups(min_age_s=0, spare=before.groups) == []   # mid-search: both are spared
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


class TrainController:
    """A stand-in for a stopped trial's Train V2 controller (the state API knows actors by class name): alive
    when the search returns, it starts one more worker group (a detached placement group, as Train's outlive
    their creator) and then goes."""

    def run(self, delay_s: float):
        import ray
        from ray.util.placement_group import placement_group

        time.sleep(delay_s)
        group = placement_group([{"CPU": 1}], lifetime="detached")
        ray.get(group.ready(), timeout=60)
        ray.actor.exit_actor()


def test_after_the_search_a_lingering_controller_is_waited_for_and_pending_groups_go_too(ray_local, place):
    """A stopped trial's controller can outlive the search for a moment and start a new worker group: the cleanup
    waits for the search's controllers to go before it removes groups, so that group goes too; a group still
    waiting for CPUs goes as well (it would take them once they are free)."""
    ray = ray_local
    from raysrec.tuning.placement import held_groups, release_after_search

    before = held_groups()
    known = set(ray.util.placement_group_table())                    # earlier tests' groups, removed or held
    controller = ray.remote(num_cpus=0)(TrainController).remote()
    finished = controller.run.remote(2.0)
    from ray.util.placement_group import placement_group

    waiting = placement_group([{"CPU": 3}])                          # more than the 2 CPUs there are: pending
    released = release_after_search(before, wait_s=60)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(finished, timeout=60)                                  # it exited after its new group was ready
    table = ray.util.placement_group_table()
    late = [g for g in table if g not in known and g != waiting.id.hex()]
    assert len(late) == 1 and sorted(released) == sorted([late[0], waiting.id.hex()])
    assert table[late[0]]["state"] == "REMOVED" and table[waiting.id.hex()]["state"] == "REMOVED"

    @ray.remote(num_cpus=2)
    def both():
        return 2
    assert ray.get(both.remote(), timeout=60) == 2                   # both CPUs are free for the next step
