"""Where a server process spends its time, from a py-spy ``raw`` (folded) profile: the share of samples in
which each function appears (inclusive) and on top (self), for the functions that matter most.

    python bench/profile_top.py PROFILE.folded [--top 25] [--match raysrec,fastapi,serve]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def load(path: str) -> tuple[Counter, Counter, int]:
    inclusive, self_time, total = Counter(), Counter(), 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r" \(.*?/(site-packages|lib/python3\.\d+)/", " (", f) for f in stack.split(";")]
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        self_time[frames[-1]] += n
    return inclusive, self_time, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only frames containing one of these (comma-separated)")
    args = parser.parse_args()
    inclusive, self_time, total = load(args.profile)
    keys = [k.strip() for k in args.match.split(",") if k.strip()]
    print(f"{total} samples")
    print("| inclusive % | self % | function |")
    print("| --- | --- | --- |")
    for frame, n in inclusive.most_common():
        if keys and not any(k in frame for k in keys):
            continue
        print(f"| {100 * n / total:.1f} | {100 * self_time[frame] / total:.1f} | `{frame[:140]}` |")
        args.top -= 1
        if args.top <= 0:
            break


if __name__ == "__main__":
    main()
