"""Releasing the placement groups that Ray Train V2 trials stopped by a Tune scheduler leave behind.

When a scheduler (ASHA) stops a trial, Tune ends the trial's actor; with Train V2 the trial's
TrainController then goes, but the workers' placement group can outlive it
(ray-project/ray#54305), holding its CPUs/GPUs so the next trial's workers never start.

This uses Ray's state API (public) to find the groups, and ``PlacementGroup(PlacementGroupID)``
(private: the public API hands out group objects only to their creator or by name) to remove
them. It is therefore gated to the Ray versions it was written and tested against
(:data:`TESTED_RAY`); on another version it does nothing and says so once.
"""

from __future__ import annotations

import time
from typing import Optional

TESTED_RAY = ("2.60.",)


def supported() -> bool:
    import ray  # noqa: PLC0415

    return ray.__version__.startswith(TESTED_RAY)


def release_leaked_train_groups(min_age_s: float = 10.0, address: Optional[str] = None) -> list[str]:
    """Remove this job's placement groups that hold CPUs/GPUs, are older than ``min_age_s`` and have no
    live or pending actor placed in them (Tune's own trial bundles hold none); returns their ids."""
    import ray  # noqa: PLC0415
    from ray.util.placement_group import PlacementGroup  # noqa: PLC0415
    from ray.util.state import list_actors, list_placement_groups  # noqa: PLC0415

    if not supported():
        return []
    from ray._raylet import PlacementGroupID  # noqa: PLC0415  (gated above)

    address = address or ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True,
                                   raise_on_missing_output=False)
    used = {a.placement_group_id for a in list_actors(address=address, filters=[("state", "!=", "DEAD")],
                                                      detail=True, limit=10_000, raise_on_missing_output=False)}
    now_ns = time.time_ns()
    released = []
    for group in groups:
        holds = any(b["unit_resources"].get("CPU", 0) or b["unit_resources"].get("GPU", 0) for b in group.bundles)
        created = int((group.stats or {}).get("creation_request_received_ns") or now_ns)
        if (group.creator_job_id != job or not holds or group.placement_group_id in used
                or now_ns - created < min_age_s * 1e9):
            continue
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group.placement_group_id))))
        released.append(group.placement_group_id)
    return released


def release_after_search(settle_s: float = 3.0) -> list[str]:
    """Once the search has ended no Train group of this job is in use: release what stopped trials left,
    waiting up to ``settle_s`` for a stopped trial's group that is still being handed back."""
    released: list[str] = []
    deadline = time.time() + settle_s
    while True:
        try:
            released += release_leaked_train_groups(min_age_s=0.0)
        except Exception as exc:  # best effort, as in the callback
            print(f"could not check for leaked placement groups: {exc}", flush=True)
            return released
        if released or time.time() > deadline:
            return released
        time.sleep(1.0)


def release_callback():
    """A Tune callback that runs :func:`release_leaked_train_groups` after trials end and every 30 s."""
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
                for group in release_leaked_train_groups():
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
