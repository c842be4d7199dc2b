"""Model bundles: one uncompressed tar per model version, read and written as bytes.

A bundle holds `manifest.json` (first), `model.tflite`, the labels file, the canary inputs and,
for fine-tunable models, the float classifier head and the replay set. `read_bundle` checks
everything that can be checked without an interpreter and returns the members in memory;
nothing touches the disk, so a refused bundle leaves nothing behind. Checks that need the
model's tensors (shapes, dtypes) belong to the engine that loads it.
"""

from __future__ import annotations

import importlib
import io
import math
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edged_formats.errors import BundleError, FormatError
from edged_formats.manifest import _MEMBER, Manifest, MemberDigest

__all__ = [
    "MANIFEST_MEMBER",
    "Bundle",
    "BundleLimits",
    "check_replay",
    "digest_members",
    "dump_npy",
    "dump_npz",
    "load_npy",
    "load_npz",
    "read_bundle",
    "write_bundle",
]

MANIFEST_MEMBER = "manifest.json"
TFLITE_IDENTIFIER = b"TFL3"
MIB = 1 << 20
# A replay set is class-balanced when every class appears and the largest class has at most
# this many times the samples of the smallest (docs/bundle-format.md).
REPLAY_MAX_IMBALANCE = 2


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """Bounds a bundle must stay within before any member is read."""

    max_member_bytes: int = 256 * MIB
    max_total_bytes: int = 512 * MIB
    max_members: int = 16
    max_manifest_bytes: int = 4 * MIB


@dataclass(frozen=True, slots=True)
class Bundle:
    """A checked bundle: the manifest and every member's bytes."""

    manifest: Manifest
    members: Mapping[str, bytes]

    @property
    def model(self) -> bytes:
        return self.members["model.tflite"]

    @property
    def labels(self) -> tuple[str, ...]:
        return _parse_labels(self.members[self.manifest.output.labels_member])

    @property
    def canary_inputs(self) -> npt.NDArray[np.generic]:
        return load_npy(self.members[self.manifest.canaries.member], "bundle canaries member")

    def head_weights(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """The float classifier head as (weight [classes, embedding], bias [classes])."""
        if self.manifest.head is None:
            return None
        arrays = load_npz(
            self.members[self.manifest.head.member], "bundle head member", ("weight", "bias")
        )
        return arrays["weight"].astype(np.float32), arrays["bias"].astype(np.float32)

    def block_weights(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """The float weights of the trainable last block as (weight [embedding, inputs], bias
        [embedding]) when the bundle ships them (`block.member`), else None."""
        block = self.manifest.block
        if block is None or block.member is None:
            return None
        arrays = load_npz(self.members[block.member], "bundle block member", ("weight", "bias"))
        return arrays["weight"].astype(np.float32), arrays["bias"].astype(np.float32)

    def replay(self) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]] | None:
        """The replay set as (x raw inputs [n, *input shape without batch], y class indices
        [n] int64), checked by `read_bundle`; None when the bundle has none."""
        if self.manifest.replay is None:
            return None
        arrays = load_npz(
            self.members[self.manifest.replay.member], "bundle replay member", ("x", "y")
        )
        return arrays["x"], arrays["y"].astype(np.int64)

    @property
    def sha256(self) -> str:
        """Digest of the manifest, which pins every member: the bundle's identity."""
        return _sha256(self.manifest.to_json())


def digest_members(members: Mapping[str, bytes]) -> dict[str, MemberDigest]:
    """The manifest's `members` table for these member bytes."""
    return {
        name: MemberDigest(sha256=_sha256(data), size=len(data)) for name, data in members.items()
    }


def _sha256(data: bytes) -> str:
    """Hex SHA-256 of `data`: OpenSSL's when the process has loaded it already (hashlib, ssl),
    else CPython's built-in one. Loading OpenSSL only to check a bundle would cost a process
    that just serves a model 3.4 MB of resident memory (libcrypto's pages) for a digest about
    7x faster (x86 with SHA extensions: 63 against 9 ms for a 10 MB bundle)."""
    return _sha256_constructor()(data).hexdigest()  # type: ignore[no-any-return]


def _sha256_constructor() -> Callable[[bytes], Any]:
    if "_hashlib" not in sys.modules:
        for module in ("_sha256", "_sha2"):  # the built-in implementation: CPython 3.11, 3.12+
            try:
                return importlib.import_module(module).sha256  # type: ignore[no-any-return]
            except (ImportError, AttributeError):
                continue
    import hashlib  # OpenSSL is loaded already, or there is no built-in implementation

    return hashlib.sha256


def write_bundle(manifest: Manifest, members: Mapping[str, bytes]) -> bytes:
    """Archive a manifest and its members; deterministic bytes for the same input."""
    if dict(digest_members(members)) != dict(manifest.members):
        raise BundleError("bundle members do not match the manifest's member table")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(MANIFEST_MEMBER, manifest.to_json()), *sorted(members.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    bundle = buffer.getvalue()
    read_bundle(bundle)  # never write what we would refuse to read
    return bundle


def read_bundle(data: bytes, limits: BundleLimits | None = None) -> Bundle:
    """Check a bundle archive and return its contents, or raise one `BundleError`."""
    limits = limits or BundleLimits()
    if len(data) > limits.max_total_bytes:
        raise BundleError(
            f"bundle is {len(data)} bytes, over the {limits.max_total_bytes}-byte limit"
        )
    members = _read_members(data, limits)
    if MANIFEST_MEMBER not in members:
        raise BundleError("bundle has no manifest.json")
    try:
        manifest = Manifest.from_json(members.pop(MANIFEST_MEMBER))
    except FormatError as exc:
        raise BundleError(f"bundle {exc}") from exc
    _check_members(manifest, members)
    bundle = Bundle(manifest, members)
    _check_contents(bundle)
    return bundle


def _read_members(data: bytes, limits: BundleLimits) -> dict[str, bytes]:
    """Every header is checked (names, types, declared sizes) before any content is read,
    so a crafted archive cannot make the reader allocate more than the file holds."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = tar.getmembers()
            _check_headers(infos, limits, len(data))
            for info in infos:
                stream = tar.extractfile(info)
                content = stream.read() if stream else b""
                if len(content) != info.size:
                    raise BundleError(f"bundle is truncated inside member '{info.name}'")
                members[info.name] = content
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"bundle is not a readable tar archive ({exc})") from exc
    return members


def _check_headers(infos: list[tarfile.TarInfo], limits: BundleLimits, archive: int) -> None:
    if len(infos) > limits.max_members:
        raise BundleError(f"bundle has more than {limits.max_members} members")
    seen: set[str] = set()
    for info in infos:
        if not _MEMBER.fullmatch(info.name):
            raise BundleError(
                f"bundle member name {info.name!r} is not a plain file name and could "
                "escape the target directory"
            )
        if not info.isreg() or info.issparse():
            raise BundleError(f"bundle member '{info.name}' is not a regular file")
        if info.name in seen:
            raise BundleError(f"bundle holds member '{info.name}' twice")
        seen.add(info.name)
        bound = (
            limits.max_manifest_bytes if info.name == MANIFEST_MEMBER else limits.max_member_bytes
        )
        if info.size > bound:
            raise BundleError(
                f"bundle member '{info.name}' is {info.size} bytes, over the {bound}-byte limit"
            )
    declared = sum(info.size for info in infos)
    if declared > archive:
        raise BundleError(
            f"bundle members declare {declared} bytes but the archive holds only {archive}"
        )


def _check_members(manifest: Manifest, members: Mapping[str, bytes]) -> None:
    listed, present = set(manifest.members), set(members)
    if present - listed:
        raise BundleError(f"bundle member '{sorted(present - listed)[0]}' is not in the manifest")
    if listed - present:
        raise BundleError(f"bundle lacks member '{sorted(listed - present)[0]}'")
    actual = digest_members(members)
    for name, expected in sorted(manifest.members.items()):
        if actual[name].size != expected.size:
            raise BundleError(
                f"bundle member '{name}' is {actual[name].size} bytes but the manifest "
                f"says {expected.size}"
            )
        if actual[name].sha256 != expected.sha256:
            raise BundleError(f"bundle member '{name}' does not match its sha256 in the manifest")


def _check_contents(bundle: Bundle) -> None:
    manifest = bundle.manifest
    if bundle.model[4:8] != TFLITE_IDENTIFIER:
        raise BundleError("bundle model.tflite is not a TFLite flatbuffer (no TFL3 identifier)")
    labels = bundle.labels
    if len(labels) != manifest.output.num_classes:
        raise BundleError(
            f"bundle has {len(labels)} labels but the model outputs "
            f"{manifest.output.num_classes} classes"
        )
    canaries = bundle.canary_inputs
    expected_shape = (len(manifest.canaries.expected_top1), *manifest.input.shape[1:])
    if canaries.shape != expected_shape:
        raise BundleError(
            f"bundle canary inputs have shape {list(canaries.shape)}, expected "
            f"{list(expected_shape)}"
        )
    head = bundle.head_weights()
    if head is not None and manifest.embedding is not None:
        weight, bias = head
        classes, size = manifest.output.num_classes, manifest.embedding.size
        if weight.shape != (classes, size) or bias.shape != (classes,):
            raise BundleError(
                f"bundle head has weight {list(weight.shape)} and bias {list(bias.shape)}, "
                f"expected [{classes}, {size}] and [{classes}]"
            )
    block = bundle.block_weights()
    if block is not None and manifest.embedding is not None:
        weight, bias = block
        size = manifest.embedding.size
        if weight.ndim != 2 or weight.shape[0] != size or bias.shape != (size,):
            raise BundleError(
                f"bundle block has weight {list(weight.shape)} and bias {list(bias.shape)}, "
                f"expected [{size}, inputs] and [{size}]"
            )
    if manifest.replay is not None:
        arrays = load_npz(
            bundle.members[manifest.replay.member], "bundle replay member", ("x", "y")
        )
        check_replay(
            arrays["x"],
            arrays["y"],
            classes=manifest.output.num_classes,
            sample_shape=manifest.input.shape[1:],
            dtype=canaries.dtype,
        )


def check_replay(
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    classes: int,
    sample_shape: tuple[int, ...],
    dtype: np.dtype[Any],
    what: str = "bundle replay set",
) -> None:
    """Refuse, with one `BundleError` sentence, a replay set that is not `x` [n, *sample_shape]
    of `dtype` (finite) and `y` [n] int64 class indices below `classes`, class-balanced: every
    class present, the largest class at most `REPLAY_MAX_IMBALANCE` times the smallest."""
    if x.dtype != dtype:
        raise BundleError(f"{what} inputs are {x.dtype}, expected {dtype} like the canary inputs")
    if x.ndim < 1 or x.shape[1:] != tuple(sample_shape):
        raise BundleError(
            f"{what} inputs have shape {list(x.shape)}, expected [n, "
            f"{', '.join(str(d) for d in sample_shape)}]"
        )
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise BundleError(f"{what} inputs hold non-finite values (NaN or infinity)")
    if y.dtype != np.int64 or y.ndim != 1:
        raise BundleError(
            f"{what} labels must be a 1-D int64 array of class indices, not {y.dtype} "
            f"of shape {list(y.shape)}"
        )
    if len(y) != len(x):
        raise BundleError(f"{what} has {len(y)} labels for {len(x)} inputs")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise BundleError(
            f"{what} labels must be class indices from 0 to {classes - 1}, found "
            f"{int(y.min())} to {int(y.max())}"
        )
    counts = np.bincount(y, minlength=classes) if len(y) else np.zeros(classes, np.int64)
    if not np.all(counts > 0):
        missing = int(np.flatnonzero(counts == 0)[0])
        raise BundleError(
            f"{what} is not class-balanced: class {missing} has no sample (every class of "
            f"the output must appear)"
        )
    smallest, largest = int(counts.min()), int(counts.max())
    if largest > REPLAY_MAX_IMBALANCE * smallest:
        raise BundleError(
            f"{what} is not class-balanced: class {int(counts.argmax())} has {largest} samples, "
            f"more than {REPLAY_MAX_IMBALANCE} times the {smallest} of class "
            f"{int(counts.argmin())}"
        )


def _parse_labels(data: bytes) -> tuple[str, ...]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError("bundle labels file is not UTF-8") from exc
    labels = tuple(line.strip() for line in text.splitlines())
    if not labels or any(not label for label in labels):
        raise BundleError("bundle labels file has an empty label")
    return labels


def dump_npy(array: npt.NDArray[Any]) -> bytes:
    """An array as .npy bytes (no pickles), the form bundles carry."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def dump_npz(compress: bool = False, **arrays: npt.NDArray[Any]) -> bytes:
    """Arrays as .npz bytes (no pickles)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(
        buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    ) as out:
        for name, array in arrays.items():
            out.writestr(f"{name}.npy", dump_npy(array))
    return buffer.getvalue()


def load_npy(data: bytes, what: str) -> npt.NDArray[np.generic]:
    """A plain (no objects, no pickles) .npy array whose header agrees with its byte count,
    so a header claiming a terabyte is refused before anything is allocated."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BundleError(f"{what} is not a readable .npy array ({exc})") from exc
    if dtype.hasobject:
        raise BundleError(f"{what} holds Python objects, not numbers")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data) - stream.tell():
        raise BundleError(
            f"{what} declares shape {list(shape)} of {dtype} ({expected} bytes) "
            f"but holds {len(data) - stream.tell()}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(
        shape, order="F" if fortran else "C"
    )
    return array.copy()


def load_npz(data: bytes, what: str, names: tuple[str, ...]) -> dict[str, npt.NDArray[np.generic]]:
    """The named arrays of an .npz, each read only after its declared size is checked
    against the member's own size (no decompression bombs)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            wanted = {f"{name}.npy" for name in names}
            if set(infos) != wanted:
                raise BundleError(f"{what} must hold exactly {', '.join(sorted(wanted))}")
            total = sum(info.file_size for info in infos.values())
            if total > 64 * len(data) + 4096:
                raise BundleError(f"{what} expands to {total} bytes: refused")
            return {name: load_npy(archive.read(f"{name}.npy"), what) for name in names}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{what} is not a readable .npz ({exc})") from exc
