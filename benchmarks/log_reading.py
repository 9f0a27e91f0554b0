"""How fast the prediction log reads back: rows/s of `read_prediction_log` on a written log.

    python -m benchmarks.log_reading --rows 1000000 --candidates 100 10

Writes `--rows` logged candidate rows (requests of `--candidates` rows each, the demo model's
input width) with the service's own JsonLinesSink into a temporary folder, then reads them with
the reader `adscore train --from-log` and `adscore evaluate --log` use, with and without the
model inputs kept. One line per request size: file size, seconds, rows/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from batch_scoring.prediction_log import read_prediction_log
from service.prediction_record import PredictionRecord
from service.prediction_sinks import JsonLinesSink

DENSE, IDS = 6, 11  # the demo model's inputs
WRITE_BATCH = 256


def write_log(folder: Path, rows: int, candidates: int) -> None:
    rng = np.random.default_rng(0)
    sink = JsonLinesSink(folder, max_file_bytes=64 << 20, rotate_seconds=3600)
    lines: list[bytes] = []
    for r in range(rows // candidates):
        record = PredictionRecord(
            time=1_764_000_000.0 + r,
            request_id=f"r{r}",
            tenant=None,
            model="pcvr",
            model_version=1,
            role="active",
            spec="0" * 16,
            user_id=f"u{r % 10_000}",
            ad_ids=[f"a{a}" for a in rng.integers(0, 50_000, candidates)],
            context={"device": "ios", "hour": r % 24},
            dense=rng.normal(size=(candidates, DENSE)).astype(np.float32),
            ids=rng.integers(0, 8_192, size=(candidates, IDS)),
            scores=rng.random(candidates),
            degraded=False,
        )
        lines.append(record.encode())
        if len(lines) == WRITE_BATCH:
            sink.write(lines, WRITE_BATCH * candidates)
            lines = []
    if lines:
        sink.write(lines, len(lines) * candidates)
    sink.close()


def measure(rows: int, candidates: int) -> list[dict[str, float]]:
    """Write a log of `rows` rows in requests of `candidates`, read it with and without inputs."""
    results = []
    with tempfile.TemporaryDirectory(prefix="adscore-log-") as tmp:
        folder = Path(tmp)
        write_log(folder, rows, candidates)
        size = sum(p.stat().st_size for p in folder.iterdir())
        for keep_inputs in (True, False):
            started = time.perf_counter()
            logged, _ = read_prediction_log([folder], inputs=keep_inputs, progress=False)
            seconds = time.perf_counter() - started
            results.append(
                {
                    "candidates": candidates,
                    "rows": len(logged),
                    "bytes": size,
                    "inputs_kept": keep_inputs,
                    "seconds": seconds,
                    "rows_per_second": len(logged) / seconds,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 10])
    args = parser.parse_args()
    for candidates in args.candidates:
        for r in measure(args.rows, candidates):
            inputs = "kept" if r["inputs_kept"] else "skipped"
            print(
                f"{candidates} candidates per request, {r['rows']:,.0f} rows, "
                f"{r['bytes'] / 2**20:.0f} MiB, inputs {inputs}: "
                f"{r['seconds']:.1f} s, {r['rows_per_second']:,.0f} rows/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
