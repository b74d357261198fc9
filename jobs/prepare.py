"""`ray job submit --working-dir . -- python jobs/prepare.py --input ... --output ...`"""

import sys

from raysrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
