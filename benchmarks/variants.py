"""Cheaper DCN-v2 variants against the fp32 full-rank model, on one world and one test set.

    python -m benchmarks.variants                 # adscore train's sizes (1M rows), ~20 min
    python -m benchmarks.variants --quick         # a smoke run, under a minute
    python -m benchmarks.variants --repository model_repository --name pcvr --versions 1 2 3

Trains the fp32 full-rank baseline, low-rank variants and one with a narrower deep tower on
the same rows; publishes each, its int8 export, and both again as request-once exports (the
user and context part of the first layers computed once per request), as ordinary model
versions through `adscore train`'s own code; then times all of them with onnxruntime on one
thread on one request of 256 candidates (one user, one context), interleaved round by round so
that a noisy neighbour slows every variant alike. Quality comes
from each version's metadata.json: held-out AUC, log loss and calibration error on the very
same test rows. With --versions it benchmarks versions published earlier (by `adscore train`,
on one plan) instead of training. Writes variants.md and variants.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tqdm import tqdm

from feature_client.assembly import ModelInputs
from models.export import SERVING_BATCH, open_session
from service.model_metadata import ModelMetadata
from service.repository import ModelRepository

RESULTS = Path(__file__).resolve().parent / "results"
ARCHITECTURES: tuple[tuple[int | None, tuple[int, ...] | None], ...] = (
    (None, None),
    (64, None),
    (32, None),
    (32, (128, 64)),
    (16, (32, 16)),
)
"""(cross rank, deep tower widths) trained; None: full rank, the default tower. Each is
published in fp32 and int8, flat and request-once. The narrower towers are there because on
this model the deep tower, not the cross layers, holds half the multiply-adds."""
TARGETS = ((2.0, 0.001, 0.002), (3.5, 0.003, None))
"""(speed-up, largest AUC loss, largest |ECE change|) of the issue's two targets."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One published version under test."""

    label: str
    version: int
    metadata: ModelMetadata
    path: Path


def _train_and_publish(args: argparse.Namespace, repository: ModelRepository) -> list[int]:
    """Train each rank on one shared data set; publish it and its int8 export."""
    from models.dcn import DCNConfig
    from models.pipeline import TrainingPlan, build_data, publish_variants, run_training
    from models.synthetic import SyntheticConfig
    from models.train import FitConfig

    plan = TrainingPlan(
        rows=args.rows,
        validation_rows=args.validation_rows,
        calibration_rows=args.calibration_rows,
        test_rows=args.test_rows,
        world=SyntheticConfig(**_world(args)),
        fit=FitConfig(max_epochs=args.epochs),
        threads=args.threads,
    )
    data = build_data(plan)
    versions = []
    for rank, mlp in ARCHITECTURES:
        dcn = DCNConfig(cross_rank=rank, mlp_layers=mlp or DCNConfig().mlp_layers)
        print(f"training DCN-v2, cross rank {rank or 'full'}, deep tower {dcn.mlp_layers}")
        trained = run_training(
            dataclasses.replace(plan, dcn=dcn), data=data, progress=not args.quiet
        )
        for request_once in (False, True):
            published = publish_variants(
                trained, repository, args.name, ("none", "int8"), request_once=request_once
            )
            versions += [metadata.version for metadata in published]
    for seed in range(1, args.noise_seeds + 1):
        print(f"training the baseline again with seed {seed} (training noise)", flush=True)
        reseeded = dataclasses.replace(
            plan, init_seed=seed, fit=dataclasses.replace(plan.fit, seed=seed)
        )
        trained = run_training(reseeded, data=data, progress=not args.quiet)
        (metadata,) = publish_variants(trained, repository, args.name, ["none"])
        versions.append(metadata.version)
    return versions


def _world(args: argparse.Namespace) -> dict[str, int]:
    world = {"users": args.users, "ads": args.ads}
    if args.quick:  # small tables too, as in the tests' session model
        world |= {"advertisers": 300, "user_hash_buckets": 4_096, "ad_hash_buckets": 8_192,
                  "advertiser_hash_buckets": 512}  # fmt: skip
    return world


def _load(
    repository: ModelRepository, name: str, versions: Sequence[int], *, speed_only: bool = False
) -> list[Variant]:
    variants = []
    for version in versions:
        metadata = repository.read_metadata(name, version)
        variants.append(
            Variant(metadata.architecture, version, metadata, repository.model_path(name, version))
        )
    if speed_only:  # timing alone: no quality delta to keep meaningful
        return variants
    baseline = variants[0].metadata
    for variant in variants[1:]:
        # Quality deltas are only meaningful on the same world and the same test rows.
        same = ("rows", "test_rows", "seed", "missing_entity_rate")
        if variant.metadata.dataset != baseline.dataset or any(
            variant.metadata.training.get(k) != baseline.training.get(k) for k in same
        ):
            raise SystemExit(
                f"error: version {variant.version} was not trained on the baseline's data"
            )
    return variants


def _timing_inputs(variants: list[Variant], batch: int) -> ModelInputs:
    """One request of `batch` candidates from the baseline's synthetic world: rows drawn like
    its test rows, all with the first row's user and context, as the service lays them out."""
    from models.pipeline import build_rows
    from models.request_once import request_shaped
    from models.synthetic import world_for_model

    metadata = variants[0].metadata
    world = world_for_model(metadata.dataset, metadata.spec().fingerprint())
    rate = float(metadata.training.get("missing_entity_rate", 0.01))
    return request_shaped(build_rows(world, batch, 99, rate).inputs, metadata.spec(), batch)


def measure_speed(
    variants: list[Variant], inputs: ModelInputs, *, rounds: int, calls: int, progress: bool
) -> list[dict[str, float]]:
    """Median seconds per call of each variant, and its speed-up over the first.

    Every round runs `calls` calls of each variant, in an order rotated each round; the
    speed-up is the median over rounds of the per-round ratio, so drift in the machine's speed
    (a neighbour's job starting) cancels out.
    """
    sessions = [open_session(v.path, threads=1) for v in variants]
    feed = inputs.as_feed()
    for session in sessions:  # warm-up: first calls allocate and pack weights
        for _ in range(5):
            session.run(None, feed)
    per_round: list[list[float]] = [[] for _ in variants]
    for round_index in tqdm(range(rounds), desc="timing", unit="round", disable=not progress):
        order = list(range(len(variants)))
        shift = round_index % len(order)
        for i in order[shift:] + order[:shift]:
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                sessions[i].run(None, feed)
                times.append(time.perf_counter() - started)
            per_round[i].append(statistics.median(times))
    results = []
    for medians in per_round:
        seconds = statistics.median(medians)
        ratios = [b / m for b, m in zip(per_round[0], medians, strict=True)]
        results.append(
            {
                "seconds_per_call": seconds,
                "candidates_per_second": len(inputs) / seconds,
                "speedup": statistics.median(ratios),
            }
        )
    return results


def _row(variant: Variant, baseline: Variant, speed: dict[str, float]) -> dict[str, Any]:
    m, b = variant.metadata.metrics, baseline.metadata.metrics
    variant_info = variant.metadata.training.get("variant", {})
    return {
        "variant": variant.label,
        "version": variant.version,
        "cross_rank": variant_info.get("cross_rank"),
        "mlp_layers": variant_info.get("mlp_layers"),
        "quantization": variant_info.get("quantization", "none"),
        "request_once": bool(variant_info.get("request_once", False)),
        "init_seed": variant.metadata.training.get("init_seed", 0),
        "auc": m["auc"],
        "auc_delta": m["auc"] - b["auc"],
        "log_loss": m["log_loss"],
        "calibration_error": m["calibration_error"],
        "calibration_error_delta": m["calibration_error"] - b["calibration_error"],
        "oracle_auc": m["oracle_auc"],
        "int8_vs_fp32_mean_abs_probability_diff": m.get("int8_vs_fp32_mean_abs_probability_diff"),
        "int8_vs_fp32_max_abs_probability_diff": m.get("int8_vs_fp32_max_abs_probability_diff"),
        "batch_parity_max_abs_probability_diff": (
            variant.metadata.parity["max_abs_probability_diff"]
            if variant_info.get("quantization") == "int8"
            else None
        ),
        "multiply_adds": _multiply_adds(variant.metadata),
        "size_mb": variant.path.stat().st_size / 2**20,
        **speed,
    }


def _multiply_adds(metadata: ModelMetadata) -> int:
    """Per candidate; a request-once variant's request part is left out (done once)."""
    from models.dcn import DCNConfig
    from models.request_once import REQUEST_SOURCES

    architecture = dict(metadata.training["architecture"])
    architecture["mlp_layers"] = tuple(architecture["mlp_layers"])
    config = DCNConfig(**architecture)
    spec = metadata.spec()
    total = config.multiply_adds(len(spec.categorical_names), len(spec.dense_names))
    if not metadata.training.get("variant", {}).get("request_once"):
        return total
    request_width = sum(
        config.embedding_dim for f in spec.categorical() if f.source in REQUEST_SOURCES
    ) + sum(1 for f in spec.dense() if f.source in REQUEST_SOURCES)
    width = len(spec.categorical_names) * config.embedding_dim + len(spec.dense_names)
    first_cross = config.cross_rank or width
    return total - request_width * (first_cross + config.mlp_layers[0])


def target_lines(rows: list[dict[str, Any]], noise: float | None) -> list[str]:
    lines = []
    for speedup, auc_loss, ece_change in TARGETS:
        met = [
            r["variant"]
            for r in rows[1:]
            if r["init_seed"] == 0
            and r["speedup"] >= speedup
            and -r["auc_delta"] <= auc_loss
            and (ece_change is None or abs(r["calibration_error_delta"]) <= ece_change)
        ]
        condition = f">= {speedup}x at an AUC loss <= {auc_loss}" + (
            f" and |ECE change| <= {ece_change}" if ece_change is not None else ""
        )
        lines.append(f"- {condition}: " + (f"met by {', '.join(met)}" if met else "not met"))
    if noise is not None:
        lines.append(
            f"- Training noise: a second training seed moved the baseline's AUC by {noise:+.4f} "
            "(same rows, other initialisation and shuffling)."
        )
    batch = [r["batch_parity_max_abs_probability_diff"] for r in rows]
    if any(b is not None for b in batch):
        lines.append(
            "- int8 scores depend on the batch (one activation scale per batch): a row scored "
            "alone vs in a batch of 4096 moved by up to "
            f"{max(b for b in batch if b is not None):.2g} in probability."
        )
    return lines


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# DCN-v2 variants: quality and onnxruntime speed",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Training rows {result['plan']['rows']:,}, held-out test rows "
        f"{result['plan']['test_rows']:,} (the same for every variant). Speed: onnxruntime "
        f"{result['onnxruntime']}, 1 intra-op thread, one request of {result['batch']} "
        "candidates per call, median of "
        f"{result['rounds']} interleaved rounds x {result['calls']} calls; speed-up is the median "
        f"of per-round ratios (a retrained baseline, if listed, shows the timing noise). CPU: "
        f"{result['cpu']}.",
        "",
        "| variant | version | multiply-adds | AUC | ΔAUC | log loss | ECE | ΔECE | "
        "candidates/s per core | speed-up | int8 vs fp32 mean / max abs Δp | ONNX MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        diff = (
            f"{r['int8_vs_fp32_mean_abs_probability_diff']:.2g} / "
            f"{r['int8_vs_fp32_max_abs_probability_diff']:.2g}"
            if r["int8_vs_fp32_mean_abs_probability_diff"] is not None
            else ""
        )
        label = r["variant"] + (f" (seed {r['init_seed']})" if r["init_seed"] else "")
        lines.append(
            f"| {label} | {r['version']} | {r['multiply_adds'] / 1000:.0f} k | {r['auc']:.4f} | "
            f"{r['auc_delta']:+.4f} | "
            f"{r['log_loss']:.5f} | {r['calibration_error']:.5f} | "
            f"{r['calibration_error_delta']:+.5f} | {r['candidates_per_second']:,.0f} | "
            f"{r['speedup']:.2f}x | {diff} | {r['size_mb']:.1f} |"
        )
    lines += ["", "Targets (versus the first row):", "", *result["targets"], ""]
    (out / "variants.md").write_text("\n".join(lines))


def _cpu() -> str:
    """Model name and whether int8 dot products (VNNI) exist: they decide int8's speed-up."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line]
    vnni = "avx512_vnni" in info or "avx_vnni" in info
    return f"{names[0] if names else 'unknown'}, {'with' if vnni else 'no'} VNNI"


SPEED_ONLY = [
    "- Not judged (--speed-only): the versions were trained on different data, so their "
    "quality columns are each version's own and their deltas mean nothing."
]

FULL = {"rows": 1_000_000, "validation_rows": 200_000, "calibration_rows": 300_000,
        "test_rows": 500_000, "users": 10_000, "ads": 50_000, "epochs": 2, "noise_seeds": 1,
        "rounds": 60, "calls": 20}  # fmt: skip
"""adscore train's defaults (the demo model's sizes), and the timing of a full run."""
QUICK = {"rows": 40_000, "validation_rows": 5_000, "calibration_rows": 10_000,
         "test_rows": 10_000, "users": 2_000, "ads": 5_000, "epochs": 2, "noise_seeds": 0,
         "rounds": 5, "calls": 5}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.variants", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"report folder (default {RESULTS.name}/; --quick: a temporary one)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny world, few rounds")
    for key, value in FULL.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=int, help=f"default {value:,} ({QUICK[key]:,} with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--batch", type=int, default=SERVING_BATCH, help="rows per call")
    parser.add_argument("--repository", type=Path, help="publish to / read from this repository")
    parser.add_argument("--name", default="pcvr-variants", help="model name in the repository")
    parser.add_argument(
        "--versions", type=int, nargs="+", help="benchmark these versions (first: the baseline)"
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="with --versions: time versions trained on different data; judge no quality",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.versions and not args.repository:
        parser.error("--versions needs --repository")
    if args.speed_only and not args.versions:
        parser.error("--speed-only needs --versions")
    if args.out is None:  # a smoke run must not overwrite the results of a full one
        args.out = Path(tempfile.mkdtemp(prefix="variants-quick-")) if args.quick else RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.variants", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="adscore-variants-") as tmp:
        repository = ModelRepository(args.repository or Path(tmp))
        versions = args.versions or _train_and_publish(args, repository)
        variants = _load(repository, args.name, versions, speed_only=args.speed_only)
        inputs = _timing_inputs(variants, args.batch)
        speed = measure_speed(
            variants, inputs, rounds=args.rounds, calls=args.calls, progress=not args.quiet
        )
        rows = [_row(v, variants[0], s) for v, s in zip(variants, speed, strict=True)]
    reseeded = [r for r in rows[1:] if r["init_seed"] and r["variant"] == rows[0]["variant"]]
    noise = reseeded[0]["auc_delta"] if reseeded else None
    training = variants[0].metadata.training
    result = {
        "command": command,
        "plan": {k: training.get(k) for k in ("rows", "test_rows", "seed")},
        "onnxruntime": ort.__version__,
        "cpu": _cpu(),
        "batch": args.batch,
        "rounds": args.rounds,
        "calls": args.calls,
        "variants": rows,
        "training_noise_auc": noise,
        "targets": SPEED_ONLY if args.speed_only else target_lines(rows, noise),
    }
    write_report(result, args.out)
    print((args.out / "variants.md").read_text())
    print(f"wrote {args.out / 'variants.md'} and variants.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
