"""The ``raysrec`` command line: one sub-command per stage, each a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

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


TRAIN_FLAGS = {
    "data": "data", "output": "output", "model": "model.name", "loss": "loss", "epochs": "epochs",
    "patience": "patience", "batch_size": "batch_size", "lr": "lr", "hidden_dim": "model.hidden_dim",
    "num_layers": "model.num_layers", "num_heads": "model.num_heads", "dropout": "model.dropout",
    "max_length": "model.max_length", "seed": "seed", "num_workers": "num_workers", "use_gpu": "use_gpu",
    "cpus_per_worker": "cpus_per_worker", "resume_from": "resume_from", "storage_path": "storage_path",
    "use_text": "model.use_text", "id_dropout": "model.id_dropout", "cold_items": "cold_items",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415
    from raysrec.train.run import fit  # noqa: PLC0415

    cfg = _config_from_args(TrainConfig, args, TRAIN_FLAGS, args.config)
    if not args.no_ray:
        ensure_ray(num_cpus=args.num_cpus)
    metrics = fit(cfg, use_ray=not args.no_ray)
    print(json.dumps({"test": metrics["test"], "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"]},
                     indent=2))
    print(f"model, metrics and training curve written to {os.path.abspath(cfg.output)}")
    return 0


def _cmd_embed_items(args: argparse.Namespace) -> int:
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.text.embed import EmbedConfig, embed_items, resolve_encoder  # noqa: PLC0415

    cfg = _config_from_args(EmbedConfig, args, {"data": "data", "model": "model", "batch_size": "batch_size",
                                                "num_actors": "num_actors", "use_gpu": "use_gpu"}, args.config)
    from raysrec.data.sequences import PreparedData  # noqa: PLC0415

    PreparedData.load(cfg.data)  # a wrong --data and a missing extra fail here, before Ray starts
    resolve_encoder(cfg.model)
    ensure_ray(num_cpus=args.num_cpus)
    entry = embed_items(cfg)
    print(json.dumps(entry, indent=2))
    print(f"text vectors stored in {os.path.abspath(cfg.data)}/items.parquet (column text_vector); "
          f"train with --use-text")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raysrec.train.loop import evaluate_checkpoint  # noqa: PLC0415

    model_dir = args.model
    if os.path.isdir(os.path.join(model_dir, "checkpoint")):
        model_dir = os.path.join(model_dir, "checkpoint")
    metrics = evaluate_checkpoint(args.data, model_dir, protocol=args.protocol, split=args.split, seed=args.seed,
                                  targets=args.targets, candidates=args.candidates)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The pipeline on the embedded synthetic default (`make demo`): synth -> prepare -> train -> serve -> query."""
    from raysrec.pipeline import PipelineConfig, run_pipeline  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    cfg = PipelineConfig.from_dict({"output": args.output, "train": {"epochs": args.epochs, "patience": 3},
                                    "serve": {"port": args.port, "app_name": "demo"}})
    ensure_ray(num_cpus=args.num_cpus)
    run_pipeline(cfg)
    if args.keep_serving:
        print(f"serving on http://127.0.0.1:{args.port} until Ctrl-C")
        _serve_until_interrupted()
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """Print a stage's config with every field at its default: the reference, and a file to start from."""
    import yaml  # noqa: PLC0415

    from raysrec.data.pipeline import PrepareConfig  # noqa: PLC0415
    from raysrec.data.synth import SynthConfig  # noqa: PLC0415
    from raysrec.pipeline import PipelineConfig  # noqa: PLC0415
    from raysrec.serving.app import ServeConfig  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415
    from raysrec.tuning.search import SearchConfig  # noqa: PLC0415

    configs = {"pipeline": PipelineConfig, "synth": SynthConfig, "prepare": PrepareConfig, "train": TrainConfig,
               "tune": SearchConfig, "serve": ServeConfig}
    cfg = configs[args.stage]()
    if args.stage == "pipeline":
        cfg = cfg.replace(tune=SearchConfig().to_dict() | {"data": "x", "output": "x"}).resolved()
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


PIPELINE_FLAGS = {"output": "output", "storage_path": "storage_path", "stage": "stage", "deploy": "deploy"}


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from raysrec.pipeline import PipelineConfig, run_pipeline  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    cfg = _config_from_args(PipelineConfig, args, PIPELINE_FLAGS, args.config)
    ensure_ray(num_cpus=args.num_cpus)
    summary = run_pipeline(cfg)
    print(json.dumps({"seconds": summary["seconds"], "endpoint": summary.get("endpoint")}, indent=2))
    if args.keep_serving and cfg.deploy:
        print(f"serving on {summary['endpoint']} until Ctrl-C")
        _serve_until_interrupted()
    return 0


TUNE_FLAGS = {
    "data": "data", "output": "output", "space": "space", "num_samples": "num_samples",
    "max_concurrent": "max_concurrent", "epochs": "epochs", "grace_period": "grace_period", "seed": "seed",
    "model": "train.model.name", "loss": "train.loss", "num_workers": "train.num_workers",
    "cpus_per_worker": "train.cpus_per_worker", "gpus_per_worker": "train.gpus_per_worker",
    "use_gpu": "train.use_gpu", "patience": "train.patience", "refit_epochs": "refit_epochs",
}


def _cmd_tune(args: argparse.Namespace) -> int:
    from raysrec.data.sequences import PreparedData  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.tuning.search import SearchConfig, run_search, space_path  # noqa: PLC0415
    from raysrec.tuning.space import load_space  # noqa: PLC0415

    if args.resume and args.output and os.path.isfile(os.path.join(args.output, "tune_config.yaml")) \
            and not args.config:
        args.config = os.path.join(args.output, "tune_config.yaml")  # resume with the original settings
    cfg = _config_from_args(SearchConfig, args, TUNE_FLAGS, args.config)
    load_space(space_path(cfg.space))  # a bad space fails here, before Ray starts
    PreparedData.load(cfg.data)         # so does a wrong --data
    ensure_ray(num_cpus=args.num_cpus)
    summary = run_search(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("trial_id", "params", "valid", "test", "num_trials", "wall_seconds")},
                     indent=2, default=str))
    out = os.path.abspath(cfg.output)
    print(f"best model: {out}/best  (serve it: raysrec serve --model {out}/best)")
    print(f"all trials: {out}/trials.csv, report: {out}/report.png, "
          f"TensorBoard: tensorboard --logdir {out}/ray_results")
    return 0


SERVE_FLAGS = {
    "model": "model_dir", "host": "host", "port": "port", "replicas": "num_replicas", "device": "device",
    "max_batch_size": "max_batch_size", "batch_wait_timeout_s": "batch_wait_timeout_s",
    "max_ongoing_requests": "max_ongoing_requests", "torch_threads": "torch_threads", "batching": "batching",
}


def _cmd_serve(args: argparse.Namespace) -> int:
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.serving.app import ServeConfig, run  # noqa: PLC0415
    from raysrec.serving.recommender import resolve_model_dir  # noqa: PLC0415

    cfg = _config_from_args(ServeConfig, args, SERVE_FLAGS, args.config)
    resolve_model_dir(cfg.model_dir)  # fail fast, before starting anything
    ensure_ray(num_cpus=args.num_cpus)
    run(cfg)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"serving {cfg.model_dir} at {url}  (POST /recommend, POST /score, GET /model, GET /healthz)")
    print(f"try: curl -s {url}/recommend -H 'content-type: application/json' -d '{{\"history\": [], \"k\": 5}}'")
    if not args.detach:
        _serve_until_interrupted()
    return 0


def _serve_until_interrupted() -> None:
    """Keep this driver (and so a local Ray's Serve) alive until Ctrl-C, then shut Serve down."""
    import time  # noqa: PLC0415

    from ray import serve  # noqa: PLC0415

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic default interaction log")
    p.add_argument("--output", "-o", help="output folder")
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

    p = sub.add_parser("train", help="train sasrec / longshort with Ray Train; writes checkpoint, metrics, curve")
    p.add_argument("--data", "-d", help="a folder written by `raysrec prepare`")
    p.add_argument("--output", "-o", help="output folder")
    p.add_argument("--model", choices=["sasrec", "longshort"])
    p.add_argument("--loss", choices=["ce", "sampled", "bce"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden-dim", type=int, dest="hidden_dim")
    p.add_argument("--num-layers", type=int, dest="num_layers")
    p.add_argument("--num-heads", type=int, dest="num_heads")
    p.add_argument("--dropout", type=float)
    p.add_argument("--max-length", type=int, dest="max_length")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, dest="num_workers")
    p.add_argument("--cpus-per-worker", type=float, dest="cpus_per_worker")
    p.add_argument("--use-gpu", action="store_true", default=None, dest="use_gpu")
    p.add_argument("--use-text", action="store_const", const=True, dest="use_text",
                   help="fuse the item text vectors of `raysrec embed-items` into the item representation")
    p.add_argument("--id-dropout", type=float, dest="id_dropout",
                   help="with --use-text: share of item ID embeddings dropped per step, so the text alone ranks "
                        "well (for cold-start items)")
    p.add_argument("--cold-items", type=float, dest="cold_items",
                   help="cold-start protocol: hold this share of the items out of training (loss ce)")
    p.add_argument("--resume-from", dest="resume_from", help="a checkpoint folder to continue from")
    p.add_argument("--storage-path", dest="storage_path", help="Ray Train storage (local path or s3://...)")
    p.add_argument("--no-ray", action="store_true", help="train in this process without Ray (debugging)")
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for a local Ray (ignored on a cluster)")
    p.add_argument("--config", help="TrainConfig YAML; flags override it")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="re-score a checkpoint (full ranking or the sampled protocol)")
    p.add_argument("--data", "-d", required=True)
    p.add_argument("--model", "-m", required=True, help="a training output folder or a checkpoint folder")
    p.add_argument("--protocol", choices=["full", "sampled"], default="full")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", choices=["all", "cold", "warm"], default="all",
                   help="cold/warm: only targets among / outside the items held out by --cold-items")
    p.add_argument("--candidates", choices=["all", "cold"], default="all",
                   help="cold (with --targets cold): rank the target among the held-out items only")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("embed-items", help="encode item text with a language model (Ray Data actor pool)")
    p.add_argument("--data", "-d", help="a folder written by `raysrec prepare`; vectors go into its items.parquet")
    p.add_argument("--model", help="sentence-transformers model name or folder (default: all-MiniLM-L6-v2, packaged)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--num-actors", type=int, dest="num_actors", help="encoder actors (default 1)")
    p.add_argument("--use-gpu", action="store_const", const=True, dest="use_gpu", help="one GPU per actor")
    p.add_argument("--config", help="EmbedConfig YAML; flags override it")
    p.add_argument("--num-cpus", type=int, dest="num_cpus")
    p.set_defaults(func=_cmd_embed_items)

    p = sub.add_parser("tune", help="hyper-parameter search: Ray Tune + Optuna TPE + ASHA over Ray Train runs")
    p.add_argument("--data", "-d", help="a folder written by `raysrec prepare`")
    p.add_argument("--output", "-o", help="search folder: trials.csv, best/, report.png, ray_results/")
    p.add_argument("--space", help="search space: tune/<name>.yaml name or a YAML path (default: default)")
    p.add_argument("--num-samples", type=int, dest="num_samples", help="trials (default 16)")
    p.add_argument("--max-concurrent", type=int, dest="max_concurrent",
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--epochs", type=int, help="max epochs per trial (ASHA max_t)")
    p.add_argument("--grace-period", type=int, dest="grace_period")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", choices=["sasrec", "longshort"])
    p.add_argument("--loss", choices=["ce", "sampled", "bce"])
    p.add_argument("--patience", type=int)
    p.add_argument("--num-workers", type=int, dest="num_workers", help="Ray Train workers per trial")
    p.add_argument("--cpus-per-worker", type=float, dest="cpus_per_worker")
    p.add_argument("--gpus-per-worker", type=float, dest="gpus_per_worker", help="fractions share a GPU")
    p.add_argument("--use-gpu", action="store_const", const=True, dest="use_gpu")
    p.add_argument("--refit-epochs", type=int, dest="refit_epochs",
                   help="retrain the winner for up to N epochs (early stopping) and export that model")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    p.add_argument("--config", help="SearchConfig YAML; flags override it")
    p.add_argument("--num-cpus", type=int, dest="num_cpus")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve (batched top-k retrieval)")
    p.add_argument("--model", "-m", help="training output, checkpoint folder or tune export (best/)")
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--max-batch-size", type=int, dest="max_batch_size")
    p.add_argument("--batch-wait-timeout-s", type=float, dest="batch_wait_timeout_s")
    p.add_argument("--max-ongoing-requests", type=int, dest="max_ongoing_requests")
    p.add_argument("--torch-threads", type=int, dest="torch_threads")
    p.add_argument("--no-batching", action="store_const", const=False, dest="batching")
    p.add_argument("--config", help="ServeConfig YAML; flags override it")
    p.add_argument("--num-cpus", type=int, dest="num_cpus")
    p.add_argument("--detach", action="store_true", help="deploy and return (on a running cluster)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("pipeline", help="prepare -> train or tune -> export best -> deploy -> smoke query, one config")
    p.add_argument("--config", "-c", help="PipelineConfig YAML (see jobs/pipeline.yaml); flags override it")
    p.add_argument("--output", "-o", help="local output folder (default runs/pipeline)")
    p.add_argument("--storage-path", dest="storage_path",
                   help="publish data, checkpoints and best/ here too: a folder or s3://, gs://, file:// URI")
    p.add_argument("--stage", choices=["train", "tune"], help="train one config, or search (needs a tune section)")
    p.add_argument("--no-deploy", action="store_const", const=False, dest="deploy", help="stop after the export")
    p.add_argument("--keep-serving", action="store_true", help="keep this driver (and a local Serve) up until Ctrl-C")
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for a local Ray (ignored on a cluster)")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("config", help="print a stage's config with all defaults (a reference and a starting file)")
    p.add_argument("stage", choices=["pipeline", "synth", "prepare", "train", "tune", "serve"])
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> serve -> sample request, on the embedded synthetic data")
    p.add_argument("--output", "-o", default="runs/demo")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    p.add_argument("--num-cpus", type=int, dest="num_cpus")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaysrecError as exc:
        print(f"raysrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
