"""`ray job submit --working-dir . -- python jobs/tune.py ...` (same flags as `raysrec tune`)."""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    entry(["tune", *sys.argv[1:]])
