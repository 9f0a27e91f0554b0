"""The `adscore` command: serve, demo, train, learning-curve, load-features, batch-score,
evaluate, export-features, export-predictions, reference, models, keys.

Training and the synthetic data set are imported only by the commands that need them, so the
serving install (no torch) runs every other command.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from service.settings import Settings

DEMO_REPOSITORY = Path("demo/model_repository")


def _configure_logging(level: str, worker: int | None = None) -> None:
    name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s"
    )


# Settings that `serve` and `demo` also take as flags (--model-repository for model_repository).
FLAG_SETTINGS = ("host", "port", "model_repository", "model_name", "redis_url",
                 "feature_namespace", "execution_provider", "log_level", "workers")  # fmt: skip


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as command-line flags."""
    return {
        name: getattr(args, name)
        for name in FLAG_SETTINGS
        if getattr(args, name, None) is not None
    }  # fmt: skip


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    return Settings(**(_flags(args) | extra))


def _serve(settings: Settings, store: Any = None) -> None:
    from service.app import create_app
    from service.server import serve

    serve(create_app(settings, store=store), settings)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.auth import AuthConfigError, KeyRing
    from service.workers import STARTUP_FAILURE, follow_supervisor, supervise, worker_index

    settings = _settings(args)
    worker = worker_index()
    _configure_logging(settings.log_level, worker)
    try:  # a configuration mistake deserves one line, not a traceback from the lifespan
        KeyRing(settings.api_keys_file, enabled=settings.auth_enabled)
    except AuthConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if worker is not None:
        from service.app import create_app  # not in the supervisor: it serves nothing itself
        from service.server import reuse_port_socket, serve

        follow_supervisor()
        try:  # bound now, listening once the models are loaded (see service/workers.py)
            sock = reuse_port_socket(settings.host, settings.port)
        except OSError as exc:
            print(f"error: cannot bind {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return STARTUP_FAILURE
        serve(create_app(settings), settings, sockets=[sock])
        return 0
    if settings.workers > 1:
        if settings.port == 0:
            print("error: ADSCORE_WORKERS > 1 needs a fixed port, not 0", file=sys.stderr)
            return 2
        # The workers read the same environment; flags given here reach them as variables.
        overrides = {f"ADSCORE_{k.upper()}": str(v) for k, v in _flags(args).items()}
        stop_timeout = settings.shutdown_delay_seconds + 35  # uvicorn's graceful 30 s and a margin
        return supervise(settings.workers, overrides, stop_timeout, settings.host, settings.port)
    _serve(settings)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the demo model on synthetic features in a private redis-server (or in memory)."""
    import shutil
    import tempfile

    from feature_client.memory_store import InMemoryFeatureStore
    from feature_client.redis_server import LocalRedisServer
    from feature_client.redis_store import RedisFeatureStore
    from feature_client.store import FeatureStore
    from models.synthetic import load_world_features, world_for_model
    from service.repository import ModelRepository

    base = _settings(args)
    _configure_logging(base.log_level)
    # uvicorn re-raises SIGTERM once it has shut down; turning it into SystemExit lets the
    # ExitStack below stop the demo's redis-server instead of orphaning it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    repository = ModelRepository(base.model_repository)
    metadata = repository.read_metadata(base.model_name, repository.active_version(base.model_name))
    world = world_for_model(metadata.dataset, metadata.spec().fingerprint())
    with ExitStack() as stack:
        # A private copy: versions published to the demo must not land in the source tree.
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adscore-demo-")))
        shutil.copytree(base.model_repository, scratch / "model_repository")
        demo_settings: dict[str, Any] = {
            "model_repository": scratch / "model_repository",
            "auth_enabled": False,
        }
        print(f"model repository: {scratch / 'model_repository'} (a copy, removed on exit)")
        print("AUTHENTICATION IS OFF in the demo: anyone who reaches the port can change models.")
        if base.workers > 1:
            print("the demo serves in one process: ADSCORE_WORKERS applies to `adscore serve`")
        store: FeatureStore
        if shutil.which("redis-server") and not args.in_memory:
            server = stack.enter_context(LocalRedisServer())
            print(f"started redis-server on {server.url} (stops with the demo)", flush=True)
            settings = _settings(
                args, feature_backend="redis", redis_url=server.url, **demo_settings
            )
            store = RedisFeatureStore.from_url(server.url, settings.feature_namespace, 5.0)
            serving_store = None
        else:
            reason = "--in-memory" if args.in_memory else "redis-server is not installed"
            print(f"{reason}: using the in-process feature store", flush=True)
            settings = _settings(args, feature_backend="memory", **demo_settings)
            store = serving_store = InMemoryFeatureStore(settings.feature_namespace)

        async def load() -> int:
            try:
                return await load_world_features(store, world)
            finally:
                if serving_store is None:
                    await store.close()

        count = asyncio.run(load())
        print(
            f"loaded features of {len(world.users.keys)} users (u0..u{len(world.users.keys) - 1}) "
            f"and {len(world.ads.keys)} ads (a0..a{len(world.ads.keys) - 1}), {count} keys",
            flush=True,
        )
        print(f"serving model {metadata.name} v{metadata.version} on "
              f"http://{settings.host}:{settings.port}", flush=True)  # fmt: skip
        _serve(settings, store=serving_store)
    return 0


def _print_metrics(metrics: dict[str, float], parity: dict[str, float] | None = None) -> None:
    names = [
        ("oracle AUC (true probabilities)", "oracle_auc"),
        ("DCN-v2 AUC", "auc"),
        ("logistic regression AUC", "baseline_auc"),
        ("lift over baseline (AUC)", "lift_over_baseline_auc"),
        ("gap to oracle (AUC)", "gap_to_oracle_auc"),
        ("oracle log loss", "oracle_log_loss"),
        ("DCN-v2 log loss", "log_loss"),
        ("logistic regression log loss", "baseline_log_loss"),
        ("calibration error, before calibration", "calibration_error_uncalibrated"),
        ("calibration error, after calibration", "calibration_error"),
        ("base conversion rate", "base_rate"),
    ]
    # Data from the prediction log has no true probabilities, so no oracle figures.
    rows = [(name, metrics[key]) for name, key in names if key in metrics]
    if "fp32_auc" in metrics:  # a quantized model: what it cost against its fp32 source
        rows += [
            ("fp32 source AUC", metrics["fp32_auc"]),
            ("fp32 source calibration error", metrics["fp32_calibration_error"]),
            ("int8 vs fp32, mean |prob. diff|", metrics["int8_vs_fp32_mean_abs_probability_diff"]),
            ("int8 vs fp32, max |prob. diff|", metrics["int8_vs_fp32_max_abs_probability_diff"]),
        ]
        if parity:
            rows.append(("alone vs batched, max |prob. diff|", parity["max_abs_probability_diff"]))
    elif parity:
        rows.append(("torch vs ONNX, max |probability diff|", parity["max_abs_probability_diff"]))
        rows.append(("torch vs ONNX, max |logit diff|", parity["max_abs_logit_diff"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.6g}")


def _plan(args: argparse.Namespace) -> Any:
    from models.dcn import DCNConfig
    from models.pipeline import TrainingPlan
    from models.synthetic import SyntheticConfig
    from models.train import FitConfig

    defaults = TrainingPlan()
    return TrainingPlan(
        rows=args.rows,
        validation_rows=args.validation_rows or defaults.validation_rows,
        calibration_rows=args.calibration_rows or defaults.calibration_rows,
        test_rows=args.test_rows or defaults.test_rows,
        world=SyntheticConfig(users=args.users, ads=args.ads, seed=args.data_seed),
        dcn=DCNConfig(
            cross_rank=args.cross_rank,
            mlp_layers=tuple(args.mlp_layers or DCNConfig().mlp_layers),
        ),
        fit=FitConfig(max_epochs=args.epochs),
        seed=args.seed,
        threads=args.threads,
    )


def _labelled_log(
    paths: Sequence[Path], args: argparse.Namespace, *, inputs: bool
) -> tuple[Any, int]:
    """The logged rows at `paths` joined with `--labels` (a LabelledLog) and how many files
    they came from; the counts are printed."""
    from batch_scoring.errors import BatchInputError
    from batch_scoring.log_labels import DEFAULT_KEYS, join_labels
    from batch_scoring.prediction_log import read_prediction_log

    if args.labels is None:
        raise BatchInputError("--labels: name the file or folder of outcomes to join the log with")
    rows, read = read_prediction_log(
        paths, include_open=args.include_open, inputs=inputs, progress=not args.quiet
    )
    labelled = join_labels(
        rows, args.labels, label_column=args.label_column, on=args.on or DEFAULT_KEYS,
        unlabelled=args.unlabelled,
    )  # fmt: skip
    print("\n".join(read.lines() + labelled.report.lines()), flush=True)
    if len(labelled) == 0:
        raise BatchInputError("no logged row has a label (check --on, --label-column and the file)")
    return labelled, len(read.files)


def _log_training(args: argparse.Namespace, plan: Any) -> tuple[Any, Any] | None:
    """The plan and training data of `train --from-log`, or None after printing the error."""
    if not _batch_scoring_installed():
        return None
    from batch_scoring.errors import BatchError
    from models.log_data import log_plan, logged_spec, training_data_from_log
    from service.repository import ModelRepository

    try:
        labelled, files = _labelled_log(args.from_log, args, inputs=True)
        spec = logged_spec(ModelRepository(args.model_repository), labelled.rows)
        data = training_data_from_log(labelled, spec, files=files, labels_name=args.labels.name)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for name, split in data.dataset["splits"].items():
        start, end = split["time_range"]
        print(f"  {name}: {split['rows']:,} rows, {start} .. {end}")
    return log_plan(plan, data), data


def cmd_train(args: argparse.Namespace) -> int:
    from models.pipeline import export_and_publish, run_training
    from service.repository import ModelRepository

    plan, data = _plan(args), None
    if args.from_log is not None:
        loaded = _log_training(args, plan)
        if loaded is None:
            return 2
        plan, data = loaded
    elif args.labels is not None:
        print("error: --labels goes with --from-log", file=sys.stderr)
        return 2
    trained = run_training(plan, progress=not args.quiet, data=data)
    metadata = export_and_publish(
        trained,
        ModelRepository(args.model_repository),
        args.name,
        activate=not args.no_activate,
        quantization=args.quantize,
        request_once=args.request_once,
    )
    folder = ModelRepository(args.model_repository).version_dir(metadata.name, metadata.version)
    print(f"published {metadata.name} version {metadata.version} ({metadata.architecture}) "
          f"to {folder}")  # fmt: skip
    _print_metrics(metadata.metrics, metadata.parity)
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from models.pipeline import rebuild_drift_reference
    from service.repository import ModelRepository, RepositoryError

    repository = ModelRepository(args.model_repository)
    try:
        version = args.version or repository.active_version(args.name)
        metadata = repository.read_metadata(args.name, version)
        reference = rebuild_drift_reference(repository, args.name, version, threads=args.threads)
        repository.write_metadata(metadata.model_copy(update={"drift_reference": reference}))
    except (RepositoryError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.name} v{version}: drift reference written from {reference.rows:,} validation rows"
    )
    return 0


def cmd_request_once(args: argparse.Namespace) -> int:
    from models.request_once import publish_request_once
    from service.repository import ModelRepository, RepositoryError

    repository = ModelRepository(args.model_repository)
    try:
        version = args.version or repository.active_version(args.name)
        metadata = publish_request_once(repository, args.name, version, activate=args.activate)
    except (RepositoryError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parity = metadata.parity
    print(
        f"published {metadata.name} version {metadata.version} ({metadata.architecture}) from "
        f"version {version}: largest score difference {parity['max_abs_probability_diff']:.2g} "
        f"over {parity['rows']:.0f} rows"
        + (
            ""
            if args.activate
            else "; activate it with "
            f"`adscore models activate --model {metadata.name} {metadata.version}`"
        )
    )
    return 0


def cmd_learning_curve(args: argparse.Namespace) -> int:
    import dataclasses

    from models.pipeline import run_training

    plan = _plan(args)
    results = []
    for fraction in args.fractions:
        rows = max(1000, int(plan.rows * fraction))
        print(f"training on {rows} rows ({fraction:g}x)", flush=True)
        trained = run_training(dataclasses.replace(plan, rows=rows), progress=not args.quiet)
        results.append((fraction, rows, trained.metrics))
    print("\n| rows | oracle AUC | DCN-v2 AUC | LR AUC | DCN-v2 gap to oracle | ECE (calibrated) |")
    print("|---|---|---|---|---|---|")
    for fraction, rows, m in results:
        print(
            f"| {rows:,} ({fraction:g}x) | {m['oracle_auc']:.4f} | {m['auc']:.4f} | "
            f"{m['baseline_auc']:.4f} | {m['gap_to_oracle_auc']:.4f} | "
            f"{m['calibration_error']:.4f} |"
        )
    return 0


def cmd_load_features(args: argparse.Namespace) -> int:
    from feature_client.loader import load_file, stamp_schema
    from feature_client.memory_store import InMemoryFeatureStore
    from feature_client.redis_store import RedisFeatureStore
    from feature_client.store import FeatureStore
    from service.repository import ModelRepository

    settings = _settings(args)
    _configure_logging(settings.log_level)
    repository = ModelRepository(settings.model_repository)
    version = args.version or repository.active_version(settings.model_name)
    metadata = repository.read_metadata(settings.model_name, version)
    spec = metadata.spec()
    store: FeatureStore = (
        InMemoryFeatureStore(settings.feature_namespace)
        if args.dry_run
        else RedisFeatureStore.from_url(settings.redis_url, settings.feature_namespace, 30.0)
    )

    async def load() -> int:
        try:
            if not await store.ping():
                raise SystemExit(f"error: cannot reach Redis at {settings.redis_url}")
            if args.users is None and args.ads is None:
                from models.synthetic import load_world_features, world_for_model

                world = world_for_model(metadata.dataset, spec.fingerprint())
                return await load_world_features(store, world, progress=not args.quiet)
            count = 0
            for source, path in (("user", args.users), ("ad", args.ads)):
                if path is not None:
                    count += await load_file(
                        store, spec, source, path, id_column=args.id_column,  # type: ignore[arg-type]
                        batch_size=args.batch_size, progress=not args.quiet,
                    )  # fmt: skip
            await stamp_schema(store, spec)
            return count
        finally:
            await store.close()

    count = asyncio.run(load())
    target = "nowhere (dry run)" if args.dry_run else settings.redis_url
    print(f"wrote {count} feature vectors (schema version {spec.schema_version}) to {target}")
    return 0


def _batch_scoring_installed() -> bool:
    """Batch scoring reads and writes Parquet: the serving install has no pyarrow."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("error: batch scoring needs pyarrow: pip install 'adscore[parquet]'", file=sys.stderr)
        return False
    return True


def cmd_batch_score(args: argparse.Namespace) -> int:
    """Score request files offline with a served model version and the online features."""
    if not _batch_scoring_installed():
        return 2
    import os

    from batch_scoring.errors import BatchError
    from batch_scoring.features import FeatureSource, RedisFeatures, SnapshotFeatures
    from batch_scoring.reader import list_inputs
    from batch_scoring.runner import load_model, run_batch

    settings = _settings(args)
    _configure_logging(settings.log_level)
    try:
        files = list_inputs(args.input)  # bad input is refused before a model loads
        features: FeatureSource = (
            SnapshotFeatures(args.features)
            if args.features is not None
            else RedisFeatures(settings.redis_url, settings.feature_namespace)
        )
        try:
            model = load_model(
                settings.model_repository,
                args.model or settings.model_name,
                args.threads or os.cpu_count() or 1,
                features,
            )
            summary = run_batch(
                model, features, files, args.output, chunk_rows=args.chunk_rows,
                restart=args.restart, progress=not args.quiet,
            )  # fmt: skip
        finally:
            features.close()
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    print(f"scores in {args.output}")
    return 0


def _evaluate_log(args: argparse.Namespace) -> int:
    """Decay: the logged scores' quality per model version and time bucket."""
    import json

    from batch_scoring.decay import Granularity, decay_lines, evaluate_decay, plot_decay
    from batch_scoring.errors import BatchError

    by: Granularity = args.by or "day"
    try:
        labelled, _ = _labelled_log(args.log, args, inputs=False)
        reports = evaluate_decay(labelled, by, args.bins)
        if args.plot is not None:
            plot_decay(reports, args.plot)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + "\n".join(decay_lines(reports, by)))
    if args.json is not None:
        report = {
            "by": by,
            "rows": dataclasses.asdict(labelled.report),
            "buckets": [r.to_dict() for r in reports],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot is not None:
        print(f"decay plot: {args.plot}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """AUC, log loss and calibration of batch scores (or of the prediction log) against labels,
    per model version (and time bucket)."""
    if not _batch_scoring_installed():
        return 2
    if args.log is not None:
        return _evaluate_log(args)
    import json

    from batch_scoring.errors import BatchError
    from batch_scoring.evaluate import evaluate, plot_reliability, read_scored, report_lines

    try:
        if args.by is not None:
            raise BatchError("--by goes with --log (batch scores carry no time)")
        table = read_scored(args.scores, args.label_column, args.labels, args.on or ())
        if table.num_rows == 0:
            raise BatchError("no scored row has a label (check --on and the label file)")
        reports = evaluate(table, args.label_column, args.bins)
        if args.plot is not None:
            plot_reliability(reports, args.plot)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(reports)))
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
    if args.plot is not None:
        print(f"reliability plot: {args.plot}")
    return 0


def cmd_export_features(args: argparse.Namespace) -> int:
    """Snapshot the online features of a Redis into one Parquet file, for batch scoring."""
    if not _batch_scoring_installed():
        return 2
    from batch_scoring.errors import BatchError
    from batch_scoring.features import write_snapshot

    settings = _settings(args)
    try:
        counts = write_snapshot(
            settings.redis_url, settings.feature_namespace, args.output, progress=not args.quiet
        )
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {counts['user']} user and {counts['ad']} ad feature vectors to {args.output}")
    return 0


def cmd_export_predictions(args: argparse.Namespace) -> int:
    """Copy the prediction log's Redis stream into JSON Lines files (for train and evaluate)."""
    from batch_scoring.errors import BatchError
    from batch_scoring.prediction_export import export_stream

    settings = _settings(args)
    key = f"{settings.feature_namespace}:predictions"
    try:
        summary = export_stream(
            settings.prediction_log_redis_url or settings.redis_url, key, args.output,
            after=args.after, progress=not args.quiet,
        )  # fmt: skip
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = f" ({summary.skipped} entries without a record skipped)" if summary.skipped else ""
    print(f"wrote {summary.records} records of {key} to {len(summary.files)} file(s) in "
          f"{args.output}{skipped}")  # fmt: skip
    if summary.last_id is not None:
        print(f"last entry: {summary.last_id} (--after {summary.last_id} copies newer ones only)")
    return 0


def _add_version_flags(parser: argparse.ArgumentParser, version_help: str) -> None:
    """--model-repository, --name and --version: one published version to work on."""
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--name", default="pcvr", help="model name (default pcvr)")
    parser.add_argument("--version", type=int, help=version_help)


def _add_log_reading_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unlabelled", choices=["drop", "negative"], default="drop",
        help="logged rows the label file does not name: drop them (default), or take them as "
        "non-conversions (a file of conversions only)",
    )  # fmt: skip
    parser.add_argument(
        "--include-open", action="store_true",
        help="read .jsonl.open files too (still being written; a half-written last line is "
        "skipped)",
    )  # fmt: skip


def _add_batch_commands(commands: Any) -> None:
    batch = commands.add_parser(
        "batch-score",
        help="score request files (Parquet/CSV) offline, resumable, with a served model version",
        description="Read request rows (user_id, ad_id, context columns) in chunks, fetch their "
        "features from the online Redis (or a snapshot from export-features), score them with "
        "the model version and the feature code that serve /v1/score, and write Parquet parts "
        "(input columns + model, model_version, score, missing_user, missing_ad). A rerun into "
        "the same --output skips the chunks already done.",
    )
    batch.add_argument("--input", type=Path, required=True, help="a .parquet/.csv file or folder")
    batch.add_argument("--output", type=Path, required=True, help="folder for the scored parts")
    batch.add_argument(
        "--model", help="NAME (its active version) or NAME:VERSION (default: the default model)"
    )
    batch.add_argument("--model-repository", type=Path, help="default model_repository")
    batch.add_argument("--redis-url", help="Redis with the online features")
    batch.add_argument("--feature-namespace", help="key prefix of the features (default adscore)")
    batch.add_argument(
        "--features", type=Path, metavar="SNAPSHOT",
        help="read features from a snapshot (adscore export-features) instead of Redis",
    )  # fmt: skip
    batch.add_argument(
        "--chunk-rows", type=positive_int, default=100_000,
        help="rows per chunk: the unit of memory, output files and resumption (default 100000)",
    )  # fmt: skip
    batch.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: cores)")
    batch.add_argument("--restart", action="store_true", help="discard a previous run in --output")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    batch.set_defaults(handler=cmd_batch_score)

    evaluation = commands.add_parser(
        "evaluate",
        help="AUC, log loss and calibration of batch scores or of the prediction log against "
        "labels, per model version (and time bucket: decay)",
        description="Join batch-score output (--scores) with labels (conversions) and report, per "
        "model version, AUC, log loss, expected calibration error and a reliability table. Or "
        "join the prediction log (--log) with labels on request id and ad id and report the same "
        "per model version and UTC time bucket (--by), to see a model decay.",
    )
    inputs = evaluation.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--scores", type=Path, nargs="+", help="batch-score output folder(s)")
    inputs.add_argument(
        "--log", type=Path, nargs="+", help="prediction log files or folders (.jsonl)"
    )
    evaluation.add_argument(
        "--labels", type=Path,
        help="Parquet/CSV file or folder of labels (default with --scores: their label column)",
    )  # fmt: skip
    evaluation.add_argument(
        "--on", nargs="+",
        help="key column(s) joining scores and labels; with --log, the label file's request id "
        "and ad id columns (default request_id ad_id)",
    )  # fmt: skip
    evaluation.add_argument("--label-column", default="label", help="0/1 outcome (default label)")
    evaluation.add_argument(
        "--by", choices=["hour", "day", "week"], help="--log: time buckets, UTC (default day)"
    )
    _add_log_reading_flags(evaluation)
    evaluation.add_argument("--bins", type=positive_int, default=10, help="reliability bins (10)")
    evaluation.add_argument(
        "--plot", type=Path,
        help="write a reliability diagram (PNG); with --log, AUC and rates over time",
    )  # fmt: skip
    evaluation.add_argument("--json", type=Path, help="write the reports as JSON")
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluation.set_defaults(handler=cmd_evaluate)

    export = commands.add_parser(
        "export-features",
        help="snapshot the online features of a Redis into a Parquet file (for batch-score)",
        description="Copy every user and ad feature vector (the stored bytes) and the schema "
        "stamp from Redis into one Parquet file, read by batch-score --features.",
    )
    export.add_argument("--output", type=Path, required=True, help="the .parquet file to write")
    export.add_argument("--redis-url", help="Redis with the online features")
    export.add_argument("--feature-namespace", help="key prefix of the features (default adscore)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=cmd_export_features)

    predictions = commands.add_parser(
        "export-predictions",
        help="copy the prediction log's Redis stream into JSON Lines files (train, evaluate)",
        description="Page through the stream {namespace}:predictions with XRANGE and write its "
        "records to .jsonl files in --output, readable by train --from-log and evaluate --log. "
        "The stream is left as it is.",
    )
    predictions.add_argument("--output", type=Path, required=True, help="folder for the files")
    predictions.add_argument("--redis-url", help="Redis of the prediction stream")
    predictions.add_argument("--feature-namespace", help="stream key prefix (default adscore)")
    predictions.add_argument(
        "--after", metavar="ENTRY_ID", help="copy only entries after this one (a previous export's "
        "last entry)",
    )  # fmt: skip
    predictions.add_argument("--quiet", action="store_true", help="no progress bar")
    predictions.set_defaults(handler=cmd_export_predictions)


def _add_service_flags(parser: argparse.ArgumentParser, *, demo: bool = False) -> None:
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--execution-provider", choices=["cpu", "cuda"], help="default cpu")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    if not demo:
        parser.add_argument("--redis-url", help="Redis with the online features")


def _add_model_flags(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=default,
        help=f"model repository folder (default {default or 'model_repository'})",
    )
    parser.add_argument("--model-name", help="model to use (default pcvr)")
    parser.add_argument("--feature-namespace", help="key prefix of the features (default adscore)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows (default 1M)")
    parser.add_argument("--validation-rows", type=int, help="default 200k")
    parser.add_argument("--calibration-rows", type=int, help="default 300k")
    parser.add_argument("--test-rows", type=int, help="default 500k")
    parser.add_argument("--users", type=int, default=10_000, help="users in the synthetic world")
    parser.add_argument("--ads", type=int, default=50_000, help="ads in the synthetic world")
    parser.add_argument("--data-seed", type=int, default=7, help="seed of the synthetic world")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and training")
    parser.add_argument("--epochs", type=int, default=2, help="most epochs (early stopping)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument(
        "--cross-rank", type=positive_int, metavar="N",
        help="low-rank cross layers (U V^T of rank N): fewer multiply-adds (default full rank)",
    )  # fmt: skip
    parser.add_argument(
        "--mlp-layers", type=positive_int, nargs="+", metavar="N",
        help="widths of the deep tower (default 256 128 64)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_log_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-log", type=Path, nargs="+", metavar="PATH",
        help="train on prediction log files or folders (.jsonl) joined with --labels instead of "
        "the synthetic data set: split by time 70/10/10/10 (--rows and the synthetic world's "
        "flags do not apply), with the feature spec of the logged versions (in "
        "--model-repository)",
    )  # fmt: skip
    parser.add_argument("--labels", type=Path, help="--from-log: Parquet/CSV file or folder")
    parser.add_argument(
        "--on", nargs=2, metavar=("REQUEST_ID", "AD_ID"),
        help="--from-log: the label file's request id and ad id columns (default request_id ad_id)",
    )  # fmt: skip
    parser.add_argument("--label-column", default="label", help="0/1 outcome (default label)")
    _add_log_reading_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adscore", description="Real-time ads conversion prediction service."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the scoring service",
        description="Run the scoring service. Every setting is also read from ADSCORE_* "
        "environment variables; flags win over them.",
    )
    _add_service_flags(serve)
    _add_model_flags(serve)
    serve.add_argument(
        "--workers", type=int, metavar="N",
        help="serving processes sharing the port (ADSCORE_WORKERS; default 1)",
    )  # fmt: skip
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="serve the demo model on synthetic features (private redis-server or in memory)",
        description="Start a private redis-server on a free port (or use the in-process store "
        "when redis-server is missing), load the synthetic features of the model's data set "
        "and serve on http://127.0.0.1:8000.",
    )
    _add_service_flags(demo, demo=True)
    _add_model_flags(demo, default=DEMO_REPOSITORY)
    demo.add_argument("--in-memory", action="store_true", help="use the in-process store")
    demo.set_defaults(handler=cmd_demo)

    train = commands.add_parser(
        "train",
        help="train, calibrate, export and publish a DCN-v2 model (synthetic data or the "
        "prediction log)",
        description="Generate the synthetic data set (or read the prediction log and join it "
        "with labels: --from-log), train a logistic-regression baseline and a DCN-v2 with early "
        "stopping, calibrate, evaluate (against the oracle on synthetic data), export to ONNX, "
        "check parity and publish a new version. Needs the 'train' extra (torch).",
    )
    _add_training_flags(train)
    _add_log_training_flags(train)
    train.add_argument(
        "--model-repository", type=Path, default=Path("model_repository"),
        help="where to publish, and with --from-log where the logged versions are "
        "(default model_repository)",
    )  # fmt: skip
    train.add_argument("--name", default="pcvr", help="model name (default pcvr)")
    train.add_argument("--no-activate", action="store_true", help="publish without activating")
    train.add_argument(
        "--quantize", choices=["none", "int8"], default="none",
        help="int8: publish the dynamically quantized model, recalibrated on its own outputs "
        "(default none)",
    )  # fmt: skip
    train.add_argument(
        "--request-once", action="store_true",
        help="export with the user and context part of the first layers computed once per "
        "request instead of once per candidate: the same scores, less work per candidate",
    )  # fmt: skip
    train.set_defaults(handler=cmd_train)

    request_once = commands.add_parser(
        "request-once",
        help="publish a copy of an fp32 DCN-v2 version that computes its per-request part once",
        description="Read a published fp32 DCN-v2 version's weights back from its model.onnx "
        "and publish them as a new version whose first layers compute the user and context "
        "part once per request instead of once per candidate. Scores are the same (parity is "
        "checked against the source on random and request-shaped rows, recorded, and must be "
        "within the golden rows' tolerance); calibration, metrics, golden rows and drift "
        "reference are carried over. Needs the 'train' extra.",
    )
    _add_version_flags(request_once, "source version (default: the active version)")
    request_once.add_argument("--activate", action="store_true", help="activate the new version")
    request_once.set_defaults(handler=cmd_request_once)

    reference = commands.add_parser(
        "reference",
        help="add the drift reference to a version published without one (no retraining)",
        description="Draws the version's synthetic validation rows again, scores them with its "
        "own model.onnx and writes the drift reference into its metadata.json.",
    )
    _add_version_flags(reference, "default: the active version")
    reference.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    reference.set_defaults(handler=cmd_reference)

    curve = commands.add_parser(
        "learning-curve",
        help="train at several data sizes and print the gap to the oracle",
        description="Train at fractions of --rows and print a Markdown table of oracle, DCN-v2 "
        "and logistic-regression AUC. Publishes nothing.",
    )
    _add_training_flags(curve)
    curve.add_argument(
        "--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
        help="fractions of --rows (default 0.25 0.5 1)",
    )  # fmt: skip
    curve.set_defaults(handler=cmd_learning_curve)

    load = commands.add_parser(
        "load-features",
        help="write entity features into Redis (synthetic, or from CSV/Parquet files)",
        description="Write feature vectors encoded with the model's feature spec into Redis, "
        "in pipelined batches. Without --users/--ads, writes the synthetic data set the model "
        "was trained on. A file has an id column and one column per feature of its entity.",
    )
    _add_model_flags(load)
    load.add_argument("--redis-url", help="target Redis (default redis://127.0.0.1:6379/0)")
    load.add_argument(
        "--version", type=int, help="model version whose spec to use (default active)"
    )
    load.add_argument("--users", type=Path, help="CSV or Parquet file of user features")
    load.add_argument("--ads", type=Path, help="CSV or Parquet file of ad features")
    load.add_argument("--id-column", default="id", help="entity id column (default id)")
    load.add_argument("--batch-size", type=int, default=5_000, help="rows per pipeline")
    load.add_argument("--dry-run", action="store_true", help="encode everything, write nothing")
    load.add_argument("--quiet", action="store_true", help="no progress bars")
    load.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    load.set_defaults(handler=cmd_load_features)

    _add_batch_commands(commands)

    from service.cli_admin import register

    register(commands)
    return parser


def settings_error(exc: Any) -> str:
    """One line per invalid setting, named as the user set it (variable or flag)."""
    lines = ["error: invalid settings:"]
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        where = f"ADSCORE_{name.upper()}"
        if name in FLAG_SETTINGS:
            where += f" (or --{name.replace('_', '-')})"
        lines.append(f"  {where}: {error['msg']}, got {error.get('input')!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from feature_client.loader import FeatureFileError
    from feature_client.spec import SpecError
    from models.synthetic import DatasetMismatch
    from service.repository import RepositoryError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (RepositoryError, DatasetMismatch, FeatureFileError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        print(settings_error(exc), file=sys.stderr)
        return 2
    except SettingsError as exc:  # a value that does not parse (a list that is not JSON)
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
