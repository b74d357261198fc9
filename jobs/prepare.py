"""`ray job submit --working-dir . -- python jobs/prepare.py --input ... --output ...`"""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    entry(["prepare", *sys.argv[1:]])
