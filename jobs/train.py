"""`ray job submit --working-dir . -- python jobs/train.py --data DIR --model sasrec --output DIR`"""

import sys

from raysrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
