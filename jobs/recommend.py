"""`ray job submit --working-dir . -- python jobs/recommend.py --model s3://.../best --data s3://.../prepared -o s3://.../recs`

Offline top-k for every user (Ray Data batch inference); same flags as `raysrec recommend`.
"""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    entry(["recommend", *sys.argv[1:]])
