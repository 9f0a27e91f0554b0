"""The service a user would write by following the FastAPI and onnxruntime docs, for comparison.

A pydantic model per candidate, FastAPI's default JSON encoding, one redis-py GET per key and
`session.run` inside the async route (on the event loop). Same model, same Redis data, same
answers as adscore (without degradation, tenants or metrics):

    python -m benchmarks.naive_service --port 8100 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import redis.asyncio as redis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from feature_client.assembly import assemble_inputs, context_blocks
from feature_client.codec import EntityCodec
from feature_client.store import KeyLayout
from service.repository import ModelRepository


class Candidate(BaseModel):
    ad_id: str


class ScoreRequest(BaseModel):
    user_id: str
    context: dict[str, str | int | float] = {}
    candidates: list[Candidate]


class ScoreResponse(BaseModel):
    scores: list[float]


def build_app(repository: Path, model_name: str, redis_url: str) -> FastAPI:
    repo = ModelRepository(repository)
    metadata = repo.read_metadata(model_name, repo.active_version(model_name))
    spec = metadata.spec()
    session = ort.InferenceSession(
        str(repo.model_path(model_name, metadata.version)), providers=["CPUExecutionProvider"]
    )
    user_codec, ad_codec = EntityCodec(spec, "user"), EntityCodec(spec, "ad")
    keys = KeyLayout("adscore")
    client = redis.Redis.from_url(redis_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/score")
    async def score(request: ScoreRequest) -> ScoreResponse:
        user = cast(bytes | None, await client.get(keys.user(request.user_id)))
        ads = [cast(bytes | None, await client.get(keys.ad(c.ad_id))) for c in request.candidates]
        user_rows = user_codec.decode([user])
        ad_rows = ad_codec.decode(ads)
        context_dense, context_ids = context_blocks(spec, request.context)
        inputs = assemble_inputs(
            len(ads),
            [user_rows.dense, ad_rows.dense, context_dense],
            [user_rows.ids, ad_rows.ids, context_ids],
        )
        (logits,) = session.run(["logit"], {"dense": inputs.dense, "ids": inputs.ids})
        scores = metadata.calibration.apply(np.asarray(logits).reshape(-1))
        return ScoreResponse(scores=scores.tolist())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--model-repository", type=Path, default=Path("demo/model_repository"))
    parser.add_argument("--model-name", default="pcvr")
    args = parser.parse_args()
    app = build_app(args.model_repository, args.model_name, args.redis_url)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
