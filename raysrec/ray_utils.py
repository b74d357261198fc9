"""Connecting to Ray: an existing cluster when there is one, a local one otherwise."""

from __future__ import annotations

import logging
import os
from typing import Optional

_DASHBOARD: Optional[str] = None


def dashboard_url() -> Optional[str]:
    """The Ray dashboard of the Ray this process joined, when it runs one."""
    return f"http://{_DASHBOARD}" if _DASHBOARD and not _DASHBOARD.startswith("http") else _DASHBOARD


def ensure_ray(num_cpus: Optional[int] = None, quiet: bool = True, serve_env: Optional[dict[str, str]] = None) -> None:
    """``ray.init`` once: joins ``RAY_ADDRESS`` (set by ``ray job submit``) or starts local mode.

    Worker output reaches the driver (per-epoch lines of Ray Train workers); ``quiet`` only
    lowers Ray's own log level.
    """
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    kwargs = {}
    if num_cpus is not None and not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
    if serve_env is not None and not os.environ.get("RAY_ADDRESS"):
        # A local Ray is started here, so Serve's ingress flags (`raysrec serve`/`pipeline`) are ours to set;
        # a cluster has its own. Without them Ray keeps its defaults.
        os.environ.update(serve_env)
    global _DASHBOARD
    context = ray.init(logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=True, **kwargs)
    _DASHBOARD = getattr(context, "dashboard_url", None) or None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAYSREC_PROGRESS", "1") != "0"
