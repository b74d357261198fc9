"""Deploy a model on the cluster's Serve and return:

    ray job submit --working-dir . -- python jobs/deploy.py --model DIR [--replicas N] [--host 0.0.0.0]

Same flags as `raysrec serve`; ``--detach`` is implied, so the job ends once the application is
running and the endpoint keeps serving (`serve status` shows it, `serve shutdown` removes it).
"""

import sys

from raysrec.cli import entry

if __name__ == "__main__":
    argv = sys.argv[1:]
    entry(["serve", *argv, *([] if "--detach" in argv else ["--detach"])])
