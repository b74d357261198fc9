"""The whole chain as one Ray job:

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/pipeline.yaml [--storage-path s3://...]

prepare -> train (or tune) -> export best -> deploy on the cluster's Serve -> smoke query. The
endpoint keeps serving after the job ends (`serve status`, `serve shutdown`).
"""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    entry(["pipeline", *sys.argv[1:]])
