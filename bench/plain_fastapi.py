"""The baseline a user would write instead of Ray Serve: one uvicorn process, FastAPI, the same Recommender.

It does what a Serve replica does per request, with the same code (:mod:`raysrec.serving.http`): the same
request models and 422s, the 413 body limit, micro-batching (an asyncio queue collecting up to
``--max-batch-size`` requests or waiting ``--batch-wait-timeout-s``), the forward pass on one worker
thread, the same response. No Ray is started or imported.

    python bench/plain_fastapi.py --model MODEL_DIR [--port 8100] [--max-batch-size 64] [--batch-wait-timeout-s 0.002]
"""


import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def build(model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int = 1,
          max_request_bytes: int = 1 << 20):
    import torch
    from fastapi import Request
    from fastapi.responses import Response

    from raysrec.serving.http import (
        BodyLimit,
        MicroBatcher,
        RecommendRequest,
        RecommendResponse,
        ScoreRequest,
        ScoreResponse,
        error_response,
        make_api,
        parse,
        recommend_response,
        request_schema,
        score_response,
    )
    from raysrec.serving.recommender import Recommender

    torch.set_num_threads(torch_threads)
    rec = Recommender.load(model_dir)
    version = rec.metadata["version"]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    batcher = MicroBatcher(rec.run, pool, max_batch_size, batch_wait_timeout_s)
    api = make_api()
    api.add_middleware(BodyLimit, limit=max_request_bytes)

    @api.post("/recommend", response_model=RecommendResponse, openapi_extra=request_schema(RecommendRequest))
    async def recommend(request: Request) -> Response:
        body = await parse(request, RecommendRequest)
        if problem := rec.user_features_problem(body.user_features):       # as the Serve app does
            return error_response(422, problem)
        return recommend_response(await batcher(body.query()), version)

    @api.post("/score", response_model=ScoreResponse, openapi_extra=request_schema(ScoreRequest))
    async def score(request: Request) -> Response:
        body = await parse(request, ScoreRequest)
        if problem := rec.user_features_problem(body.user_features):
            return error_response(422, problem)
        return score_response(await batcher(body.query()), version)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        answer = await asyncio.get_running_loop().run_in_executor(pool, rec.probe)
        return {"status": "ok", "model": version, "probe": answer.items[0]["item_id"]}

    @api.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    return api


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    args = parser.parse_args()
    app = build(args.model, args.max_batch_size, args.batch_wait_timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
