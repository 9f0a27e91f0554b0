"""CPU per request of laying out stored feature values as model inputs, one request at a time
against requests laid out together as one batch (feature_client/batch_layout.py), for the demo
model's spec, by candidates per request and requests per batch.

python -m benchmarks.batch_layout
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from feature_client.assembly import context_blocks
from feature_client.batch_layout import PendingLayout, lay_out
from feature_client.codec import EntityCodec
from service.cli import DEMO_REPOSITORY
from service.repository import ModelRepository

CONTEXT: dict[str, str | int | float] = {"device": "ios", "country": "US", "hour": 20}


def stored_values(codec: EntityCodec, count: int, rng: np.random.Generator) -> list[bytes]:
    dense = rng.standard_normal((count, len(codec.spec.dense(codec.source)))).astype(np.float32)
    categorical = len(codec.spec.categorical(codec.source))
    return codec.encode(dense, rng.integers(0, 100, (count, categorical)).astype(np.int32))


def cpu_per_request(batches: list[list[PendingLayout]], seconds: float) -> float:
    """µs of CPU per request, laying out `batches` over and over for about `seconds`."""
    requests = 0
    started, end = time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        for batch in batches:
            lay_out(batch)
            requests += len(batch)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEMO_REPOSITORY)
    parser.add_argument("--model", default="pcvr")
    parser.add_argument("--candidates", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch-rows", type=int, default=256, help="max_batch_rows")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()

    repository = ModelRepository(args.repository)
    spec = repository.read_metadata(args.model, repository.active_version(args.model)).spec()
    users, ads = EntityCodec(spec, "user"), EntityCodec(spec, "ad")
    rng = np.random.default_rng(0)
    user_values, ad_values = stored_values(users, 1_000, rng), stored_values(ads, 20_000, rng)
    context = context_blocks(spec, CONTEXT)
    print("| candidates | requests per batch | µs of CPU per request | x one at a time |")
    print("|---|---|---|---|")
    for candidates in args.candidates:
        requests = [
            PendingLayout(
                users,
                ads,
                user_values[int(rng.integers(len(user_values)))],
                list(rng.choice(np.asarray(ad_values, dtype=object), candidates)),
                context,
            )
            for _ in range(64)
        ]
        alone = cpu_per_request([[r] for r in requests], args.seconds)
        print(f"| {candidates} | 1 | {alone:.1f} | 1.00 |")
        for size in (2, 4, 8, 16, 32):
            if size * candidates > args.batch_rows:
                break
            batches = [requests[i : i + size] for i in range(0, len(requests), size)]
            together = cpu_per_request(batches, args.seconds)
            print(f"| {candidates} | {size} | {together:.1f} | {alone / together:.2f} |")


if __name__ == "__main__":
    main()
