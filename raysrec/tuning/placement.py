"""Releasing the placement groups that Ray Train V2 trials stopped by a Tune scheduler leave behind.

When a scheduler (ASHA) stops a trial, Tune ends the trial's actor; with Train V2 the trial's
TrainController then goes, but the workers' placement group can outlive it
(ray-project/ray#54305), holding its CPUs/GPUs so the next trial's workers never start. During the search a
callback removes such groups once no actor is left in them; when the search has ended, every group it made
goes (:func:`release_after_search`), so the export's scoring task gets the CPUs. A stopped trial's controller
can outlive its trial for a moment and, seeing its workers gone, start a new worker group; so the cleanup after
the search first waits (bounded) for the search's controllers to go, and removes pending groups as well.

This uses Ray's state API (public) to find the groups, and ``PlacementGroup(PlacementGroupID)``
(private: the public API hands out group objects only to their creator or by name) to remove
them. It is therefore gated to the Ray versions it was written and tested against
(:data:`TESTED_RAY`); on another version it does nothing and says so once.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

TESTED_RAY = ("2.60.",)
CONTROLLER_CLASS = "TrainController"   # Ray Train V2's per-run controller actor


class Held(NamedTuple):
    """What this job held before a search: its placement groups that hold CPUs/GPUs, and its live Train
    controllers (the caller's own runs in the same driver); the cleanup after the search spares both."""

    groups: frozenset[str]
    controllers: frozenset[str]


def supported() -> bool:
    import ray  # noqa: PLC0415

    return ray.__version__.startswith(TESTED_RAY)


def _holding_groups(address: Optional[str], pending: bool = False):
    """This job's CREATED placement groups (and, with ``pending``, those waiting to be) that hold CPUs/GPUs (Tune's
    own trial bundles hold none), and the ids of the groups a live or pending actor is placed in."""
    import ray  # noqa: PLC0415
    from ray.util.state import list_actors, list_placement_groups  # noqa: PLC0415

    address = address or ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    state = ("state", "!=", "REMOVED") if pending else ("state", "=", "CREATED")
    groups = list_placement_groups(address=address, filters=[state], detail=True, raise_on_missing_output=False)
    used = {a.placement_group_id for a in list_actors(address=address, filters=[("state", "!=", "DEAD")],
                                                      detail=True, limit=10_000, raise_on_missing_output=False)}
    holding = [g for g in groups if g.creator_job_id == job
               and any(b["unit_resources"].get("CPU", 0) or b["unit_resources"].get("GPU", 0) for b in g.bundles)]
    return holding, used


def _created_ns(group, default: int) -> int:
    return int((group.stats or {}).get("creation_request_received_ns") or default)


def _remove(group_id: str) -> None:
    import ray  # noqa: PLC0415
    from ray._raylet import PlacementGroupID  # noqa: PLC0415  (callers are gated on supported())
    from ray.util.placement_group import PlacementGroup  # noqa: PLC0415

    ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))


def release_leaked_train_groups(min_age_s: float = 10.0, address: Optional[str] = None,
                                spare: frozenset[str] = frozenset()) -> list[str]:
    """During a search: remove this job's placement groups that hold CPUs/GPUs, are older than ``min_age_s``,
    have no live or pending actor placed in them and are not in ``spare`` (those held before the search);
    returns their ids."""
    if not supported():
        return []
    holding, used = _holding_groups(address)
    now_ns = time.time_ns()
    released = []
    for group in holding:
        young = now_ns - _created_ns(group, now_ns) < min_age_s * 1e9
        if group.placement_group_id in used or group.placement_group_id in spare or young:
            continue
        _remove(group.placement_group_id)
        released.append(group.placement_group_id)
    return released


def _live_controllers(address: Optional[str]) -> frozenset[str]:
    """The ids of this job's Train controllers that are not dead."""
    import ray  # noqa: PLC0415
    from ray.util.state import list_actors  # noqa: PLC0415

    address = address or ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    actors = list_actors(address=address, filters=[("class_name", "=", CONTROLLER_CLASS), ("state", "!=", "DEAD")],
                         detail=True, limit=10_000, raise_on_missing_output=False)
    return frozenset(a.actor_id for a in actors if a.job_id == job)


def held_groups(address: Optional[str] = None) -> Optional[Held]:
    """What this job holds now (taken before a search starts): its placement groups that hold CPUs/GPUs and its
    live Train controllers; None when they cannot be listed (then nothing is removed after the search)."""
    if not supported():
        return None
    try:
        holding, _ = _holding_groups(address, pending=True)
        controllers = _live_controllers(address)
    except Exception as exc:  # the state API is best effort (e.g. no dashboard on this cluster)
        print(f"could not list placement groups: {exc}", flush=True)
        return None
    return Held(frozenset(g.placement_group_id for g in holding), controllers)


def release_after_search(before: Optional[Held], address: Optional[str] = None, wait_s: float = 60.0) -> list[str]:
    """Once the search has ended, none of the Train groups it created is in use: remove every group of this job
    that holds CPUs/GPUs, created or pending, and was not there before the search (:func:`held_groups`), with any
    worker still winding down in it.

    A stopped trial's controller goes with its trial, but not at once: until it does, it can answer its workers'
    end by starting a new worker group, in a new placement group. So this first waits, up to ``wait_s``, for the
    controllers the search started to go. A stopped trial's workers can outlive their controller for a while,
    so waiting for them as well (what :func:`release_leaked_train_groups` does mid-search) could leave the group
    holding the CPUs that the next step (the export's scoring task) waits for, for ever. Groups and controllers
    that were there before the search, e.g. the caller's own in the same driver, are not touched."""
    if not supported() or before is None:
        return []
    try:
        deadline = time.monotonic() + wait_s
        while (left := _live_controllers(address) - before.controllers) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            print(f"{len(left)} Train controller(s) of the search still alive after {wait_s:.0f} s; releasing "
                  "their placement groups all the same", flush=True)
        holding, _ = _holding_groups(address, pending=True)
    except Exception as exc:  # best effort, as in the callback
        print(f"could not check for leaked placement groups: {exc}", flush=True)
        return []
    released = []
    for group in holding:
        if group.placement_group_id not in before.groups:
            _remove(group.placement_group_id)
            released.append(group.placement_group_id)
    return released


def release_callback(before: Optional[Held] = None):
    """A Tune callback that runs :func:`release_leaked_train_groups` (sparing ``before``) after trials end and
    every 30 s."""
    from ray import tune  # noqa: PLC0415

    class ReleaseStoppedTrialResources(tune.Callback):
        def __init__(self) -> None:
            self._last = 0.0
            if not supported():
                import ray  # noqa: PLC0415

                print(f"raysrec: placement-group cleanup is off on Ray {ray.__version__} (tested on "
                      f"{', '.join(v + 'x' for v in TESTED_RAY)}); ASHA-stopped trials may hold their resources "
                      "(ray-project/ray#54305)", flush=True)

        def _sweep(self) -> None:
            self._last = time.time()
            try:
                for group in release_leaked_train_groups(spare=before.groups if before else frozenset()):
                    print(f"released placement group {group[:12]} left behind by a stopped trial", flush=True)
            except Exception as exc:  # the state API is best effort (e.g. no dashboard on this cluster)
                print(f"could not check for leaked placement groups: {exc}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._sweep()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._sweep()

        def on_step_begin(self, iteration, trials, **info):
            if time.time() - self._last > 30:
                self._sweep()

    return ReleaseStoppedTrialResources()
