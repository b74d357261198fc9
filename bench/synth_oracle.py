"""Benchmark: how much better *can* a model with timestamps do on the synthetic log? (Bayes-optimal bound)

The synthetic generator (:mod:`raysrec.data.synth`) is a known probabilistic program, so the best
possible NDCG@10 on its leave-one-out test targets can be computed exactly: an oracle that knows
every latent variable (the user's tastes, the session's category, the walk's anchor) ranks items by
the true probability of the next event, with the history masked as in the evaluation.

Two oracles differ only in what timestamps tell a model: whether the target starts a new session
(``knows gap``) or only the prior ``1 / mean_session_length`` of that (``blind``, like SASRec,
which sees no time). Their ratio is the ceiling of any longshort / sasrec NDCG@10 ratio on that
log: the rest of the information is available to both. Measured ratios, when
``bench/results/accuracy.jsonl`` has synthetic runs of both models, are printed next to it.

    python bench/synth_oracle.py            # the default log and a few variants, ~10 s
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from raysrec.data.synth import SynthConfig, oracle_ndcg, simulate

VARIANTS = {
    "default (mean session 8, p_long 0.7)": {},
    "mean session 3": {"mean_session_length": 3.0},
    "mean session 2, p_long 0.9": {"mean_session_length": 2.0, "p_long": 0.9},
    "one taste per user, mean session 4": {"tastes_per_user": 1, "mean_session_length": 4.0},
    "off-session share 0.4": {"p_off_session": 0.4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results/accuracy.jsonl")
    args = parser.parse_args()

    print("| synthetic log | session-start targets | oracle knows gap | oracle blind | ceiling ratio | "
          "at session starts (gap / blind) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, overrides in VARIANTS.items():
        cfg = SynthConfig(**overrides)
        sim = simulate(cfg)
        gap, blind = oracle_ndcg(cfg, sim), oracle_ndcg(cfg, sim, knows_gap=False)
        print(f"| {name} | {gap['session_start_share']:.1%} | {gap['expected']:.4f} | {blind['expected']:.4f} | "
              f"{gap['expected'] / blind['expected']:.3f}x | "
              f"{gap['expected_session_start']:.4f} / {blind['expected_session_start']:.4f} |")

    results = Path(args.results)
    if results.is_file():
        frame = pd.read_json(results, lines=True)
        synth = frame[(frame.data == "synthetic") & (frame["loss"] == "ce")].groupby("model")["test_ndcg@10"].mean()
        if {"sasrec", "longshort"} <= set(synth.index):
            print(f"\nmeasured on the synthetic default ({args.results}): sasrec {synth['sasrec']:.4f}, "
                  f"longshort {synth['longshort']:.4f}, ratio {synth['longshort'] / synth['sasrec']:.3f}x")


if __name__ == "__main__":
    main()
