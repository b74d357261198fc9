"""`ray job submit --working-dir . -- python jobs/tune.py ...` (same flags as `raysrec tune`)."""

import sys

from raysrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
