"""The OTA story `make demo` tells and the end-to-end test checks, on the digits model.

Three sites mount their camera tilted and only ever see the digits 5-9; one site sees upright
digits 0-4. Version 1.1.0 is a head-only fine-tune on labels from the tilted sites alone, with
no replay set: it reads tilted 5-9 far better (and more confidently) than 1.0.0, and it has
forgotten 0-4 — while still answering with high confidence, so only a confidence *drop* shows
it: about 0.04 of mean confidence on the upright site, under the 0.1 default. The story's fleet
policy therefore allows a drop of at most 0.02: the tilted sites commit 1.1.0, the upright site
rolls back to 1.0.0, and the rollout pauses. (Confidence cannot see accuracy: the upright site
loses every answer while confidence falls by 4 points; issue 7's local ground truth will.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_CONFIDENCE_DROP", "SITES", "site_stream", "tilted_update"]

SITES = ("tilted", "tilted", "tilted", "upright")
MAX_CONFIDENCE_DROP = 0.02
TILT_DEG = 30.0
NEW_VERSION = "1.1.0"


def _tilted(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    from control_plane.toolchain.datasets import rotated

    return rotated(x, TILT_DEG)


def site_stream(site: str, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """What a site's camera sends: tilted 5-9, or upright 0-4."""
    if site == "tilted":
        return _tilted(x[y >= 5])
    return x[y < 5]


def tilted_update(base: bytes, samples: int = 300) -> bytes:
    """1.1.0: the head fine-tuned on `samples` tilted 5-9 training digits, no replay."""
    from control_plane.toolchain.datasets import digits_dataset
    from control_plane.toolchain.head_update import train_head
    from edged.engine import Engine, EngineOptions
    from edged.finetune.export import head_updated_bundle
    from edged_formats import read_bundle

    bundle = read_bundle(base)
    data = digits_dataset()
    wanted = data.y_train >= 5
    x, y = _tilted(data.x_train[wanted][:samples]), data.y_train[wanted][:samples]
    embeddings = Engine(bundle, EngineOptions()).predict(x).embeddings
    head = bundle.head_weights()
    assert embeddings is not None and head is not None, "the digits bundle names its head"
    weight, bias = train_head(*head, embeddings, np.asarray(y), 1e-2)
    return head_updated_bundle(bundle, weight, bias, data.x_val, NEW_VERSION)
