"""``raysrec pipeline``: raw log -> prepare -> train (or tune) -> export best -> deploy -> smoke query.

One typed config (:class:`PipelineConfig`) holds every stage's config. Paths the stages pass to
each other are derived from ``output`` unless the file sets them::

    <output>/raw/         synthetic log (only when no source is given)
    <output>/prepared/    raysrec prepare (+ raysrec embed-items: when ``embed`` is set or the model uses text)
    <output>/model/       raysrec train   (stage: train)
    <output>/tune/        raysrec tune    (stage: tune)
    <output>/best/        the exported winner, a model folder (raysrec.artifact)
    <output>/recommendations/  raysrec recommend: top-k for every user (when a ``recommend`` section is given)
    <output>/pipeline.json  what ran, how long each stage took, where the workers ran, the endpoint

With ``storage_path`` (a local folder or any pyarrow filesystem URI: ``s3://``, ``gs://``,
``file://``) the prepared data is published there before training, so workers on every node read
their shards from shared storage, Ray Train keeps its checkpoints there, and ``best/`` and
``pipeline.json`` are published there at the end.

A nightly retrain is one config: ``train.init_from`` (the previous night's ``best/``) warm-starts the
model on the newer log, and a ``recommend`` section writes everyone's top-k for the next day.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal, Optional

from raysrec.config import Config, check, option, redact
from raysrec.data.pipeline import PrepareConfig
from raysrec.data.synth import SynthConfig
from raysrec.errors import RaysrecError
from raysrec.files import filesystem, join, publish
from raysrec.online.events import StoreConfig
from raysrec.serving.batch import RecommendConfig
from raysrec.serving.config import ServeConfig
from raysrec.text.embed import EmbedConfig
from raysrec.train.config import TrainConfig
from raysrec.tuning.config import SearchConfig

SUMMARY_FILE = "pipeline.json"


class PipelineError(RaysrecError):
    """A pipeline stage finished but its result is unusable (e.g. the endpoint does not answer)."""


@dataclasses.dataclass
class PipelineConfig(Config):
    """The whole chain in one file; every sub-config is the stage's own (same fields as its CLI)."""

    output: str = option("runs/pipeline", 'local output folder')
    storage_path: Optional[str] = option(None, 'publish data, checkpoints and best/ here too: a folder or URI')
    synth: SynthConfig = dataclasses.field(default_factory=SynthConfig)  # generated when no prepare.source.path
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    # item text vectors (``raysrec embed-items``) after prepare: run when this section is given or the
    # model uses text (``train.model.use_text``); its ``data`` is the prepared folder
    embed: Optional[EmbedConfig] = None
    stage: Literal["train", "tune"] = option("train", 'train one config, or search (needs a tune section)')
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tune: Optional[SearchConfig] = None   # its ``train`` (the trials' base) defaults to the section above
    # offline top-k for every user of the prepared data with the exported model (``raysrec recommend``)
    recommend: Optional[RecommendConfig] = None
    deploy: bool = option(True, 'deploy on Serve and send a smoke query')
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    # The live state the deployed app keeps (serve.store; default: <output>/state/events.db). With an event_log,
    # the pipeline is the nightly retrain of a live system: it exports the store's new events into the log, and
    # prepare reads the log beside the source (prepare.event_log), so the next model learns what was served.
    store: Optional[StoreConfig] = None
    smoke_k: int = 5

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Optional[str] = None) -> PipelineConfig:
        """Fill the paths the stages pass to each other from ``output`` before the stages validate."""
        if not isinstance(data, dict):
            return super().from_dict(data, where)  # raises the usual "expected a mapping" error
        data = copy.deepcopy(data)
        root = str(Path(data.get("output") or cls.output).resolve())  # Ray workers do not share our cwd
        derived = {"synth": {"output": f"{root}/raw"}, "prepare": {"output": f"{root}/prepared"},
                   "train": {"data": f"{root}/prepared", "output": f"{root}/model"},
                   "serve": {"model_dir": f"{root}/best"}}
        if data.get("recommend") is not None:
            derived["recommend"] = {"model": f"{root}/best", "data": f"{root}/prepared",
                                    "output": f"{root}/recommendations"}
        if data.get("embed") is not None or _uses_text(data):
            derived["embed"] = {"data": f"{root}/prepared"}
        if data.get("tune") is not None or data.get("stage") == "tune":
            derived["tune"] = {"data": f"{root}/prepared", "output": f"{root}/tune"}
        for section, paths in derived.items():
            if data.get(section) is None:
                data[section] = {}
            node = data[section]
            if isinstance(node, dict):
                for key, value in paths.items():
                    if not node.get(key):
                        node[key] = value
        store = data.get("store")
        if isinstance(data["serve"], dict) and isinstance(store, dict):
            data["serve"].setdefault("store", store)
            if store.get("event_log") and isinstance(data["prepare"], dict):
                data["prepare"].setdefault("event_log", store["event_log"])
        elif isinstance(data["serve"], dict) and not data["serve"].get("store"):
            data["serve"]["store"] = {"url": f"sqlite:///{root}/state/events.db"}
        if isinstance(data["prepare"], dict):
            source = data["prepare"].setdefault("source", {})
            if isinstance(source, dict) and not source.get("path") and isinstance(data["synth"], dict):
                source["path"] = data["synth"]["output"]   # no source: the synthetic log is generated
        if isinstance(data.get("tune"), dict) and isinstance(data["train"], dict):
            data["tune"].setdefault("train", data["train"])
        return super().from_dict(data, where)

    def resolved(self) -> PipelineConfig:
        """This config with the derived paths filled in (for configs built in Python)."""
        return type(self).from_dict(self.to_dict())

    def validate(self) -> None:
        check(self.output != "", "pipeline.output is required")
        check(self.stage != "tune" or self.tune is not None, "pipeline.stage is tune but there is no tune section")
        check(self.smoke_k >= 1, "pipeline.smoke_k must be >= 1")

    @property
    def root(self) -> Path:
        return Path(self.output).resolve()


def _uses_text(data: dict[str, Any]) -> bool:
    """Whether the (raw) config's model reads item text vectors, in the train or the tune section."""
    def model_of(section: Any) -> dict[str, Any]:
        model = section.get("model") if isinstance(section, dict) else None
        return model if isinstance(model, dict) else {}

    tune = data.get("tune") if isinstance(data.get("tune"), dict) else {}
    return bool(model_of(data.get("train")).get("use_text") or model_of(tune.get("train")).get("use_text"))


def _storage(cfg: PipelineConfig, name: str) -> Optional[str]:
    return join(cfg.storage_path, name) if cfg.storage_path else None


def sample_history(prepared: str | Path, user: int = 0, n: int = 10) -> list[Any]:
    """The last ``n`` items (original ids) of one user of a prepared folder: a realistic request."""
    from raysrec.data.storage import PreparedData  # noqa: PLC0415

    data = PreparedData.load(prepared)
    ids = data.items.set_index("item_index")["item_id"]
    history = data.read(data.shard_files()[:1]).sequence(user)[-n:]
    return [ids[i].item() if hasattr(ids[i], "item") else ids[i] for i in history]


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run_pipeline(cfg: PipelineConfig, log=print) -> dict[str, Any]:
    """Run every stage in order; returns (and writes to ``pipeline.json``) what happened."""
    from raysrec.data.pipeline import prepare  # noqa: PLC0415
    from raysrec.data.synth import write  # noqa: PLC0415
    from raysrec.ray_utils import dashboard_url  # noqa: PLC0415

    cfg = cfg.resolved()
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(root / "pipeline_config.yaml")
    summary: dict[str, Any] = {"output": str(root), "storage_path": redact(cfg.storage_path or "") or None,
                               "stage": cfg.stage,
                               "seconds": {}}
    steps = (5 if cfg.deploy else 3) + (cfg.recommend is not None)
    started = time.time()

    def step(n: int, text: str) -> float:
        log(f"[{n}/{steps}] {text}", flush=True)
        return time.time()

    # 1. data
    t = step(1, "prepare (Ray Data)")
    prep = cfg.prepare.replace(overwrite=True)  # the pipeline owns its prepared folder
    if cfg.store is not None and cfg.store.enabled and cfg.store.event_log:
        from raysrec.online.log import export_events  # noqa: PLC0415
        from raysrec.online.store import open_store  # noqa: PLC0415

        live = cfg.store.absolute()
        with open_store(live) as store:      # the replicas' scheduled flush may hold the lease: wait for it
            deadline = time.time() + 2 * live.export_lease_s
            while "skipped" in (exported := export_events(store, live.event_log, batch=live.export_batch,
                                                          lease_s=live.export_lease_s)) and time.time() < deadline:
                time.sleep(0.5)
        if "skipped" in exported:
            raise PipelineError(f"could not export the live events to {redact(live.event_log)}: {exported['skipped']}")
        log(f"      live events: {exported['exported']:,} more exported to {redact(live.event_log)} "
            f"(every event up to seq {exported['last_seq']})")
        summary["live_events"] = exported
    if prep.source.path == cfg.synth.output:
        write(cfg.synth)
        log(f"      synthetic log: {cfg.synth.num_events:,} events -> {cfg.synth.output}")
    manifest = prepare(prep)
    log(f"      {manifest['num_users']:,} users, {manifest['num_items']:,} items, {manifest['rows_kept']:,} events kept "
        f"of {manifest['rows_read']:,} read")
    if cfg.embed is not None:
        from raysrec.text.embed import embed_items  # noqa: PLC0415

        log("      item text vectors (Ray Data, raysrec embed-items)")
        t_embed = time.time()
        entry = embed_items(cfg.embed.replace(data=prep.output))
        log(f"      item text: {entry['items']:,} vectors ({entry['dim']}-d, {entry['model']}) in {entry['seconds']} s")
        summary["embed"] = entry
        summary["seconds"]["embed"] = round(time.time() - t_embed, 1)
    data_location = prep.output
    if cfg.storage_path:
        data_location = publish(prep.output, _storage(cfg, "prepared"))
        log(f"      published to {redact(data_location)}")
    summary["data"] = {k: manifest[k] for k in ("rows_read", "rows_kept", "rows_dropped", "num_users", "num_items")}
    summary["seconds"]["prepare"] = round(time.time() - t - summary["seconds"].get("embed", 0.0), 1)

    # 2. train or tune
    if cfg.stage == "train":
        from raysrec.train.run import fit  # noqa: PLC0415

        train = cfg.train.replace(data=data_location,
                                  storage_path=cfg.train.storage_path or _storage(cfg, "ray_results"))
        t = step(2, f"train {train.model.name} (Ray Train, {train.num_workers} worker(s), <= {train.epochs} epochs)")
        metrics = fit(train)
        model_dir = Path(train.output).resolve()
        summary["train"] = {"test": metrics["test"], "epochs": metrics["epochs"],
                            "examples_per_second": metrics["examples_per_second"], "workers": metrics["workers"]}
        summary["seconds"]["train"] = round(time.time() - t, 1)
    else:
        from raysrec.tuning.search import run_search  # noqa: PLC0415

        assert cfg.tune is not None
        search = cfg.tune.replace(data=data_location,
                                  storage_path=cfg.tune.storage_path or _storage(cfg, "tune"))
        t = step(2, f"tune ({search.num_samples} trials, Ray Tune + Optuna)")
        result = run_search(search)
        model_dir = Path(search.output).resolve() / "best"
        summary["tune"] = {"valid": result["valid"], "test": result["test"], "workers": result["workers"],
                           **{k: result["search"][k] for k in ("trial_id", "params", "num_trials")}}
        summary["seconds"]["tune"] = round(time.time() - t, 1)

    # 3. export
    from raysrec.artifact import copy_model  # noqa: PLC0415

    t = step(3, "export the best model")
    best = Path(cfg.serve.model_dir).resolve()
    copy_model(model_dir, best)
    summary["best"] = str(best)
    if cfg.storage_path:
        summary["best_published"] = redact(publish(best, _storage(cfg, "best")))
    log(f"      {best}" + (f" -> {summary['best_published']}" if cfg.storage_path else ""))
    summary["seconds"]["export"] = round(time.time() - t, 1)
    n = 3

    # offline top-k for every user
    if cfg.recommend is not None:
        from raysrec.serving.batch import recommend  # noqa: PLC0415

        n += 1
        rec_cfg = cfg.recommend.replace(model=_storage(cfg, "best") or cfg.recommend.model, data=data_location)
        t = step(n, f"recommend: top-{rec_cfg.k} for every user (Ray Data) -> {rec_cfg.output}")
        done = recommend(rec_cfg)
        summary["recommend"] = {"output": redact(rec_cfg.output), **{k: done[k] for k in ("rows", "users_per_second")}}
        log(f"      {done['rows']:,} users, {done['users_per_second']:,.0f} users/s -> {rec_cfg.output}")
        summary["seconds"]["recommend"] = round(time.time() - t, 1)

    # deploy and smoke-query
    if cfg.deploy:
        from raysrec.serving.app import run  # noqa: PLC0415

        # with a storage path the replicas load the published copy, wherever they run
        serve_cfg = cfg.serve.replace(model_dir=_storage(cfg, "best") or str(best))
        url = serve_cfg.url
        t = step(n + 1, f"deploy on Ray Serve at {url}")
        run(serve_cfg)
        summary["endpoint"] = url
        summary["seconds"]["deploy"] = round(time.time() - t, 1)
        t = step(n + 2, "smoke query")
        history = sample_history(prep.output)
        body = {"history": history, "k": cfg.smoke_k}
        try:
            answer = post_json(f"{url}/recommend", body)
        except (urllib.error.URLError, OSError) as exc:
            raise PipelineError(f"the endpoint {url} did not answer POST /recommend: {exc}") from None
        if len(answer.get("items", [])) != cfg.smoke_k:
            raise PipelineError(f"POST {url}/recommend returned {answer!r}; expected {cfg.smoke_k} items")
        summary["smoke"] = {"request": body, "answer": answer}
        log(f"      POST {url}/recommend {json.dumps(body)} ->")
        for item in answer["items"]:
            log(f"      {item['item_id']:>8}  {item['score']:8.3f}  {item.get('title') or ''}")
        summary["seconds"]["smoke"] = round(time.time() - t, 1)

    summary["seconds"]["total"] = round(time.time() - started, 1)
    summary["dashboard"] = dashboard_url()
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if cfg.storage_path:
        fs, path = filesystem(_storage(cfg, SUMMARY_FILE))
        with fs.open_output_stream(path) as handle:
            handle.write(json.dumps(summary, indent=2, default=str).encode())
    log(f"\noutputs: {root}  (prepared/, {'model' if cfg.stage == 'train' else 'tune'}/, best/, "
        f"{'recommendations/, ' if cfg.recommend is not None else ''}{SUMMARY_FILE})"
        + (f"; published to {redact(cfg.storage_path)}" if cfg.storage_path else ""))
    if cfg.stage == "train":
        log(f"training curve: {model_dir}/training_curve.png")
    else:
        log(f"tune report: {model_dir.parent}/report.png;  "
            f"TensorBoard: tensorboard --logdir {model_dir.parent}/ray_results")
    log(f"Ray dashboard: {summary['dashboard'] or 'not available in this Ray'}")
    return summary
