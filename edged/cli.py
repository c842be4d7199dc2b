"""The `edged` command line: model tools now, the daemon's commands as they land."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged import __version__
from edged.engine import Engine, EngineOptions
from edged.errors import EdgedError, InputError
from edged.inspection import inspect_path

__all__ = ["main"]


def _load_samples(
    path: str, sample_shape: tuple[int, ...] | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """Samples (and labels, if the file has `y`) from .npy or .npz (`x`, optional `y`)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy/.npz file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        with loaded:
            if "x" not in loaded:
                raise InputError(f"{path}: the .npz has no array named 'x'")
            x, y = loaded["x"], loaded.get("y", None)
    if sample_shape is not None and x.shape == sample_shape:
        x = x[None]
    return x, y


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
    engine = Engine.from_file(args.bundle, _engine_options(args))
    x, _ = _load_samples(args.input, engine.sample_shape)
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

    labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    x, y = _load_samples(args.calibration)
    head = None
    if args.head:
        with np.load(args.head) as npz:
            head = (npz["weight"], npz["bias"])
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
            head=head,
        )
    )
    out = Path(args.output or f"{args.name}-{args.version}.bundle")
    out.write_bytes(bundle)
    print(f"wrote {out} ({len(bundle)} bytes)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Stream a dataset file through the engine one sample at a time, like a live source."""
    engine = Engine.from_file(args.bundle, _engine_options(args))
    x, y = _load_samples(args.data)
    latencies, top1, confidence = [], [], []
    for sample in x:
        t0 = time.perf_counter()
        prediction = engine.predict(sample[None])
        latencies.append(time.perf_counter() - t0)
        top1.append(int(prediction.top1[0]))
        confidence.append(float(prediction.confidence[0]))
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
        p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
        p.add_argument("--no-xnnpack", action="store_true", help="use the reference kernels")

    model = sub.add_parser("model", help="inspect, benchmark and pack models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = model_sub.add_parser("inspect", help="specs, ops, quantisation and sizes")
    p.add_argument("path", help="a bundle or a .tflite file")
    p.set_defaults(func=cmd_inspect)
    p = model_sub.add_parser("bench", help="latency percentiles and throughput")
    p.add_argument("bundle")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="batch size for the batched figure")
    engine_flags(p)
    p.set_defaults(func=cmd_bench)
    p = model_sub.add_parser("pack", help="wrap a .tflite made elsewhere into a bundle")
    p.add_argument("model", help="the .tflite file")
    p.add_argument("--labels", required=True, help="text file, one label per line")
    p.add_argument(
        "--calibration",
        required=True,
        help=".npz with raw samples 'x' (and optional labels 'y'), or .npy",
    )
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--parent-version")
    p.add_argument("--scale", type=float, default=1.0, help="model input = raw*scale+offset")
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--output-kind", choices=["auto", "logits", "probabilities"], default="auto")
    p.add_argument("--embedding", help="name of the embedding output tensor")
    p.add_argument("--head", help=".npz with the float head's 'weight' and 'bias'")
    p.add_argument("-o", "--output", help="bundle path (default NAME-VERSION.bundle)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("predict", help="run a bundle on samples from a .npy/.npz file")
    p.add_argument("bundle")
    p.add_argument("input", help=".npy with one sample or a batch, or .npz with 'x'")
    p.add_argument("--top", type=int, default=3)
    engine_flags(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("replay", help="stream a dataset file through a bundle and report")
    p.add_argument("bundle")
    p.add_argument("data", help=".npz with 'x' (and 'y' for accuracy)")
    p.add_argument("--json", action="store_true")
    engine_flags(p)
    p.set_defaults(func=cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgedError as exc:
        print(f"edged: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edged: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
