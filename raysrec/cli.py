"""The ``raysrec`` command line: one sub-command per stage, each a thin shell over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

from raysrec.config import field_of
from raysrec.errors import ConfigError, RaysrecError


def add_config_options(parser: argparse.ArgumentParser, cls: type, specs: list[str]) -> None:
    """One option per config field, built from the field itself: type, ``Literal`` choices, default and help.

    A spec is a dotted field path (``model.max_length`` -> ``--max-length``), optionally with the option names
    to use instead: ``"source.path:--input,-i"``. Options default to "not given", so a ``--config`` file's
    values stay unless a flag overrides them.
    """
    for spec in specs:
        path, _, names = spec.partition(":")
        field, annotation = field_of(cls, path)
        flags = names.split(",") if names else ["--" + path.rsplit(".", 1)[-1].replace("_", "-")]
        options = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (
            Union, UnionType) else [annotation]
        kind = options[0]
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        text = field.metadata.get("help", "")
        text = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs: dict[str, Any] = {"dest": f"cfg:{path}", "default": None, "help": text}
        if get_origin(kind) is Literal:
            kwargs.update(choices=list(get_args(kind)), type=type(get_args(kind)[0]))
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is list:
            kwargs.update(nargs="+", type=get_args(kind)[0], metavar=path.rsplit(".", 1)[-1].upper())
        elif kind in (int, float, str):
            kwargs.update(type=kind, metavar=path.rsplit(".", 1)[-1].upper())
        else:
            raise TypeError(f"{cls.__name__}.{path}: no command-line option for {kind}")
        if not flags[0].startswith("-"):       # a positional argument (optional: a --config file may give it)
            kwargs.update(nargs="?", metavar=flags[0].upper())
            parser.add_argument(kwargs.pop("dest"), **kwargs)
            continue
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--config", "-c", help=f"a {cls.__name__} YAML file; options given override it")


def _config_from_args(cls, args: argparse.Namespace):
    """A stage config: the ``--config`` file first, then every option given on the command line."""
    data: dict[str, Any] = cls.load(args.config).to_dict() if args.config else {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:") or value is None:
            continue
        node = data
        *parents, leaf = dest[len("cfg:"):].split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return cls.from_dict(data)


# ---------------------------------------------------------------- which config fields each command exposes
SYNTH_OPTIONS = ["output:--output,-o", "num_users:--num-users,--users", "num_items:--num-items,--items",
                 "num_events:--num-events,--events", "seed", "format:--file-format"]
PREPARE_OPTIONS = [
    "source.path:--input,-i", "output:--output,-o", "source.format", "source.items_path:--items",
    "source.users_path:--users", "source.user_col", "source.item_col", "source.time_col", "source.rating_col",
    "source.type_col", "types", "source.columns", "item_features", "user_features", "source.sep", "source.encoding",
    "source.id_type", "source.on_bad_row", "min_rating", "item_k_core", "user_k_core", "min_sequence_length",
    "max_sequence_length",
    "split.protocol:--split", "split.valid_time", "split.test_time", "split.valid_quantile", "split.test_quantile",
    "event_log:--event-log", "num_shards", "overwrite"]
TRAIN_OPTIONS = [
    "data:--data,-d", "output:--output,-o", "model.name:--model", "loss", "epochs", "patience", "batch_size", "lr",
    "model.hidden_dim", "model.num_layers", "model.num_heads", "model.dropout", "model.max_length", "seed",
    "num_workers", "cpus_per_worker", "use_gpu", "model.use_text", "model.id_dropout", "model.use_types",
    "model.use_item_features", "model.features_on_output", "model.use_user_features", "target_types", "cold_items",
    "resume", "resume_from", "init_from", "init_optimizer", "init_shrink", "init_perturb", "item_grads",
    "eval_max_users", "final_eval_max_users", "bf16", "storage_path", "verbose"]
RECOMMEND_OPTIONS = ["model:--model,-m", "data:--data,-d", "histories", "output:--output,-o", "k:-k,--k",
                     "exclude_seen", "now", "batch_size", "num_actors", "cpus_per_actor", "use_gpu"]
EMBED_OPTIONS = ["data:--data,-d", "model", "batch_size", "num_actors", "use_gpu"]
TUNE_OPTIONS = [
    "data:--data,-d", "output:--output,-o", "space", "num_samples", "max_concurrent", "epochs", "grace_period", "seed",
    "scheduler", "refit_epochs", "train.model.name:--model", "train.loss", "train.patience", "train.num_workers",
    "train.cpus_per_worker", "train.gpus_per_worker", "train.use_gpu", "train.target_types"]
SERVE_OPTIONS = [
    "model_dir:--model,-m", "host", "port", "num_replicas:--num-replicas,--replicas", "device", "batching",
    "max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests", "torch_threads", "ingress", "throughput_optimized",
    "retrieval", "ann_min_items", "ann_ef_search", "store.url:--store", "store.event_log:--event-log",
    "store.max_history", "store.flush_interval_s"]
PIPELINE_OPTIONS = ["output:--output,-o", "storage_path", "stage", "deploy"]
INGEST_OPTIONS = ["source.path:input", "url", "rate", "batch_size", "type", "limit", "source.format",
                  "source.user_col", "source.item_col", "source.time_col", "source.type_col", "source.columns",
                  "source.sep", "source.id_type", "source.on_bad_row"]
EXPORT_OPTIONS = ["url:--store", "event_log:--event-log", "export_batch:--batch", "export_lease_s", "key_prefix"]


def _cmd_synth(args: argparse.Namespace) -> int:
    from raysrec.data.synth import SynthConfig, write  # noqa: PLC0415

    cfg = _config_from_args(SynthConfig, args)
    out = write(cfg)
    print(f"wrote {cfg.num_events:,} events of {cfg.num_users:,} users on {cfg.num_items:,} items to {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from raysrec.data.pipeline import PrepareConfig, check_inputs, prepare  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    cfg = _config_from_args(PrepareConfig, args)
    check_inputs(cfg)             # a wrong path, format or column fails here, before Ray starts
    ensure_ray(num_cpus=args.num_cpus)
    manifest = prepare(cfg)
    summary = {k: manifest[k] for k in ("rows_read", "rows_kept", "rows_dropped", "num_users", "num_items", "event_types",
                                         "sequence_length", "splits", "seconds")}
    print(json.dumps(summary, indent=2))
    print(f"prepared data written to {os.path.abspath(cfg.output)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from raysrec.data.storage import PreparedData  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415

    cfg = _config_from_args(TrainConfig, args)
    data = PreparedData.load(cfg.data)   # a wrong --data fails here, in one line, before Ray starts
    data.target_split(cfg.target_types)  # and so does a --target-types the data does not have
    if cfg.resume_from:                  # so does a checkpoint trained on other items
        from raysrec import artifact  # noqa: PLC0415
        from raysrec.evaluation import check_same_items  # noqa: PLC0415

        if "://" in cfg.resume_from:
            cfg = cfg.replace(resume_from=artifact.locate(cfg.resume_from))
        else:
            checkpoint = artifact.resolve(cfg.resume_from).checkpoint     # a model folder or a checkpoint folder
            check_same_items(artifact.item_ids(checkpoint), data, cfg.resume_from)
            cfg = cfg.replace(resume_from=str(checkpoint))
            print(f"resuming from {checkpoint} (epoch {artifact.verify_checkpoint(checkpoint).get('epoch')})")
    if cfg.resume and not args.no_ray:   # and --resume with no run to continue
        from raysrec.config import redact  # noqa: PLC0415
        from raysrec.train.ray_train import latest_run  # noqa: PLC0415
        from raysrec.train.run import run_storage  # noqa: PLC0415

        storage = run_storage(cfg)
        if latest_run(storage) is None:
            raise ConfigError(f"train.resume: no Ray Train run to resume in {redact(storage)}")
    if cfg.init_from:                    # and a warm-start model that is not there
        from raysrec import artifact  # noqa: PLC0415

        cfg = cfg.replace(init_from=artifact.locate(cfg.init_from))
    from raysrec.train.run import fit  # noqa: PLC0415  (PyTorch: after the checks, so a mistake is reported at once)

    if not args.no_ray:
        ensure_ray(num_cpus=args.num_cpus)
    metrics = fit(cfg, use_ray=not args.no_ray)
    print(json.dumps({"test": metrics["test"], "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"]},
                     indent=2))
    test = metrics["test"]
    if "users_total" in test:
        print(f"valid and test figures on a seeded sample of {test['rows']:,} of {test['users_total']:,} users: "
              f"test ndcg@10 {test['ndcg@10']:.4f} +- {test['ci95_ndcg@10']:.4f} (95-percent confidence interval); "
              "--final-eval-max-users 0 scores every user")
    print(f"model, metrics and training curve written to {os.path.abspath(cfg.output)}")
    return 0


def _cmd_embed_items(args: argparse.Namespace) -> int:
    from raysrec.data.storage import PreparedData  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.text.embed import EmbedConfig, embed_items, resolve_encoder  # noqa: PLC0415

    cfg = _config_from_args(EmbedConfig, args)
    PreparedData.load(cfg.data)  # a wrong --data and a missing extra fail here, before Ray starts
    resolve_encoder(cfg.model)
    ensure_ray(num_cpus=args.num_cpus)
    entry = embed_items(cfg)
    print(json.dumps(entry, indent=2))
    print(f"text vectors stored in {os.path.abspath(cfg.data)}/items.parquet (column text_vector); "
          f"train with --use-text")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from raysrec.serving.batch import OUTPUT_DIR, RecommendConfig, recommend  # noqa: PLC0415

    cfg = _config_from_args(RecommendConfig, args)
    summary = recommend(cfg, num_cpus=args.num_cpus)
    print(json.dumps(summary, indent=2))
    print(f"recommendations: {cfg.output.rstrip('/')}/{OUTPUT_DIR}/*.parquet (user_id, item_ids, scores, fallback)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.max_users is not None and args.max_users < 0:
        raise ConfigError(f"evaluate --max-users: expected a number of users >= 0 (0: every user), got {args.max_users}")
    from raysrec.evaluation import evaluate_checkpoint  # noqa: PLC0415

    metrics = evaluate_checkpoint(args.data, args.model, protocol=args.protocol, split=args.split, seed=args.seed,
                                  targets=args.targets, candidates=args.candidates, max_users=args.max_users)
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
        print(f"serving on http://127.0.0.1:{args.port} until Ctrl-C or SIGTERM")
        _serve_until_stopped("demo")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """Print a stage's config with every field at its default: the reference, and a file to start from."""
    import yaml  # noqa: PLC0415

    from raysrec.data.pipeline import PrepareConfig  # noqa: PLC0415
    from raysrec.data.synth import SynthConfig  # noqa: PLC0415
    from raysrec.pipeline import PipelineConfig  # noqa: PLC0415
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415
    from raysrec.tuning.config import SearchConfig  # noqa: PLC0415

    if args.stage == "serve-deploy":   # the Serve deploy template (`serve deploy FILE`), shipped with the package
        import importlib.resources  # noqa: PLC0415

        print((importlib.resources.files("raysrec.serving") / "deploy.yaml").read_text(), end="")
        return 0
    configs = {"pipeline": PipelineConfig, "synth": SynthConfig, "prepare": PrepareConfig, "train": TrainConfig,
               "tune": SearchConfig, "serve": ServeConfig}
    cfg = configs[args.stage]()
    if args.stage == "pipeline":
        cfg = cfg.replace(tune=SearchConfig().to_dict() | {"data": "x", "output": "x"}).resolved()
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from raysrec.pipeline import PipelineConfig, run_pipeline  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    cfg = _config_from_args(PipelineConfig, args)
    # the pipeline's Ray also trains: its workers keep Ray's niceness (only `raysrec serve` lowers it)
    ensure_ray(num_cpus=args.num_cpus, serve_env={k: v for k, v in cfg.serve.ray_serve_env().items()
                                                  if k.startswith("RAY_SERVE_")})
    summary = run_pipeline(cfg)
    print(json.dumps({"seconds": summary["seconds"], "endpoint": summary.get("endpoint")}, indent=2))
    if args.keep_serving and cfg.deploy:
        print(f"serving on {summary['endpoint']} until Ctrl-C or SIGTERM")
        _serve_until_stopped(cfg.serve.app_name)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from raysrec.data.storage import PreparedData  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.tuning.config import SearchConfig  # noqa: PLC0415
    from raysrec.tuning.search import check_output, run_search  # noqa: PLC0415
    from raysrec.tuning.space import load_space, space_path  # noqa: PLC0415

    output = vars(args).get("cfg:output")
    if args.resume and output and os.path.isfile(os.path.join(output, "tune_config.yaml")) and not args.config:
        args.config = os.path.join(output, "tune_config.yaml")  # resume with the original settings
    cfg = _config_from_args(SearchConfig, args)
    load_space(space_path(cfg.space))  # a bad space fails here, before Ray starts
    PreparedData.load(cfg.data).target_split(cfg.train.target_types)   # so do a wrong --data and --target-types
    check_output(cfg, resume=args.resume)                               # and an output that holds a search
    ensure_ray(num_cpus=args.num_cpus)
    summary = run_search(cfg, resume=args.resume)
    search = summary["search"]
    print(json.dumps({"trial_id": search["trial_id"], "params": search["params"], "valid": summary["valid"],
                      "test": summary["test"], "num_trials": search["num_trials"],
                      "wall_seconds": search["wall_seconds"]}, indent=2, default=str))
    out = os.path.abspath(cfg.output)
    print(f"best model: {out}/best  (serve it: raysrec serve --model {out}/best)")
    print(f"all trials: {out}/trials.csv, report: {out}/report.png, "
          f"TensorBoard: tensorboard --logdir {out}/ray_results")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from raysrec import artifact  # noqa: PLC0415
    from raysrec.config import redact  # noqa: PLC0415
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.serving.app import run  # noqa: PLC0415
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415
    from raysrec.serving.live import check_store  # noqa: PLC0415

    cfg = _config_from_args(ServeConfig, args)
    cfg = cfg.replace(model_dir=artifact.locate(cfg.model_dir),  # fail fast (no download); absolute for the replicas
                      store=cfg.store.absolute())
    check_store(cfg.store)                                        # so does a store that cannot be opened
    ensure_ray(num_cpus=args.num_cpus, serve_env=cfg.ray_serve_env())
    run(cfg)
    url = cfg.url
    print(f"serving {cfg.model_dir} at {url}  (POST /recommend, POST /score, GET /model, GET /healthz)", flush=True)
    if cfg.store.enabled:
        print(f"live state in {redact(cfg.store.url)}  (POST /events, GET /users/ID/history, DELETE /users/ID)"
              + (f"; event log: {redact(cfg.store.event_log)}" if cfg.store.event_log else ""), flush=True)
    print(f"try: curl -s {url}/recommend -H 'content-type: application/json' -d '{{\"history\": [], \"k\": 5}}'")
    if not args.detach:
        _serve_until_stopped(cfg.app_name)
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy onto the Serve of a running cluster, replacing the app's model: a rolling update."""
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    from raysrec import artifact  # noqa: PLC0415
    from raysrec.errors import InputError  # noqa: PLC0415
    from raysrec.serving.app import run  # noqa: PLC0415
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415

    cfg = _config_from_args(ServeConfig, args)
    cfg = cfg.replace(model_dir=artifact.locate(cfg.model_dir))
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # Ray retries an unreachable GCS for minutes; a wrong address is the user's mistake, said at once
        import socket  # noqa: PLC0415

        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise InputError(f"no running Ray cluster at {address!r} to deploy to ({exc.strerror or exc}); start "
                             "one with `ray start --head`, or serve locally with `raysrec serve`") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"no running Ray cluster at {address!r} to deploy to ({first}); start one with "
                         "`ray start --head`, or serve locally with `raysrec serve`") from None
    running = serve.status().applications.get(cfg.app_name)
    print(f"{'updating' if running else 'creating'} app {cfg.app_name!r}: {cfg.model_dir}", flush=True)
    run(cfg)      # new replicas start and pass their health check before the old ones drain and stop
    url = cfg.url
    print(f"deployed: {url}/model names the version now serving")
    return 0


def _cmd_events_ingest(args: argparse.Namespace) -> int:
    from raysrec.online.replay import ReplayConfig, replay  # noqa: PLC0415

    cfg = _config_from_args(ReplayConfig, args)
    bar = _progress_bar("events")
    summary = replay(cfg, progress=bar)
    bar(None, None)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_events_export(args: argparse.Namespace) -> int:
    from raysrec.config import redact  # noqa: PLC0415
    from raysrec.online.events import StoreConfig  # noqa: PLC0415
    from raysrec.online.log import export_events  # noqa: PLC0415
    from raysrec.online.store import open_store  # noqa: PLC0415
    from raysrec.serving.live import check_store  # noqa: PLC0415

    cfg = _config_from_args(StoreConfig, args).absolute()
    if not cfg.event_log:
        raise ConfigError("store.event_log: where to export (--event-log PATH or URI) is required")
    if not cfg.enabled:
        raise ConfigError("store.url: a store to export from is required (--store sqlite:///FILE or redis://...)")
    check_store(cfg)
    bar = _progress_bar("events")
    with open_store(cfg) as store:
        result = export_events(store, cfg.event_log, batch=cfg.export_batch, lease_s=cfg.export_lease_s, progress=bar)
    bar(None, None)
    print(json.dumps(result, indent=2))
    if "skipped" in result:
        print(f"nothing exported: {result['skipped']} (a replica's scheduled flush); try again later",
              file=sys.stderr)
        return 1
    print(f"event log: {redact(cfg.event_log)} (every event up to seq {result['last_seq']})")
    return 0


def _progress_bar(unit: str):
    """``update(done, total)``; ``update(None, None)`` closes. A tqdm bar on a terminal (off with RAYSREC_PROGRESS=0)."""
    state: dict[str, Any] = {}
    enabled = os.environ.get("RAYSREC_PROGRESS", "1") != "0" and sys.stderr.isatty()

    def update(done: Optional[int], total: Optional[int]) -> None:
        if not enabled:
            return
        from tqdm import tqdm  # noqa: PLC0415

        if done is None:
            if "bar" in state:
                state["bar"].close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, unit=unit, unit_scale=True)
        state["bar"].total = total
        state["bar"].update(done - state["bar"].n)

    return update


def _serve_until_stopped(app_name: str) -> None:
    from raysrec.serving.app import serve_until_stopped  # noqa: PLC0415

    serve_until_stopped(app_name)


def _num_cpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for a local Ray (ignored on a cluster)")


def build_parser() -> argparse.ArgumentParser:
    from raysrec.data.pipeline import PrepareConfig  # noqa: PLC0415
    from raysrec.data.synth import SynthConfig  # noqa: PLC0415
    from raysrec.pipeline import PipelineConfig  # noqa: PLC0415
    from raysrec.serving.batch import RecommendConfig  # noqa: PLC0415
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415
    from raysrec.text.embed import EmbedConfig  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415
    from raysrec.tuning.config import SearchConfig  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="raysrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic default interaction log")
    add_config_options(p, SynthConfig, SYNTH_OPTIONS)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="raw interactions -> per-user sequence shards (Ray Data)")
    add_config_options(p, PrepareConfig, PREPARE_OPTIONS)
    _num_cpus(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train sasrec / longshort with Ray Train; writes checkpoint, metrics, curve")
    add_config_options(p, TrainConfig, TRAIN_OPTIONS)
    p.add_argument("--no-ray", action="store_true", help="train in this process without Ray (debugging)")
    _num_cpus(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="re-score a model (full ranking or the sampled protocol)")
    p.add_argument("--data", "-d", required=True, help="the prepared folder the model was trained on")
    p.add_argument("--model", "-m", required=True, help="a model folder (train/tune output) or a checkpoint folder")
    p.add_argument("--protocol", choices=["full", "sampled"], default="full")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", choices=["all", "cold", "warm"], default="all",
                   help="cold/warm: only targets among / outside the items held out by --cold-items")
    p.add_argument("--candidates", choices=["all", "cold"], default="all",
                   help="cold (with --targets cold): rank the target among the held-out items only")
    p.add_argument("--max-users", type=int, default=None,
                   help="score a fixed, seeded sample of this many users, with 95-percent confidence intervals "
                        "(default: the model's final_eval_max_users, as its metrics.json; 0: every user)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k for every user, offline (Ray Data batch inference) -> Parquet")
    add_config_options(p, RecommendConfig, RECOMMEND_OPTIONS)
    _num_cpus(p)
    p.set_defaults(func=_cmd_recommend)

    p = sub.add_parser("embed-items", help="encode item text with a language model (Ray Data actor pool)")
    add_config_options(p, EmbedConfig, EMBED_OPTIONS)
    _num_cpus(p)
    p.set_defaults(func=_cmd_embed_items)

    p = sub.add_parser("tune", help="hyper-parameter search: Ray Tune + Optuna TPE + ASHA over Ray Train runs")
    add_config_options(p, SearchConfig, TUNE_OPTIONS)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    _num_cpus(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("serve", help="serve a model over HTTP with Ray Serve (batched top-k retrieval)")
    add_config_options(p, ServeConfig, SERVE_OPTIONS)
    p.add_argument("--detach", action="store_true", help="deploy and return (on a running cluster)")
    _num_cpus(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("deploy", help="deploy or replace the model of a running cluster's Serve app (rolling, "
                                      "no request dropped)")
    add_config_options(p, ServeConfig, SERVE_OPTIONS)
    p.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else the local one: auto)")
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("pipeline", help="prepare -> train or tune -> export best -> deploy -> smoke query, one config")
    add_config_options(p, PipelineConfig, PIPELINE_OPTIONS)
    p.add_argument("--keep-serving", action="store_true", help="keep this driver (and a local Serve) up until Ctrl-C")
    _num_cpus(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("events", help="the live service's events: replay a log through POST /events, or export "
                                      "the store to the Parquet event log")
    events = p.add_subparsers(dest="events_command", required=True)
    from raysrec.online.events import StoreConfig  # noqa: PLC0415
    from raysrec.online.replay import ReplayConfig  # noqa: PLC0415

    q = events.add_parser("ingest", help="replay a log (any layout prepare reads) through POST /events in time "
                                         "order: back-fill live state, or load-test")
    add_config_options(q, ReplayConfig, INGEST_OPTIONS)
    q.set_defaults(func=_cmd_events_ingest)
    q = events.add_parser("export", help="export acknowledged events from the store to the event log (Parquet by "
                                         "day; resumable: a killed export run again skips and repeats nothing)")
    add_config_options(q, StoreConfig, EXPORT_OPTIONS)
    q.set_defaults(func=_cmd_events_export)

    p = sub.add_parser("config", help="print a stage's config with all defaults (a reference and a starting file)")
    p.add_argument("stage", choices=["pipeline", "synth", "prepare", "train", "tune", "serve", "serve-deploy"],
                   help="a stage's config, or serve-deploy: the Ray Serve deploy file (`serve deploy FILE`)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> serve -> sample request, on the embedded synthetic data")
    p.add_argument("--output", "-o", default="runs/demo")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    _num_cpus(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaysrecError as exc:
        print(f"raysrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry(argv: Optional[list[str]] = None) -> None:
    """What the ``raysrec`` command and the ``jobs/`` entrypoints run: exit with :func:`main`'s status.

    An input refused before Ray started (status 2) exits at once, skipping the interpreter's teardown: there is
    nothing to clean up, and once, in a clean-clone CI run, a C++ thread of an imported native library aborted
    that teardown ("terminate called without an active exception", SIGABRT) after the one-line error was
    printed, so the command ended with -6 instead of 2. With Ray running the teardown stays (it stops Ray)."""
    code = main(argv)
    ray = sys.modules.get("ray")
    if code == 2 and not (ray is not None and ray.is_initialized()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(code)


if __name__ == "__main__":
    entry()
