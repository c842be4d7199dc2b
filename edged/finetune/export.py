"""A head-only model update as a bundle: the base bundle with a new classifier head patched
into its .tflite in place (head_patch) and a manifest that is true for the new model (version
and parent, member digests, canary top-1 and the confidence reference re-measured on
calibration samples). The cloud's head-only OTA updates and the device's fine-tuning both
export through it; the device's candidates also carry their `personalisation` lineage (the
base's version and sha256, the label count, the device). numpy and LiteRT only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.engine import Engine, EngineOptions
from edged.finetune.head_patch import patch_head
from edged.packer import reference_statistics
from edged_formats import Bundle, Personalisation, read_bundle, write_bundle
from edged_formats.bundle import digest_members, dump_npz

__all__ = ["head_updated_bundle"]


def head_updated_bundle(
    base: Bundle,
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    calibration: npt.NDArray[Any],
    version: str | None = None,
    *,
    personalisation: Personalisation | None = None,
) -> bytes:
    """The base bundle with the new head patched in place (logits re-calibrated on the
    calibration samples' embeddings) and the manifest brought up to date: `version` (else the
    next minor), `parent_version` the base's, and `personalisation` as given (None keeps the
    base's, which for a cloud base is none)."""

    embeddings = Engine(base, EngineOptions()).predict(calibration).embeddings
    assert embeddings is not None
    logits = embeddings @ weight.T + bias
    members = dict(base.members)
    members["model.tflite"] = patch_head(
        base.model,
        base.manifest.output.name,
        weight,
        bias,
        logit_range=(float(logits.min()), float(logits.max())),
    )
    members["head.npz"] = dump_npz(weight=weight, bias=bias)
    manifest = dataclasses.replace(
        base.manifest,
        version=version or _next_version(base.manifest.version),
        parent_version=base.manifest.version,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        members=digest_members(members),
        personalisation=personalisation or base.manifest.personalisation,
    )
    draft = read_bundle(write_bundle(manifest, members))
    engine = Engine(draft, EngineOptions())
    canaries = engine.predict(draft.canary_inputs).top1
    probabilities = engine.predict(calibration).probabilities
    manifest = dataclasses.replace(
        manifest,
        canaries=dataclasses.replace(
            manifest.canaries, expected_top1=tuple(int(i) for i in canaries)
        ),
        reference=reference_statistics(calibration, probabilities),
    )
    return write_bundle(manifest, members)


def _next_version(version: str) -> str:
    major, minor, *_ = [*version.split("."), "0", "0"]
    return f"{major}.{int(minor) + 1}.0"
