"""`ray job submit --working-dir . -- python jobs/train.py --data DIR --model sasrec --output DIR`"""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
