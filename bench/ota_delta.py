"""OTA delta benchmark: a head-only fine-tune shipped as a zstd patch-from delta.

Value: the size of the delta (`edged.ota.delta.make_patch`, level 19) that rebuilds the
fine-tuned MobileNetV2-int8-224 bundle from its base bundle, in bytes. Baseline: the size of the
full fine-tuned bundle (.edb), the bytes a device downloads without a delta. The same is
measured for the digits reference model (`digits_*` metrics).

The fine-tune changes the classifier head and nothing else: softmax regression from the
bundle's float head on embeddings of the base int8 model (SGD, momentum 0.9, 20 epochs, batch
32; lr 1e-3 for digits, 1e-2 for MobileNetV2) over 300 new labelled samples plus 300 replay
samples, moving only the rows (weights and bias) of the classes the labels name: the other
rows keep their float weights bit for bit, so their int8 bytes do not change and the delta
carries only the rows that learnt (MobileNetV2: 14 of its 1000 classes; digits: all 10).
`fine_tune.dense` is the MobileNetV2 fine-tune with every row moving, for comparison: a softmax
regression step pushes every absent class's row down a little, which changes 82 % of the int8
head and makes a delta of over half the bundle for no gain in fit.
Digits: the new samples are training digits rotated by 30° (as in `make demo`), the
replay samples clean training digits; the tuned model's accuracy on rotated and clean held-out
digits is reported. MobileNetV2 has random weights and random images, so its new labels are
random classes 0-9 and its replay samples keep the base model's own top-1. The tuned head is
re-quantised and written into the base .tflite in place (`control_plane.toolchain.head_patch`:
only the head's int8 weight, int32 bias, their scales and the logits' scale and zero point
change, the latter re-calibrated on the calibration samples), and the bundle is rebuilt with
`edged_formats.write_bundle`: new `model.tflite` and `head.npz` (the float head the bundle
carries for on-device fine-tuning), the same labels and canary inputs, and a manifest with the
new version, parent version, member digests, canary top-1 and confidence reference re-measured
on the packer's calibration samples. `*_member_delta_bytes` splits the delta by member (each
member patched against its own parent), which shows what the bundle format costs.

`apply_s`: median wall time of `apply_patch` (in process, after a warm-up). `apply_peak_mb`:
peak RSS increase of a fresh process while it applies the MobileNetV2 patch (VmHWM reset
through /proc/self/clear_refs after parent and patch are read; median of fresh processes);
it includes zstd's C allocations. `apply_traced_peak_mb` is tracemalloc's peak (Python
allocations only) for comparison. `verify_ms`: a real trust walk with `edged_formats.tuf`
(TrustedSet: root, timestamp, snapshot, targets, one ed25519 signature each, lengths and
hashes; the target lookup; the patch's sha256; then the rebuilt artifact's length and sha256),
median of repetitions, for MobileNetV2's 10 MB bundle; `verify_hash_ms` is the artifact hash
alone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from bench.common import REPO, Result, conditions, median
from control_plane.toolchain.head_update import train_head
from edged.finetune.export import head_updated_bundle
from edged.ota.delta import apply_patch, make_patch
from edged_formats import Bundle, read_bundle

__all__ = ["run"]

NEW_SAMPLES = 300
REPLAY_SAMPLES = 300
EPOCHS = 20
BATCH = 32
# Per model, so each fine-tune learns: digits recovers most of the rotation's accuracy loss;
# MobileNetV2's embeddings are smaller (ReLU6 of a random net), 1e-3 barely moves its head.
LR = {"digits": 1e-3, "mobilenetv2": 1e-2}
MOMENTUM = 0.9
ROTATION_DEG = 30.0
LEVEL = 19
APPLY_REPETITIONS = 9
SPAWNS = 5
VERIFY_REPETITIONS = 25
MIB = 1 << 20
NOW = 1_800_000_000  # the trust walk's fixed clock
TARGETS = {"digits_ratio": "digits_ratio <= 0.05"}

# A fresh process: read parent and patch, reset the peak-RSS mark, apply, report the peak.
_APPLY_CHILD = """
import json, sys
from pathlib import Path
from edged.ota.delta import apply_patch
parent, patch = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
cap = int(sys.argv[3])
apply_patch(parent, patch, max_output=cap)  # warm: code paths and allocator arenas
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
out = apply_patch(parent, patch, max_output=cap)
print(json.dumps({"rss_kb": before, "hwm_kb": status("VmHWM:"), "bytes": len(out)}))
"""


@dataclass(frozen=True)
class _Case:
    """A base bundle, its head-only fine-tuned successor, and what the fine-tune did."""

    name: str
    base: bytes
    target: bytes
    tune: dict[str, float]


# -- the fine-tune ------------------------------------------------------------------------------


def _rotated(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Digits rotated (bilinear), rounded and clipped to 0..16, as `make demo` rotates them."""
    from scipy.ndimage import rotate

    turned = np.stack(
        [np.rint(rotate(d.astype(np.float32), ROTATION_DEG, reshape=False, order=1)) for d in x]
    )
    return np.clip(turned, 0, 16).astype(x.dtype)


def _digits_case() -> _Case:
    from bench.pipeline import _digits  # the same cached digits build the pipeline uses
    from control_plane.toolchain.datasets import digits_dataset
    from edged.engine import Engine, EngineOptions

    base_bytes = _digits().bundle.read_bytes()
    base = read_bundle(base_bytes)
    data = digits_dataset()
    engine = Engine(base, EngineOptions())
    new_x = _rotated(data.x_train[:NEW_SAMPLES])
    replay_x = data.x_train[NEW_SAMPLES : NEW_SAMPLES + REPLAY_SAMPLES]
    new, replay = engine.predict(new_x).embeddings, engine.predict(replay_x).embeddings
    assert new is not None and replay is not None
    embeddings = np.concatenate([new, replay])
    labels = data.y_train[: NEW_SAMPLES + REPLAY_SAMPLES]
    head = base.head_weights()
    assert head is not None
    weight, bias = train_head(
        *head,
        embeddings,
        labels,
        LR["digits"],
        epochs=EPOCHS,
        batch=BATCH,
        momentum=MOMENTUM,
        classes=np.unique(labels),
    )
    target = head_updated_bundle(base, weight, bias, data.x_val)
    tuned = Engine(read_bundle(target), EngineOptions())
    rotated_test = _rotated(data.x_test)

    def accuracy(e: Engine, x: npt.NDArray[Any]) -> float:
        return _share(e.predict(x).top1 == data.y_test)

    before = engine.predict(rotated_test).embeddings
    assert before is not None
    tune = {
        "rotated_accuracy_before": accuracy(engine, rotated_test),
        "rotated_accuracy_after": accuracy(tuned, rotated_test),
        "clean_accuracy_before": accuracy(engine, data.x_test),
        "clean_accuracy_after": accuracy(tuned, data.x_test),
        "int8_float_head_agreement": _share(
            tuned.predict(rotated_test).top1 == (before @ weight.T + bias).argmax(axis=1)
        ),
        **_head_change(base.model, read_bundle(target).model, base, head[0], weight),
    }
    return _Case("digits", base_bytes, target, tune)


def _mobilenet_case() -> _Case:
    from bench.models import CALIBRATION_SAMPLES, mobilenet_v2, raw_images
    from edged.engine import Engine, EngineOptions

    try:
        model = mobilenet_v2()
    except FileNotFoundError as exc:  # bench/models.py does not create its cache folder
        Path(str(exc.filename)).parent.mkdir(parents=True, exist_ok=True)
        model = mobilenet_v2()
    base_bytes = model.int8_bundle.read_bytes()
    base = read_bundle(base_bytes)
    engine = Engine(base, EngineOptions())
    new_x, replay_x = raw_images(NEW_SAMPLES, seed=7), raw_images(REPLAY_SAMPLES, seed=8)
    calibration = raw_images(CALIBRATION_SAMPLES)
    new, replay = engine.predict(new_x), engine.predict(replay_x)
    assert new.embeddings is not None and replay.embeddings is not None
    new_labels = np.random.default_rng(0).integers(0, 10, NEW_SAMPLES)
    embeddings = np.concatenate([new.embeddings, replay.embeddings])
    labels = np.concatenate([new_labels, replay.top1])
    head = base.head_weights()
    assert head is not None
    labelled = np.unique(labels)
    tune: dict[str, Any] = {
        "classes_trained": len(labelled),
        "new_labels_fit_before": _share(new.top1 == new_labels),
    }
    for classes in (None, labelled):  # every row moving (the comparison), then the labelled
        weight, bias = train_head(
            *head,
            embeddings,
            labels,
            LR["mobilenetv2"],
            epochs=EPOCHS,
            batch=BATCH,
            momentum=MOMENTUM,
            classes=classes,
        )
        target = head_updated_bundle(base, weight, bias, calibration)
        tuned = read_bundle(target)
        tuned_engine = Engine(tuned, EngineOptions())
        after_new, after_replay = tuned_engine.predict(new_x), tuned_engine.predict(replay_x)
        figures = {
            "new_labels_fit_after": _share(after_new.top1 == new_labels),
            "replay_kept": _share(after_replay.top1 == replay.top1),
            "int8_float_head_agreement": _share(
                after_new.top1 == (new.embeddings @ weight.T + bias).argmax(axis=1)
            ),
            **_head_change(base.model, tuned.model, base, head[0], weight),
        }
        if classes is None:
            dense_patch = make_patch(base_bytes, target, level=LEVEL)
            figures["delta_bytes"] = len(dense_patch)
            figures["ratio"] = round(len(dense_patch) / len(target), 4)
            tune["dense"] = figures
        else:
            tune |= figures
    return _Case("mobilenetv2", base_bytes, target, tune)


def _share(hits: npt.NDArray[np.bool_]) -> float:
    return round(float(np.mean(hits)), 4)


def _head_change(
    old_model: bytes,
    new_model: bytes,
    base: Bundle,
    old_weight: npt.NDArray[np.float32],
    new_weight: npt.NDArray[np.float32],
) -> dict[str, float]:
    """How much the fine-tune moved the head, and that nothing else in the .tflite moved."""
    from edged.finetune.head_patch import read_head

    name = base.manifest.output.name
    before, after = read_head(old_model, name), read_head(new_model, name)
    a, b = np.frombuffer(old_model, np.uint8), np.frombuffer(new_model, np.uint8)
    return {
        "head_weights": int(before.weight.size),
        "head_int8_changed_share": round(float(np.mean(before.weight != after.weight)), 4),
        "head_float_relative_change": round(
            float(np.abs(new_weight - old_weight).mean() / np.abs(old_weight).mean()), 4
        ),
        "tflite_bytes_changed": int(np.count_nonzero(a != b)),
        "tflite_bytes": len(old_model),
    }


# -- measurements -------------------------------------------------------------------------------


def _member_deltas(base: bytes, target: bytes) -> dict[str, int]:
    """Each changed member (and the manifest) patched against its own parent member."""
    old, new = read_bundle(base), read_bundle(target)
    deltas = {"manifest.json": len(make_patch(old.manifest.to_json(), new.manifest.to_json()))}
    for member, data in sorted(new.members.items()):
        if data != old.members[member]:
            deltas[member] = len(make_patch(old.members[member], data, level=LEVEL))
    return deltas


def _apply_times(parent: bytes, patch: bytes, cap: int) -> float:
    apply_patch(parent, patch, max_output=cap)
    times = []
    for _ in range(APPLY_REPETITIONS):
        started = time.perf_counter()
        apply_patch(parent, patch, max_output=cap)
        times.append(time.perf_counter() - started)
    return median(times)


def _traced_peak_mb(parent: bytes, patch: bytes, cap: int) -> float:
    tracemalloc.start()
    try:
        apply_patch(parent, patch, max_output=cap)
        return tracemalloc.get_traced_memory()[1] / MIB
    finally:
        tracemalloc.stop()


def _rss_peak_mb(parent: bytes, patch: bytes, cap: int) -> dict[str, float]:
    """Peak RSS increase while a fresh process applies the patch (median of SPAWNS)."""
    with tempfile.TemporaryDirectory(prefix="edged-bench-ota-") as tmp:
        parent_path, patch_path = Path(tmp) / "parent", Path(tmp) / "patch"
        parent_path.write_bytes(parent)
        patch_path.write_bytes(patch)
        peaks, floors = [], []
        for _ in range(SPAWNS):
            out = subprocess.run(
                [sys.executable, "-c", _APPLY_CHILD, str(parent_path), str(patch_path), str(cap)],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            report = json.loads(out.stdout.strip().splitlines()[-1])
            assert report["bytes"] == cap
            peaks.append((report["hwm_kb"] - report["rss_kb"]) / 1024)
            floors.append(report["rss_kb"] / 1024)
    return {"peak_mb": median(peaks), "process_rss_before_mb": median(floors)}


def _verify_ms(cases: list[_Case], patches: dict[str, bytes]) -> dict[str, float]:
    """A device's trust walk over real signed metadata, ending in the rebuilt MobileNetV2
    artifact's checks; and the artifact's sha256 alone."""
    from edged_formats.tuf import (
        ROLES,
        Repository,
        SigningKey,
        TargetFile,
        TrustedSet,
        check_bytes,
        metadata_path,
        new_root,
        sign,
    )

    keys = {role: [SigningKey.generate()] for role in ROLES}
    root = sign(new_root(1, NOW + 365 * 86_400, keys), keys["root"])
    repo = Repository([root], keys)
    targets: dict[str, TargetFile] = {}
    for case in cases:
        old, new = read_bundle(case.base).manifest, read_bundle(case.target).manifest
        folder = f"models/{old.name}"
        base_sha = hashlib.sha256(case.base).hexdigest()
        patch = patches[case.name]
        common = {"model": old.name, "hardware": ["any"], "channel": "stable"}
        targets[f"{folder}/{old.version}.edb"] = TargetFile(
            f"{folder}/{old.version}.edb",
            len(case.base),
            base_sha,
            common | {"version": old.version},
        )
        targets[f"{folder}/{new.version}.edb"] = TargetFile(
            f"{folder}/{new.version}.edb",
            len(case.target),
            hashlib.sha256(case.target).hexdigest(),
            common
            | {
                "version": new.version,
                "parent": old.version,
                "patches": {
                    base_sha: {
                        "name": f"patches/{old.name}/{old.version}-{new.version}.zst",
                        "length": len(patch),
                        "hashes": {"sha256": hashlib.sha256(patch).hexdigest()},
                    }
                },
            },
        )
    files = repo.publish(targets, NOW) | repo.files()
    case = next(c for c in cases if c.name == "mobilenetv2")
    tuned = read_bundle(case.target).manifest
    name = f"models/{tuned.name}/{tuned.version}.edb"
    base_sha = hashlib.sha256(case.base).hexdigest()
    rebuilt = apply_patch(case.base, patches[case.name], max_output=len(case.target))

    def walk() -> None:
        trusted = TrustedSet(root, NOW + 60)
        timestamp = trusted.update_timestamp(files[metadata_path("timestamp")])
        snapshot = trusted.update_snapshot(
            files[metadata_path("snapshot", timestamp.snapshot.version)]
        )
        trusted.update_targets(files[metadata_path("targets", snapshot.targets.version)])
        target = trusted.target(name, "rpi4", "stable")
        entry = target.patches[base_sha]
        check_bytes(patches[case.name], entry.length, entry.sha256, "patch")
        trusted.check_artifact(target, rebuilt)

    walk()
    walks, hashes = [], []
    for _ in range(VERIFY_REPETITIONS):
        started = time.perf_counter()
        walk()
        walks.append(time.perf_counter() - started)
        started = time.perf_counter()
        hashlib.sha256(rebuilt).hexdigest()
        hashes.append(time.perf_counter() - started)
    targets_bytes = files[metadata_path("targets", 1)]
    return {
        "verify_ms": round(1000 * median(walks), 3),
        "verify_hash_ms": round(1000 * median(hashes), 3),
        "verify_targets_json_bytes": len(targets_bytes),
    }


def _measure(case: _Case) -> tuple[bytes, dict[str, Any]]:
    started = time.perf_counter()
    patch = make_patch(case.base, case.target, level=LEVEL)
    make_s = time.perf_counter() - started
    cap = len(case.target)
    if apply_patch(case.base, patch, max_output=cap) != case.target:
        raise SystemExit(f"{case.name}: the patch does not rebuild the target")
    full_zstd = zstandard.ZstdCompressor(level=LEVEL).compress(case.target)
    figures: dict[str, Any] = {
        "delta_bytes": len(patch),
        "full_bytes": cap,
        "ratio": round(len(patch) / cap, 4),
        "full_zstd19_bytes": len(full_zstd),
        "member_delta_bytes": _member_deltas(case.base, case.target),
        "member_bytes": {
            name: len(data) for name, data in sorted(read_bundle(case.target).members.items())
        },
        "make_s": round(make_s, 3),
        "apply_s": round(_apply_times(case.base, patch, cap), 5),
        "apply_traced_peak_mb": round(_traced_peak_mb(case.base, patch, cap), 2),
        "fine_tune": case.tune,
    }
    return patch, figures


def run() -> Result:
    cases = [_digits_case(), _mobilenet_case()]
    patches, figures = {}, {}
    for case in cases:
        patches[case.name], figures[case.name] = _measure(case)
    big, small = figures["mobilenetv2"], figures["digits"]
    big_case = cases[1]
    rss = _rss_peak_mb(big_case.base, patches["mobilenetv2"], len(big_case.target))
    verify = _verify_ms(cases, patches)
    metrics = {
        "apply_s": big["apply_s"],
        "apply_peak_mb": round(rss["peak_mb"], 2),
        "apply_traced_peak_mb": big["apply_traced_peak_mb"],
        **verify,
        "digits_ratio": small["ratio"],
        "digits_delta_bytes": small["delta_bytes"],
        "digits_full_bytes": small["full_bytes"],
        "digits_apply_s": small["apply_s"],
        "apply_process_rss_before_mb": round(rss["process_rss_before_mb"], 1),
        "make_s": big["make_s"],
        "full_zstd19_bytes": big["full_zstd19_bytes"],
        "digits_full_zstd19_bytes": small["full_zstd19_bytes"],
        "member_delta_bytes": big["member_delta_bytes"],
        "member_bytes": big["member_bytes"],
        "digits_member_delta_bytes": small["member_delta_bytes"],
        "digits_member_bytes": small["member_bytes"],
        "fine_tune": big["fine_tune"],
        "digits_fine_tune": small["fine_tune"],
    }
    return Result(
        name="ota_delta",
        value=float(big["delta_bytes"]),
        unit="bytes",
        baseline=float(big["full_bytes"]),
        baseline_is="the full fine-tuned MobileNetV2-int8-224 bundle (.edb) a device downloads "
        "without a delta",
        target="ratio <= 0.05",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            model="mobilenetv2-int8-224 (random weights) and digits-cnn (reference build)",
            fine_tune=f"head only: SGD momentum {MOMENTUM}, lr {LR}, {EPOCHS} epochs, batch "
            f"{BATCH}, {NEW_SAMPLES} new + {REPLAY_SAMPLES} replay samples; only the rows of "
            "the classes the labels name move (fine_tune.classes_trained), "
            "fine_tune.dense is MobileNetV2 with every row moving",
            patch=f"zstd patch-from level {LEVEL}, long-distance matching, window covering "
            "parent and target",
            zstandard=f"{zstandard.__version__} (libzstd "
            f"{'.'.join(map(str, zstandard.ZSTD_VERSION))})",
            apply_repetitions=APPLY_REPETITIONS,
            spawns=SPAWNS,
            verify_repetitions=VERIFY_REPETITIONS,
            apply_peak_mb_is="peak RSS increase of a fresh process during apply (VmHWM after "
            "clear_refs), median",
        ),
    )
