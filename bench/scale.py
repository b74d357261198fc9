"""Benchmark: raysrec at catalogue and log scale on one machine (time and peak memory per stage).

Per size (events : items, users = events / 50):

1. **generate**: the synthetic log (``raysrec synth``'s generator, written in pieces of whole users);
2. **prepare**: ``raysrec prepare`` (Ray Data) on it;
3. **train**: per loss, training steps of the training loop (raysrec's model, loss, optimizer and batches,
   one worker holding the whole log, as ``raysrec train`` with one worker): examples/s over
   ``--train-seconds`` (at least 2 steps) after 3 warm-up steps (1 when a step takes more than 5 s).
   ``ce`` is the chunked full softmax, ``ce-plain`` the whole logit matrix (only where it fits),
   ``sampled`` (item_grads auto: sparse) and ``gbce``;
4. **evaluate**: full-ranking validation (chunked over the catalogue, history masked) of 2,000 users:
   users/s;
5. with ``--epoch``: one whole epoch through ``raysrec train`` (Ray Train, ``--epoch-loss``, sampled unless
   told, metrics on 10,000 users) and, with ``--serve``, ``raysrec serve`` on the trained model, exact and
   HNSW: QPS and p50/p99 at concurrency 1 and 32 (``bench/loadgen.py``) and the recall@10 ``GET /model`` reports.

Every stage runs in its own process; "peak GiB" is the machine's used memory (MemTotal - MemAvailable,
so Ray's workers and object store count) above what it was when the stage started, sampled every 0.5 s.

    python bench/scale.py [--sizes 1m:10k 10m:100k 50m:1m] [--losses ce ce-plain sampled gbce]
                          [--epoch 50m:1m [--epoch-loss gbce] [--epoch-lr 0.001]] [--serve] [--workdir DIR]
    python bench/scale.py --serve-model MODEL_DIR [--ef-search 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.jsonl"
PLAIN_CE_MAX_ITEMS = 100_000      # the (positions x items) logits and their gradient: 10 GB over baseline at 100k


def number(text: str) -> int:
    text = text.lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def used_bytes() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (a local Ray's raylet and workers included)."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)], rss[int(entry)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid, size in rss.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        total += size if p == root else 0
    return total


def measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 6 * 3600) -> dict:
    """Run ``cmd`` (output to ``log``): wall seconds, exit code, and the peaks of the machine's used memory above
    the start (``peak_gib``) and of the command's process tree's resident memory (``peak_rss_gib``)."""
    base, peak, peak_rss = used_bytes(), 0, 0
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        while proc.poll() is None:
            peak, peak_rss = max(peak, used_bytes() - base), max(peak_rss, tree_rss(proc.pid))
            if time.time() - started > timeout:
                proc.kill()
            time.sleep(0.5)
    return {"seconds": round(time.time() - started, 1), "peak_gib": round(peak / 2**30, 2),
            "peak_rss_gib": round(peak_rss / 2**30, 2), "rc": proc.returncode}


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result in {log}:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------ the training steps (own process)
def steps_only(data_dir: str, loss: str, seconds: float, eval_users: int) -> None:
    import numpy as np
    import torch

    from raysrec.data.examples import evaluation_examples, iterate_batches, training_examples
    from raysrec.data.storage import PreparedData
    from raysrec.evaluation import evaluate
    from raysrec.models import losses
    from raysrec.models.sequential import ModelConfig, build_model, cpu_training_matmuls
    from raysrec.train.config import TrainConfig
    from raysrec.train.loop import compute_loss
    from raysrec.train.optim import build_optimizer, sparse_item_grads

    torch.set_num_threads(os.cpu_count() or 1)
    data = PreparedData.load(data_dir)
    seqs = data.read()
    examples = training_examples(seqs, 50)
    cfg = TrainConfig(data=data_dir, loss="ce" if loss.startswith("ce") else loss,
                      ce_chunk_items=0 if loss == "ce-plain" else 8192, model=ModelConfig(num_items=data.num_items))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    sparse = sparse_item_grads(cfg.item_grads, cfg.loss, cfg.weight_decay, use_gpu=False)
    optimizer = build_optimizer(model, model.item_emb, cfg.lr, 0.0, sparse)
    pop = torch.tensor(data.item_popularity(), dtype=torch.float64) + 1.0
    pop[0] = 0.0
    log_q = (pop / pop.sum()).log().float() if cfg.loss == "sampled" else None
    generator = torch.Generator().manual_seed(0)
    kernel = losses.ce_kernel(cfg.ce_kernel, torch.device("cpu"))
    done, positions, spent, steps, warm_up = 0, 0, 0.0, 0, 3
    for batch in iterate_batches(examples, cfg.batch_size, shuffle=True):
        started = time.perf_counter()
        with cpu_training_matmuls(torch.device("cpu"), cfg.bf16):      # as the training loop runs its steps
            out = compute_loss(model, batch, cfg, log_q, generator, None, kernel)
            optimizer.zero_grad(set_to_none=True)
            out.backward()
            optimizer.step()
        done += 1
        if done == 1 and time.perf_counter() - started > 5:
            warm_up = 1                     # a step of a minute (full CE at 1M items) needs no more warming up
        if done > warm_up:
            spent += time.perf_counter() - started
            positions += int((batch["target_ids"] > 0).sum())
            steps += 1
        if spent >= seconds and steps >= 2:
            break
    result = {"loss": loss, "item_grads": "sparse" if sparse else "dense", "steps": steps,
              "examples_per_second": round(positions / spent, 1), "step_ms": round(1e3 * spent / steps, 1),
              "users": len(seqs), "windows": len(examples), "training_positions": int(
                  np.maximum(seqs.positions().train_end.astype(np.int64) - 1, 0).sum())}
    if eval_users:
        valid = evaluation_examples(seqs, 50, "valid").sample(eval_users, 0)
        started = time.perf_counter()
        evaluate(model, valid, ks=[10], batch_size=256, device=torch.device("cpu"), chunk_items=cfg.eval_chunk_items)
        result["eval_users_per_second"] = round(len(valid) / (time.perf_counter() - started), 1)
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------ serving (raysrec serve, loadgen)
def serve_figures(model_dir: Path, retrieval: str, ef_search: int, workdir: Path, seconds: float) -> dict:
    sys.path.insert(0, str(HERE))
    import loadgen  # noqa: PLC0415  (bench/loadgen.py)
    from serve_load import free_port, wait_for  # noqa: PLC0415

    from raysrec.serving.recommender import Recommender  # noqa: PLC0415  (the item ids the model knows)

    port = free_port()
    log = workdir / f"serve-{retrieval}.log"
    cmd = ["raysrec", "serve", "--model", str(model_dir), "--port", str(port), "--retrieval", retrieval,
           "--ann-ef-search", str(ef_search), "--num-cpus", str(os.cpu_count())]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.time()
        wait_for(url, timeout=1800)
        ready_s = time.time() - started
        with urllib.request.urlopen(f"{url}/model", timeout=10) as response:
            info = json.loads(response.read())
        ids = Recommender.load(model_dir).item_ids.tolist()
        loadgen.run(url, ids, 4, 200, 10)                                             # warm-up
        row = {"retrieval": retrieval, "ef_search": ef_search if retrieval == "hnsw" else None,
               "ready_seconds": round(ready_s, 1), "recall@10": info.get("retrieval", {}).get("recall@10")}
        for c in (1, 32):
            r = loadgen.run(url, ids, c, 100_000, seconds)
            row[f"c{c}"] = {k: round(r[k], 2) if isinstance(r[k], float) else r[k] for k in ("qps", "p50", "p99", "ok", "failed")}
        return row
    finally:
        server.send_signal(2)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()


def record(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    sizes = list(dict.fromkeys(r["size"] for r in rows if "size" in r))
    latest = {}
    for r in rows:                                   # the last measurement of each (size, stage, loss)
        latest[(r.get("size"), r["stage"], r.get("loss"), r.get("retrieval"))] = r
    print("\n| events : items | users | generate s / GiB | prepare s / GiB | evaluation users/s |")
    print("| --- | --- | --- | --- | --- |")
    for size in sizes:
        gen, prep = latest.get((size, "generate", None, None), {}), latest.get((size, "prepare", None, None), {})
        ev = latest.get((size, "train", "sampled", None), {})
        users = gen.get("users", prep.get("users", 0))   # every stage's row has them; sampled may not have run
        print(f"| {size} | {users:,} | {gen.get('seconds')} / {gen.get('peak_gib')} | {prep.get('seconds')} / "
              f"{prep.get('peak_gib')} | {ev.get('eval_users_per_second', '')} |")
    losses = list(dict.fromkeys(r["loss"] for r in rows if r["stage"] == "train"))
    print("\ntraining examples/s (peak GiB over the start, process tree RSS GiB)\n")
    print("| events : items | " + " | ".join(losses) + " |")
    print("| --- |" + " --- |" * len(losses))
    for size in sizes:
        cells = []
        for loss in losses:
            r = latest.get((size, "train", loss, None), {})
            cells.append(r.get("skipped", "-") if "examples_per_second" not in r else
                         f"{r['examples_per_second']:,.0f} ({r['peak_gib']}, {r.get('peak_rss_gib', '-')})")
        print(f"| {size} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["stage"] in ("epoch", "serve"):
            print(json.dumps(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1m:10k", "10m:100k", "50m:1m"], help="EVENTS:ITEMS")
    parser.add_argument("--losses", nargs="+", default=["ce", "ce-plain", "sampled", "gbce"],
                        choices=["ce", "ce-plain", "sampled", "gbce", "bce"])
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--eval-users", type=int, default=2000)
    parser.add_argument("--epoch", nargs="*", default=[], help="sizes to train one whole epoch on")
    parser.add_argument("--epoch-loss", default="sampled", choices=["auto", "ce", "sampled", "bce", "gbce"],
                        help="the loss of the --epoch run")
    parser.add_argument("--epoch-lr", type=float, help="the learning rate of the --epoch run (default: train's)")
    parser.add_argument("--serve", action="store_true", help="after --epoch: Serve exact vs HNSW on its model")
    parser.add_argument("--serve-model", help="only measure Serve (exact vs HNSW) on this trained model folder")
    parser.add_argument("--ef-search", type=int, default=512)
    parser.add_argument("--serve-seconds", type=float, default=20.0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raysrec-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated and prepared data")
    parser.add_argument("--table-only", action="store_true", help="print the tables of bench/results/scale.jsonl")
    parser.add_argument("--steps-only", nargs=4, metavar=("DATA", "LOSS", "SECONDS", "EVAL_USERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps_only:
        data, loss, seconds, eval_users = args.steps_only
        steps_only(data, loss, float(seconds), int(eval_users))
        return
    if args.table_only:
        table()
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.serve_model:
        for retrieval in ("exact", "hnsw"):
            record({"model": args.serve_model, "stage": "serve",
                    **serve_figures(Path(args.serve_model), retrieval, args.ef_search, work, args.serve_seconds)})
        return
    for size in args.sizes:
        events, items = (number(x) for x in size.split(":"))
        folder = work / size.replace(":", "-")
        folder.mkdir(exist_ok=True)
        raw, prepared = folder / "raw", folder / "prepared"
        base = {"size": size, "events": events, "items": items, "users": events // 50}
        gen = measured([sys.executable, "-m", "raysrec.cli", "synth", "-o", str(raw), "--num-events", str(events),
                        "--num-items", str(items), "--num-users", str(events // 50)], folder / "generate.log")
        record({**base, "stage": "generate", **gen})
        prep = measured(["raysrec", "prepare", "-i", str(raw / "interactions.parquet"), "-o", str(prepared),
                         "--overwrite"], folder / "prepare.log")
        record({**base, "stage": "prepare", **prep})
        for loss in args.losses:
            if loss == "ce-plain" and items > PLAIN_CE_MAX_ITEMS:
                record({**base, "stage": "train", "loss": loss, "skipped": "the logit matrix does not fit"})
                continue
            log = folder / f"train-{loss}.log"
            run = measured([sys.executable, __file__, "--steps-only", str(prepared), loss, str(args.train_seconds),
                            str(args.eval_users if loss == "sampled" else 0)], log)
            record({**base, "stage": "train", **run, **(last_json(log) if run["rc"] == 0 else {})})
        if size in args.epoch:
            model = folder / f"model-{args.epoch_loss}"
            log = folder / f"epoch-{args.epoch_loss}.log"
            lr = ["--lr", str(args.epoch_lr)] if args.epoch_lr else []
            run = measured(["raysrec", "train", "--data", str(prepared), "-o", str(model), "--loss", args.epoch_loss,
                            *lr, "--epochs", "1", "--eval-max-users", "10000"], log)
            metrics = json.loads((model / "metrics.json").read_text()) if run["rc"] == 0 else {}
            record({**base, "stage": "epoch", "loss": args.epoch_loss, "lr": args.epoch_lr, **run,
                    "examples_per_second": metrics.get("examples_per_second"),
                    "train_seconds": metrics.get("train_seconds"), "test": metrics.get("test")})
            if args.serve and run["rc"] == 0:
                for retrieval in ("exact", "hnsw"):
                    record({**base, "stage": "serve", **serve_figures(model, retrieval, args.ef_search, folder,
                                                                      args.serve_seconds)})
        if not args.keep:
            import shutil  # noqa: PLC0415

            shutil.rmtree(raw, ignore_errors=True)
    table()


if __name__ == "__main__":
    main()
