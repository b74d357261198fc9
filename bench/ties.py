"""Did the tie defect of the chunked full ranking change any reported metric? Ranks a trained model's valid and
test targets twice: with today's ranks (fp64-accumulated scores, the target's score from its competitors'
matmul) and with the rule before the fix (fp32 matmul for competitors, an element-wise product and sum for the
target), and prints how many rows' ranks differ and both NDCG@10s.

    python bench/ties.py --data runs/ml100k --model runs/ml100k-model
"""

from __future__ import annotations

import argparse

import torch


def ranks_before_the_fix(hidden, table, targets, history, chunk_items):
    """The chunked ranks as they were: what the reported tables up to now were computed with."""
    hidden, table = hidden.float(), table.float()
    rows = torch.arange(len(targets))
    target_score = (hidden * table[targets]).sum(-1, keepdim=True)
    ranks = torch.zeros(len(targets), dtype=torch.long)
    for start in range(0, table.shape[0], chunk_items):
        scores = hidden @ table[start:start + chunk_items].T
        width = scores.shape[1]
        competes = torch.ones_like(scores, dtype=torch.bool)
        if start == 0:
            competes[:, 0] = False
        local = history - start
        inside = (history > 0) & (local >= 0) & (local < width)
        r, c = torch.nonzero(inside, as_tuple=True)
        competes[r, local[r, c]] = False
        here = (targets >= start) & (targets < start + width)
        competes[rows[here], targets[here] - start] = False
        ranks += ((scores >= target_score) & competes).sum(1)
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the prepared folder the model was trained on")
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--chunk-items", type=int, default=65536)
    args = parser.parse_args()

    from raysrec.data.examples import evaluation_examples, iterate_batches
    from raysrec.evaluation import CheckpointEvaluator, full_ranking_ranks_chunked, metric_sums

    evaluator = CheckpointEvaluator(args.data, args.model)
    model = evaluator.model
    for split in ("valid", "test"):
        examples = evaluation_examples(evaluator.seqs, model.cfg.max_length, split)
        now, before = [], []
        with torch.no_grad():
            for batch in iterate_batches(examples, 256, with_history=True):
                hidden, targets = model(batch).user, batch["target_ids"][:, -1]
                table = model.item_rows()
                now.append(full_ranking_ranks_chunked(hidden, table, targets, batch["history"], None, args.chunk_items))
                before.append(ranks_before_the_fix(hidden, table, targets, batch["history"], args.chunk_items))
        now_t, before_t = torch.cat(now), torch.cat(before)
        n = len(now_t)
        print(f"{split}: {n} rows, ranks differ in {int((now_t != before_t).sum())}; NDCG@10 now "
              f"{metric_sums(now_t, [10])['ndcg@10'] / n:.6f}, before the fix {metric_sums(before_t, [10])['ndcg@10'] / n:.6f}")


if __name__ == "__main__":
    main()
