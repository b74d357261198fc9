"""The ``raysrec`` command line: one sub-command per stage, each a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional

from raysrec.errors import RaysrecError


def _config_from_args(cls, args: argparse.Namespace, mapping: dict[str, str], base: Optional[str] = None):
    """Build a stage config: a YAML file (``--config``) first, then the flags given explicitly."""
    data: dict[str, Any] = {}
    if base:
        data = cls.load(base).to_dict()
    for flag, field in mapping.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        node = data
        *parents, leaf = field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cls.from_dict(data)


def _cmd_synth(args: argparse.Namespace) -> int:
    from raysrec.data.synth import SynthConfig, write  # noqa: PLC0415

    cfg = _config_from_args(SynthConfig, args, {
        "output": "output", "users": "num_users", "items": "num_items", "events": "num_events",
        "seed": "seed", "file_format": "format"}, args.config)
    out = write(cfg)
    print(f"wrote {cfg.num_events:,} events of {cfg.num_users:,} users on {cfg.num_items:,} items to {out}")
    return 0


PREPARE_FLAGS = {
    "input": "source.path", "format": "source.format", "items": "source.items_path",
    "user_col": "source.user_col", "item_col": "source.item_col", "time_col": "source.time_col",
    "rating_col": "source.rating_col", "sep": "source.sep", "encoding": "source.encoding",
    "id_type": "source.id_type", "on_bad_row": "source.on_bad_row", "output": "output",
    "min_rating": "min_rating", "item_k_core": "item_k_core", "user_k_core": "user_k_core",
    "min_length": "min_sequence_length", "max_length": "max_sequence_length", "num_shards": "num_shards",
    "overwrite": "overwrite",
}


def _cmd_prepare(args: argparse.Namespace) -> int:
    from raysrec.data.pipeline import PrepareConfig, prepare  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    cfg = _config_from_args(PrepareConfig, args, PREPARE_FLAGS, args.config)
    ensure_ray(num_cpus=args.num_cpus)
    manifest = prepare(cfg)
    summary = {k: manifest[k] for k in ("rows_read", "rows_kept", "rows_dropped", "num_users", "num_items",
                                         "sequence_length", "seconds")}
    print(json.dumps(summary, indent=2))
    print(f"prepared data written to {os.path.abspath(cfg.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic default interaction log")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--events", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--file-format", choices=["csv", "parquet"], dest="file_format")
    p.add_argument("--config", help="SynthConfig YAML")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="raw interactions -> per-user sequence shards (Ray Data)")
    p.add_argument("--input", "-i", help="interaction file or folder")
    p.add_argument("--output", "-o", help="output folder (written atomically)")
    p.add_argument("--format", choices=["auto", "ml-1m", "ml-100k", "recbole", "sasrec", "csv", "parquet"])
    p.add_argument("--items", help="item metadata file (titles, categories)")
    p.add_argument("--user-col", dest="user_col")
    p.add_argument("--item-col", dest="item_col")
    p.add_argument("--time-col", dest="time_col")
    p.add_argument("--rating-col", dest="rating_col")
    p.add_argument("--sep", help="field separator for csv (default ',')")
    p.add_argument("--encoding")
    p.add_argument("--id-type", dest="id_type", choices=["auto", "int", "str"])
    p.add_argument("--on-bad-row", dest="on_bad_row", choices=["error", "skip"],
                   help="error (default): stop at the first bad line; skip: count it under malformed_row")
    p.add_argument("--min-rating", type=float, dest="min_rating")
    p.add_argument("--item-k-core", type=int, dest="item_k_core")
    p.add_argument("--user-k-core", type=int, dest="user_k_core")
    p.add_argument("--min-length", type=int, dest="min_length")
    p.add_argument("--max-length", type=int, dest="max_length")
    p.add_argument("--num-shards", type=int, dest="num_shards")
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for a local Ray (ignored on a cluster)")
    p.add_argument("--config", help="PrepareConfig YAML; flags override it")
    p.set_defaults(func=_cmd_prepare)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaysrecError as exc:
        print(f"raysrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
