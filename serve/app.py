"""Serve entry point for ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``.

The application lives in :mod:`raysrec.serving.app`; this file only names it for Serve's
``import_path`` (``serve.app:app_builder``), so the YAML works from a checkout with
``--working-dir .`` as well as from an installed package (``raysrec.serving.app:build_app``).

    serve run serve/config.yaml                      # blocking, Ctrl-C to stop
    serve run serve.app:app_builder model_dir=runs/demo/model
"""

from raysrec.serving.app import build_app as app_builder

__all__ = ["app_builder"]
