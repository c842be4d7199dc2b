"""A fine-tuned model as a bundle: the base bundle with a new classifier head (and, when the
block was trained, a new last block) patched into its .tflite in place (head_patch) and a
manifest that is true for the new model (version and parent, member digests, canary top-1 and
the confidence reference re-measured on calibration samples). The cloud's head-only OTA
updates and the device's fine-tuning both export through it; the device's candidates also
carry their `personalisation` lineage (the base's version and sha256, the label count, the
device). A trained block's output (the embedding) is re-calibrated to the range the new block
gives on the calibration samples, as the quantizer calibrated it for the base; the head's bias
is then quantised at that new scale. numpy and LiteRT only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.engine import Engine, EngineOptions
from edged.finetune.activations import tensor_values
from edged.finetune.head_patch import fc_outputs, patch_fc, patch_head, read_fc
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
    block: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None,
) -> bytes:
    """The base bundle with the new head (and `block`'s weight and bias, when given, in the
    op producing the embedding: the manifest must allow it) patched in place, outputs
    re-calibrated on the calibration samples, and the manifest brought up to date: `version`
    (else the next minor), `parent_version` the base's, and `personalisation` as given (None
    keeps the base's, which for a cloud base is none)."""
    members = dict(base.members)
    model = base.model
    if block is None:
        embeddings = Engine(base, EngineOptions()).predict(calibration).embeddings
        assert embeddings is not None
    else:
        spec = base.manifest.block
        if spec is None:
            raise ValueError("the base bundle does not allow its last block to be trained")
        op = read_fc(model, spec.output)
        inputs = tensor_values(base, op.input_name, calibration)
        embeddings = fc_outputs(inputs, block[0], block[1], op.activation)
        model = patch_fc(
            model,
            spec.output,
            block[0],
            block[1],
            output_range=(float(embeddings.min()), float(embeddings.max())),
        )
        if spec.member is not None:
            members[spec.member] = dump_npz(weight=block[0], bias=block[1])
    logits = embeddings @ weight.T + bias
    members["model.tflite"] = patch_head(
        model,
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
