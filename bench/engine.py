"""Engine benchmark: edged's per-sample cost against a bare LiteRT invoke loop.

Value: `Engine.predict` on one raw uint8 MobileNetV2-int8-224 sample (fused preprocessing and
quantisation, invoke, dequantised logits and embedding, softmax), in ms/sample. Baseline: a
separately created `ai_edge_litert` Interpreter of the same .tflite, same threads, XNNPACK on,
fed a pre-quantised int8 sample: `set_tensor; invoke; get_tensor(output)`. Engine, bare and
float-engine rounds alternate (rotating which goes first), and each figure is the median of
the rounds' means. `overhead_us` is the median difference of back-to-back engine/bare pairs,
the engine's own cost in a form that a loaded machine disturbs least.

Start-up figures come from fresh processes: wall time from spawn to the first printed result,
and the RSS once the bundle is loaded (the engine warms up on load). The same is measured for
a bare "numpy + LiteRT, load, invoke once" process, the floor edged cannot go below.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import REPO, Result, conditions, median, percentile
from bench.models import INPUT_OFFSET, INPUT_SCALE, BenchModel, mobilenet_v2, raw_images
from edged.engine import Engine, EngineOptions, open_bundle

__all__ = ["run"]

THREADS = 1
ROUNDS = 9
INT8_ITERATIONS = 150  # per round; short rounds follow a shared machine's load swings
FLOAT_ITERATIONS = 30
PAIRS = 300
SPAWNS = 5
TARGETS = {
    "rss_mb": "rss_mb <= 60",
    "first_inference_s": "first_inference_s <= 1",
    "int8_vs_float_size": "int8_vs_float_size <= 0.30",
}

# Fresh-process start-up: prints the first result, then its timings and memory as JSON.
_ENGINE_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from edged.engine import Engine
t1 = time.perf_counter()
engine = Engine.from_file(sys.argv[1])
t2 = time.perf_counter()
top1 = int(engine.predict(np.full((1, *engine.sample_shape), 128, np.uint8)).top1[0])
t3 = time.perf_counter()
print(top1, flush=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2,
                  "rss_kb": int(status["VmRSS"].split()[0]),
                  "hwm_kb": int(status["VmHWM"].split()[0])}))
"""
_FLOOR_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from ai_edge_litert.interpreter import Interpreter
t1 = time.perf_counter()
it = Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
t2 = time.perf_counter()
detail = it.get_input_details()[0]
it.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
it.invoke()
top1 = int(it.get_tensor(it.get_output_details()[0]["index"]).argmax())
t3 = time.perf_counter()
print(top1, flush=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2,
                  "rss_kb": int(status["VmRSS"].split()[0]),
                  "hwm_kb": int(status["VmHWM"].split()[0])}))
"""


def run() -> Result:
    """Measure the engine against the bare loop, then start-up in fresh processes."""
    model = mobilenet_v2()
    sample = raw_images(1, seed=1)
    options = EngineOptions(num_threads=THREADS)
    engine = Engine(open_bundle(model.int8_bundle), options)
    float_engine = Engine(open_bundle(model.float_bundle), options)
    bare = _bare_loop(model.int8_tflite.read_bytes(), sample)
    rounds = _interleaved(
        {
            "engine": (lambda: engine.predict(sample), INT8_ITERATIONS),
            "bare": (bare, INT8_ITERATIONS),
            "float": (lambda: float_engine.predict(sample), FLOAT_ITERATIONS),
        }
    )
    engine_ms, bare_ms, float_ms = (median([_mean(r) for r in rounds[k]]) for k in rounds)
    engine_calls = [ms for r in rounds["engine"] for ms in r]
    bare_calls = [ms for r in rounds["bare"] for ms in r]
    per_round = [_mean(e) / _mean(b) for e, b in zip(rounds["engine"], rounds["bare"], strict=True)]
    int8_bytes, float_bytes = model.int8_tflite.stat().st_size, model.float_tflite.stat().st_size
    metrics = {
        "p50_ms": round(percentile(engine_calls, 50), 4),
        "p99_ms": round(percentile(engine_calls, 99), 4),
        "bare_p50_ms": round(percentile(bare_calls, 50), 4),
        "bare_p99_ms": round(percentile(bare_calls, 99), 4),
        "ratio_min": round(min(per_round), 4),
        "ratio_max": round(max(per_round), 4),
        "overhead_us": round(_paired_overhead_us(lambda: engine.predict(sample), bare), 1),
        "float_ms": round(float_ms, 4),
        "int8_vs_float_latency": round(engine_ms / float_ms, 4),
        "int8_bytes": int8_bytes,
        "float_bytes": float_bytes,
        "int8_vs_float_size": round(int8_bytes / float_bytes, 4),
        **_startup(_ENGINE_CHILD, model.int8_bundle),
        **{f"floor_{k}": v for k, v in _startup(_FLOOR_CHILD, model.int8_tflite).items()},
    }
    return Result(
        name="engine",
        value=round(engine_ms, 4),
        unit="ms/sample",
        baseline=round(bare_ms, 4),
        baseline_is=(
            "bare ai_edge_litert Interpreter set_tensor/invoke/get_tensor loop, same int8 model, "
            "same threads, XNNPACK default, pre-quantised input"
        ),
        target="ratio <= 1.10",
        metrics=metrics,
        targets=TARGETS,
        conditions=_conditions(model),
    )


def _bare_loop(tflite: bytes, raw: npt.NDArray[np.uint8]) -> Callable[[], Any]:
    """The baseline: one invoke of a plain interpreter on an already-quantised sample."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=THREADS)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    values = (raw.astype(np.float64) * INPUT_SCALE + INPUT_OFFSET) / scale + zero_point
    quantised = np.clip(np.rint(values), -128, 127).astype(detail["dtype"])
    (output,) = [d for d in interpreter.get_output_details() if int(np.prod(d["shape"])) == 1000]
    set_tensor, invoke, get_tensor = (
        interpreter.set_tensor,
        interpreter.invoke,
        interpreter.get_tensor,
    )
    input_index, output_index = detail["index"], output["index"]

    def call() -> Any:
        set_tensor(input_index, quantised)
        invoke()
        return get_tensor(output_index)

    return call


def _interleaved(calls: dict[str, tuple[Callable[[], Any], int]]) -> dict[str, list[list[float]]]:
    """Per-call milliseconds for each callable, ROUNDS rounds each, rotating the order."""
    names = list(calls)
    for fn, _ in calls.values():  # warm-up outside the measurement
        for _ in range(5):
            fn()
    rounds: dict[str, list[list[float]]] = {name: [] for name in names}
    for index in range(ROUNDS):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, iterations = calls[name]
            rounds[name].append(_time_calls(fn, iterations))
    return rounds


def _time_calls(fn: Callable[[], Any], iterations: int) -> list[float]:
    gc.collect()
    clock = time.perf_counter_ns
    times = []
    for _ in range(iterations):
        start = clock()
        fn()
        times.append((clock() - start) / 1e6)
    return times


def _paired_overhead_us(engine: Callable[[], Any], bare: Callable[[], Any]) -> float:
    """Median of (engine call − bare call) over back-to-back pairs, in µs: the engine's own
    cost, robust to the slow swings of a shared machine that move whole rounds."""
    clock = time.perf_counter_ns
    gc.collect()
    differences = []
    for index in range(PAIRS):
        timed: dict[str, float] = {}
        order = (("engine", engine), ("bare", bare))
        for name, fn in order if index % 2 else order[::-1]:
            start = clock()
            fn()
            timed[name] = (clock() - start) / 1e3
        differences.append(timed["engine"] - timed["bare"])
    return median(differences)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _startup(child: str, model: Path) -> dict[str, float]:
    """Median over SPAWNS fresh processes: spawn → first result, and memory once loaded."""
    runs = [_spawn(child, model) for _ in range(SPAWNS)]
    return {
        "first_inference_s": round(median([r["first_inference_s"] for r in runs]), 4),
        "rss_mb": round(median([r["rss_kb"] for r in runs]) / 1024, 2),
        "rss_peak_mb": round(median([r["hwm_kb"] for r in runs]) / 1024, 2),
        "startup_import_s": round(median([r["import_s"] for r in runs]), 4),
        "startup_load_s": round(median([r["load_s"] for r in runs]), 4),
        "startup_predict_s": round(median([r["predict_s"] for r in runs]), 4),
    }


def _spawn(child: str, model: Path) -> dict[str, float]:
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", child, str(model)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first_line = process.stdout.readline()
        first_inference_s = time.perf_counter() - started
        rest, errors = process.stdout.read(), process.stderr.read()  # both tiny
    if process.returncode != 0 or not first_line.strip():
        raise RuntimeError(f"start-up child failed ({process.returncode}): {errors.strip()}")
    return {"first_inference_s": first_inference_s, **json.loads(rest)}


def _conditions(model: BenchModel) -> dict[str, Any]:
    return conditions(
        model="mobilenetv2-int8-224",
        model_weights="random (torch seed 0), BatchNorm statistics from 32 random images",
        threads=THREADS,
        xnnpack=True,
        repetitions=ROUNDS,
        iterations_per_round=INT8_ITERATIONS,
        float_iterations_per_round=FLOAT_ITERATIONS,
        overhead_pairs=PAIRS,
        startup_spawns=SPAWNS,
        page_cache="warm",
        model_build_s=round(model.build_s.get("total_s", float("nan")), 2),
        model_built_this_run=model.built_now,
    )
