"""The `edged` command line: model tools, and the daemon's commands (edged.daemon_cli)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged import __version__
from edged.atomic import atomic_write
from edged.daemon_cli import add_daemon_commands
from edged.engine import Engine, EngineOptions
from edged.errors import EdgedError, InputError
from edged.inspection import inspect_path
from edged_formats import FormatError

__all__ = ["main"]

# What a malformed .npy/.npz raises from numpy and zipfile while being read (OSErrors go to
# main(), which names the file).
_NPY_ERRORS = (ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high]; argparse reports anything else."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low or (high is not None and value > high):
            limits = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {limits}, not {value}")
        return value

    return parse


positive_int = bounded_int(1)


def finite_float(text: str) -> float:
    """An argparse `type` for a finite number (no NaN, no infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def nonzero_float(text: str) -> float:
    """An argparse `type` for a finite, non-zero number."""
    value = finite_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must not be zero")
    return value


def _load_samples(
    path: str, *, labels: bool = True
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """Samples (and labels, if wanted and the file has `y`) from .npy or .npz (`x`, optional
    `y`); InputError naming the file for anything that is not a non-empty batch of finite
    numbers with one integer label per sample."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except _NPY_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npy/.npz file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        with loaded:
            if "x" not in loaded.files:
                raise InputError(f"{path}: the .npz has no array named 'x'")
            x = _npz_array(loaded, "x", path)
            y = _npz_array(loaded, "y", path) if labels and "y" in loaded.files else None
    if x.dtype.kind not in "iuf":
        raise InputError(f"{path}: samples must be integers or floats, not {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise InputError(f"{path}: the file holds no samples (shape {list(x.shape)})")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise InputError(f"{path}: samples hold NaN or infinite values")
    if y is not None:
        if y.dtype.kind not in "iu":
            raise InputError(f"{path}: labels 'y' must be integer class indices, not {y.dtype}")
        if y.shape != (len(x),):
            raise InputError(
                f"{path}: labels 'y' have shape {list(y.shape)}, expected one per sample "
                f"([{len(x)}])"
            )
    return x, y


def _npz_array(npz: Any, name: str, path: str) -> npt.NDArray[Any]:
    try:
        return np.asarray(npz[name])
    except _NPY_ERRORS as exc:
        # numpy refuses object arrays with ValueError when pickles are not allowed
        raise InputError(f"{path}: array '{name}' is not a plain numeric array ({exc})") from exc


def _load_labels(path: str) -> list[str]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: the labels file is not UTF-8 text") from exc
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise InputError(f"{path}: the labels file has no labels")
    return labels


def _load_head(path: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        npz = np.load(path, allow_pickle=False)
    except _NPY_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    if isinstance(npz, np.ndarray):
        raise InputError(f"{path}: the head must be an .npz with 'weight' and 'bias'")
    with npz:
        missing = [name for name in ("weight", "bias") if name not in npz.files]
        if missing:
            raise InputError(f"{path}: the head .npz has no array named '{missing[0]}'")
        return _npz_array(npz, "weight", path), _npz_array(npz, "bias", path)


def _engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        num_threads=args.threads, xnnpack=not args.no_xnnpack, max_batch=getattr(args, "batch", 8)
    )


def _percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect_path(args.path), indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    engine = Engine.from_file(args.bundle, _engine_options(args))
    sample = engine.canary_inputs[:1]
    for _ in range(args.warmup):
        engine.predict(sample)
    latencies = []
    started = time.perf_counter()
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        engine.predict(sample)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    batch = np.resize(engine.canary_inputs, (args.batch, *engine.sample_shape))
    t0 = time.perf_counter()
    rounds = max(1, args.iterations // args.batch)
    for _ in range(rounds):
        engine.predict(batch)
    batched = time.perf_counter() - t0
    report = {
        "model": f"{engine.manifest.name} {engine.manifest.version}",
        "runtime": engine.runtime.label,
        "threads": args.threads,
        "xnnpack": not args.no_xnnpack,
        "iterations": args.iterations,
        **_percentiles(latencies),
        "throughput_per_s": round(args.iterations / elapsed, 1),
        f"batch{args.batch}_throughput_per_s": round(rounds * args.batch / batched, 1),
    }
    print(json.dumps(report, indent=1))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    x, _ = _load_samples(args.input, labels=False)
    engine = Engine.from_file(args.bundle, _engine_options(args))
    if x.shape == engine.sample_shape:  # one sample, not a batch
        x = x[None]
    prediction = engine.predict(x)
    labels = engine.labels
    for probabilities in prediction.probabilities:
        order = np.argsort(-probabilities)[: args.top]
        print(
            json.dumps(
                {
                    "label": labels[order[0]],
                    "confidence": round(float(probabilities[order[0]]), 5),
                    "top": [[labels[i], round(float(probabilities[i]), 5)] for i in order],
                    "model_version": prediction.model_version,
                }
            )
        )
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from edged.packer import PackRequest, pack

    out = Path(args.output or f"{args.name}-{args.version}.bundle")
    if args.output and not out.parent.is_dir():  # before the packing work
        raise FileNotFoundError(errno.ENOENT, "no such directory for the bundle", str(out.parent))
    labels = _load_labels(args.labels)
    x, y = _load_samples(args.calibration)
    head = _load_head(args.head) if args.head else None
    bundle = pack(
        PackRequest(
            model=Path(args.model).read_bytes(),
            labels=labels,
            calibration=x,
            calibration_labels=y,
            name=args.name,
            version=args.version,
            parent_version=args.parent_version,
            input_scale=args.scale,
            input_offset=args.offset,
            output_kind=args.output_kind,
            embedding_output=args.embedding,
            output_name=args.output_tensor,
            head=head,
        )
    )
    try:
        atomic_write(out, bundle)
    except OSError as exc:  # name the bundle, not the temporary file beside it
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    print(f"wrote {out} ({len(bundle)} bytes)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Stream a dataset file through the engine one sample at a time, like a live source."""
    x, y = _load_samples(args.data)
    engine = Engine.from_file(args.bundle, _engine_options(args))
    if y is not None and (y.min() < 0 or y.max() >= len(engine.labels)):
        raise InputError(
            f"{args.data}: labels 'y' must be class indices from 0 to {len(engine.labels) - 1}"
        )
    from edged.replay import ForwardTo, replay

    if args.rate is not None and args.rate <= 0:
        raise InputError(f"--rate must be a positive number of samples per second, not {args.rate}")
    forward = None
    if args.forward:
        host, _, port = args.forward.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--forward {args.forward!r} is not HOST:PORT")
        forward = ForwardTo(Path(args.state_dir), host, int(port))
    result = asyncio.run(replay(engine, x, rate_hz=args.rate, forward=forward))
    latencies, top1, confidence = result.latencies_s, result.top1, result.confidence
    counts, edges = np.histogram(confidence, bins=10, range=(0.0, 1.0))
    report: dict[str, Any] = {
        "model": f"{engine.manifest.name} {engine.manifest.version}",
        "runtime": engine.runtime.label,
        "samples": len(x),
        **_percentiles(latencies),
        "accuracy": None if y is None else round(float(np.mean(np.asarray(top1) == y)), 4),
        "canary_agreement": engine.canary_agreement(),
        "confidence_histogram": {
            f"{lo:.1f}-{hi:.1f}": int(c)
            for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
        },
    }
    if result.outbox is not None and result.uplink is not None:
        report["forwarded"] = {
            "device_id": result.device_id,
            "kept_samples": result.kept_samples,
            "max_depth": result.max_depth,
            "left_in_outbox": result.outbox.depth,
            "connects": result.uplink.connects,
            "messages": result.uplink.messages,
            "records": result.uplink.records,
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"model {report['model']} on {report['runtime']}: {len(x)} samples streamed")
    if report["accuracy"] is not None:
        print(f"  accuracy      {report['accuracy']:.2%}")
    print(f"  latency       p50 {report['p50_ms']:.3f} ms, p99 {report['p99_ms']:.3f} ms")
    print(f"  canaries      {report['canary_agreement']:.0%} agree with the manifest")
    print("  confidence histogram (top-1 probability)")
    width = max(counts.max(), 1)
    for label, count in report["confidence_histogram"].items():
        print(f"    {label}  {'#' * round(40 * count / width):<40} {count}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def engine_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--threads", type=bounded_int(1, 64), default=1, help="interpreter threads (default 1)"
        )
        p.add_argument("--no-xnnpack", action="store_true", help="use the reference kernels")

    model = sub.add_parser("model", help="inspect, benchmark and pack models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = model_sub.add_parser("inspect", help="specs, ops, quantisation and sizes")
    p.add_argument("path", help="a bundle or a .tflite file")
    p.set_defaults(func=cmd_inspect)
    p = model_sub.add_parser("bench", help="latency percentiles and throughput")
    p.add_argument("bundle")
    p.add_argument("--iterations", type=positive_int, default=200)
    p.add_argument("--warmup", type=bounded_int(0), default=20)
    p.add_argument(
        "--batch", type=bounded_int(1, 1024), default=8, help="batch size for the batched figure"
    )
    engine_flags(p)
    p.set_defaults(func=cmd_bench)
    p = model_sub.add_parser("pack", help="wrap a .tflite made elsewhere into a bundle")
    p.add_argument("model", help="the .tflite file")
    p.add_argument("--labels", required=True, help="text file, one label per line")
    p.add_argument(
        "--calibration",
        required=True,
        help=".npz with raw samples 'x' (and optional labels 'y'), or .npy; required because "
        "the bundle's reference statistics (for drift detection) and its canaries (the "
        "health check after an update) are measured on it",
    )
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--parent-version")
    p.add_argument(
        "--scale", type=nonzero_float, default=1.0, help="model input = raw*scale+offset"
    )
    p.add_argument("--offset", type=finite_float, default=0.0)
    p.add_argument("--output-kind", choices=["auto", "logits", "probabilities"], default="auto")
    p.add_argument(
        "--output-tensor",
        metavar="NAME",
        help="name of the class output tensor (needed when several outputs have one value "
        "per label)",
    )
    p.add_argument("--embedding", metavar="NAME", help="name of the embedding output tensor")
    p.add_argument("--head", help=".npz with the float head's 'weight' and 'bias'")
    p.add_argument("-o", "--output", help="bundle path (default NAME-VERSION.bundle)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("predict", help="run a bundle on samples from a .npy/.npz file")
    p.add_argument("bundle")
    p.add_argument("input", help=".npy with one sample or a batch, or .npz with 'x'")
    p.add_argument("--top", type=positive_int, default=3, help="labels shown per sample")
    engine_flags(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("replay", help="stream a dataset file through a bundle and report")
    p.add_argument("bundle")
    p.add_argument("data", help=".npz with 'x' (and 'y' for accuracy)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rate", type=finite_float, help="samples per second (default: flat out)")
    p.add_argument(
        "--forward",
        metavar="HOST:PORT",
        help="send telemetry and uncertain samples through the outbox and uplink to a broker",
    )
    p.add_argument(
        "--state-dir", default="edged-state", help="device key and outbox (with --forward)"
    )
    engine_flags(p)
    p.set_defaults(func=cmd_replay)
    add_daemon_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (EdgedError, FormatError) as exc:
        print(f"edged: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        problem = exc.strerror or str(exc) or type(exc).__name__
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"edged: error: {where}{problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
