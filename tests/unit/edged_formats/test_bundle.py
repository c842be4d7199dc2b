"""Bundle archives: written deterministically, read back exactly, refused with one sentence
when unsafe or inconsistent, and never half-loaded."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest

from edged_formats import BundleError, BundleLimits, Manifest, read_bundle, write_bundle

from .samples import manifest_dict, members, npy, npz, replay_arrays


def _npy_claiming(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    """A valid .npy header claiming `shape` of `descr`, followed by 16 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + b"\0" * 16


def valid_bundle(with_head: bool = False) -> bytes:
    content = members(with_head)
    return write_bundle(Manifest.from_dict(manifest_dict(with_head, content)), content)


def raw_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def bundle_with(
    content: dict[str, bytes],
    manifest: dict | None = None,
    extra: list[tuple[tarfile.TarInfo, bytes]] | None = None,
) -> bytes:
    """A tar with a manifest computed for `content` (unless given), bypassing write checks."""
    manifest_bytes = Manifest.from_dict(manifest or manifest_dict(content=content)).to_json()
    entries = [(tarfile.TarInfo("manifest.json"), manifest_bytes)]
    entries += [(tarfile.TarInfo(name), data) for name, data in content.items()]
    return raw_tar(entries + (extra or []))


def test_round_trip_and_determinism() -> None:
    """Reading a written bundle gives back every member; writing twice gives the same bytes."""
    first, second = valid_bundle(with_head=True), valid_bundle(with_head=True)
    assert first == second
    bundle = read_bundle(first)
    assert bundle.members == members(with_head=True)
    assert bundle.labels == tuple(f"digit-{i}" for i in range(10))
    assert bundle.canary_inputs.shape == (2, 8, 8, 1)
    weight, bias = bundle.head_weights()
    assert weight.shape == (10, 4) and bias.shape == (10,)
    assert len(bundle.sha256) == 64


def test_write_refuses_members_that_differ_from_manifest() -> None:
    """The writer never produces a bundle whose table lies about its members."""
    content = members()
    manifest = Manifest.from_dict(manifest_dict(content=content))
    content["labels.txt"] += b"extra\n"
    with pytest.raises(BundleError, match="do not match the manifest"):
        write_bundle(manifest, content)


def _tampered(name: str, data: bytes) -> bytes:
    content = members()
    manifest = manifest_dict(content=content)
    content[name] = data
    return bundle_with(content, manifest)


def _member_info(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: valid_bundle()[:3000], "truncated|not a readable tar"),
        (lambda: b"\x00garbage" * 300, "not a readable tar|has no manifest"),
        (lambda: b"", "not a readable tar"),
        (
            lambda: _tampered("model.tflite", b"\x1c\x00\x00\x00TFL3" + b"\x01" * 1024),
            "member 'model.tflite' does not match its sha256",
        ),
        (lambda: _tampered("labels.txt", b"0\n"), "'labels.txt' is 2 bytes but the manifest says"),
        (
            lambda: bundle_with(members(), extra=[(_member_info("../../etc/cron.d/x"), b"x")]),
            "'../../etc/cron.d/x' is not a plain file name and could escape",
        ),
        (lambda: bundle_with(members(), extra=[(_member_info("/abs"), b"x")]), "could escape"),
        (
            lambda: bundle_with(members(), extra=[(_member_info("link", tarfile.SYMTYPE), b"")]),
            "member 'link' is not a regular file",
        ),
        (
            lambda: bundle_with(members(), extra=[(_member_info("notes.txt"), b"hi")]),
            "member 'notes.txt' is not in the manifest",
        ),
        (
            lambda: bundle_with(members(), extra=[(_member_info("labels.txt"), b"x")]),
            "holds member 'labels.txt' twice",
        ),
        (
            lambda: bundle_with(
                {k: v for k, v in members().items() if k != "canaries.npy"}, manifest_dict()
            ),
            "lacks member 'canaries.npy'",
        ),
    ],
)
def test_refuses_unsafe_or_inconsistent_archive(make, message: str) -> None:
    """Each archive-level defect is refused with one sentence naming it."""
    with pytest.raises(BundleError, match=message) as info:
        read_bundle(make())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        ("model.tflite", b"\x00" * 64, "not a TFLite flatbuffer"),
        ("labels.txt", b"a\nb\n", "has 2 labels but the model outputs 10 classes"),
        ("labels.txt", b"\xff\xfe\n" * 10, "labels file is not UTF-8"),
        ("canaries.npy", npy(np.zeros((2, 4, 4, 1), np.uint8)), "canary inputs have shape"),
        ("canaries.npy", b"not numpy", "canaries member is not a readable .npy"),
        (
            "head.npz",
            npz(weight=np.ones((10, 3), np.float32), bias=np.zeros(10, np.float32)),
            "head has weight \\[10, 3\\]",
        ),
        ("head.npz", b"PK-not-a-zip", "head member is not a readable .npz"),
        ("head.npz", npz(weight=np.ones((10, 4), np.float32)), "must hold exactly bias.npy"),
        ("canaries.npy", _npy_claiming((2,), descr="|O"), "holds Python objects"),
    ],
)
def test_refuses_member_contents_that_disagree(member: str, data: bytes, message: str) -> None:
    """Members whose contents contradict the manifest are refused even with honest hashes."""
    content = members(with_head=True)
    content[member] = data
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle_with(content, manifest_dict(with_head=True, content=content)))


def test_size_limits_apply_before_reading() -> None:
    """Members or archives over the configured bounds are refused by size alone."""
    bundle = valid_bundle()
    with pytest.raises(BundleError, match=r"is \d+ bytes, over the 1000-byte limit"):
        read_bundle(bundle, BundleLimits(max_member_bytes=1000))
    with pytest.raises(BundleError, match="over the 2000-byte limit"):
        read_bundle(bundle, BundleLimits(max_total_bytes=2000))
    with pytest.raises(BundleError, match="more than 2 members"):
        read_bundle(bundle, BundleLimits(max_members=2))


def test_manifest_errors_surface_as_bundle_errors() -> None:
    """An unknown format version inside an archive is a BundleError naming the manifest."""
    content = members()
    manifest = Manifest.from_dict(manifest_dict(content=content)).to_json()
    manifest = manifest.replace(b'"format_version": 1', b'"format_version": 9')
    data = raw_tar(
        [(tarfile.TarInfo("manifest.json"), manifest)]
        + [(tarfile.TarInfo(n), d) for n, d in content.items()]
    )
    with pytest.raises(BundleError, match="format_version 9 is unknown"):
        read_bundle(data)


def _npz_bomb() -> bytes:
    """An .npz whose 'weight' inflates from a few kB to 64 MB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weight.npy", npy(np.zeros((4096, 4096), np.float32)))
        archive.writestr("bias.npy", npy(np.zeros(10, np.float32)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        ("canaries.npy", _npy_claiming((1 << 20, 1 << 20)), r"declares shape \[1048576, 1048576\]"),
        ("head.npz", _npz_bomb(), "expands to .* bytes: refused"),
    ],
)
def test_refuses_size_bombs_before_allocating(member: str, data: bytes, message: str) -> None:
    """Headers claiming huge arrays and compressed members that inflate are refused by
    arithmetic on their headers, before any allocation."""
    content = members(with_head=True)
    content[member] = data
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle_with(content, manifest_dict(with_head=True, content=content)))


def test_refuses_sparse_members_and_inflated_declarations() -> None:
    """A GNU sparse member (tiny on disk, huge when read) and declared sizes beyond the
    archive are refused from the headers alone; so is an oversized manifest."""
    content = members()
    sparse = tarfile.TarInfo("notes.txt")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(BundleError, match=r"'notes\.txt' is not a regular file"):
        read_bundle(bundle_with(content, extra=[(sparse, b"")]))
    with pytest.raises(BundleError, match=r"'manifest.json' is \d+ bytes, over the 100-byte"):
        read_bundle(valid_bundle(), BundleLimits(max_manifest_bytes=100))
    data = bytearray(valid_bundle())
    # rewrite the size field of the first header (manifest.json) to claim 1 GiB
    data[124:136] = b"%011o\0" % (1 << 30)
    checksum = sum(data[:148]) + 8 * 32 + sum(data[156:512])
    data[148:156] = b"%06o\0 " % checksum
    with pytest.raises(BundleError, match=r"over the|declare|not a readable tar"):
        read_bundle(bytes(data))


def _with_replay(**arrays: np.ndarray) -> bytes:
    """A bundle whose replay member holds `arrays` (honest hashes), written bypassing checks."""
    content = members(with_replay=True)
    content["replay.npz"] = npz(**arrays)
    return bundle_with(content, manifest_dict(content=content, with_replay=True))


def test_replay_round_trip() -> None:
    """A bundle with a replay set gives it back as (x, y); one without gives None."""
    content = members(with_head=True, with_replay=True)
    manifest = manifest_dict(with_head=True, content=content, with_replay=True)
    bundle = read_bundle(write_bundle(Manifest.from_dict(manifest), content))
    x, y = bundle.replay()
    expected = replay_arrays()
    assert x.dtype == np.uint8 and x.shape == (20, 8, 8, 1)
    assert y.dtype == np.int64 and np.array_equal(y, expected["y"])
    assert read_bundle(valid_bundle()).replay() is None


def _replay(x: np.ndarray | None = None, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    arrays = replay_arrays()
    return {"x": arrays["x"] if x is None else x, "y": arrays["y"] if y is None else y}


X = replay_arrays()["x"]
Y = replay_arrays()["y"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_replay(x=X.astype(np.float32)), "replay set inputs are float32, expected uint8"),
        (_replay(x=X[:, :4]), r"inputs have shape \[20, 4, 8, 1\], expected \[n, 8, 8, 1\]"),
        (_replay(x=X[:, :, :, 0]), r"inputs have shape \[20, 8, 8\]"),
        (_replay(y=Y.astype(np.int32)), "labels must be a 1-D int64 array .* not int32"),
        (_replay(y=Y[:, None]), r"labels must be a 1-D int64 array .* shape \[20, 1\]"),
        (_replay(y=Y[:-1]), "replay set has 19 labels for 20 inputs"),
        (_replay(y=np.where(Y == 9, 10, Y)), "class indices from 0 to 9, found 0 to 10"),
        (_replay(y=np.where(Y == 9, -1, Y)), "class indices from 0 to 9, found -1 to 8"),
        (_replay(y=np.where(Y == 9, 0, Y)), "not class-balanced: class 9 has no sample"),
        (_replay(x=X[:0], y=Y[:0]), "not class-balanced: class 0 has no sample"),
        (
            {"x": X[:1].repeat(25, axis=0), "y": np.r_[np.zeros(7, np.int64), Y[2:]]},
            "class 0 has 7 samples, more than 2 times the 2 of class 1",
        ),
        ({"x": X}, "replay member must hold exactly x.npy, y.npy"),
    ],
)
def test_refuses_bad_replay_set(arrays: dict[str, np.ndarray], message: str) -> None:
    """A replay set of the wrong dtype or shape, labels that are not one in-range int64 class
    per input, or a set that is not class-balanced, is refused with one sentence."""
    with pytest.raises(BundleError, match=message) as info:
        read_bundle(_with_replay(**arrays))
    assert "\n" not in str(info.value)


def test_replay_balance_allows_twice_the_smallest_class() -> None:
    """The largest class may hold exactly twice the samples of the smallest, no more."""
    y = np.r_[np.zeros(4), np.arange(1, 10).repeat(2)].astype(np.int64)
    x, _ = read_bundle(_with_replay(x=np.zeros((len(y), 8, 8, 1), np.uint8), y=y)).replay()
    assert len(x) == 22
    y = np.r_[np.zeros(5), np.arange(1, 10).repeat(2)].astype(np.int64)
    with pytest.raises(BundleError, match="class 0 has 5 samples, more than 2 times the 2"):
        read_bundle(_with_replay(x=np.zeros((len(y), 8, 8, 1), np.uint8), y=y))


def test_replay_member_missing_or_over_the_bounds() -> None:
    """A replay member the manifest names but the archive lacks, one over the member size
    bound, and one that inflates are refused before anything is loaded."""
    content = members(with_replay=True)
    manifest = manifest_dict(content=content, with_replay=True)
    del content["replay.npz"]
    with pytest.raises(BundleError, match=r"lacks member 'replay\.npz'"):
        read_bundle(bundle_with(content, manifest))
    big = {"x": np.zeros((2000, 8, 8, 1), np.uint8), "y": np.arange(2000, dtype=np.int64) % 10}
    with pytest.raises(BundleError, match=r"member 'replay.npz' is \d+ bytes, over the 100000"):
        read_bundle(_with_replay(**big), BundleLimits(max_member_bytes=100_000))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy(np.zeros((100_000, 8, 8, 1), np.uint8)))
        archive.writestr("y.npy", npy(np.zeros(100_000, np.int64)))
    content = members(with_replay=True)
    content["replay.npz"] = bomb.getvalue()
    with pytest.raises(BundleError, match=r"replay member expands to \d+ bytes: refused"):
        read_bundle(bundle_with(content, manifest_dict(content=content, with_replay=True)))


def test_replay_of_float_inputs_must_be_finite() -> None:
    """Float replay inputs (raw float samples, like the canaries) must hold no NaN."""
    content = members(with_replay=True)
    content["canaries.npy"] = npy(np.zeros((2, 8, 8, 1), np.float32))
    x = np.zeros((20, 8, 8, 1), np.float32)
    content["replay.npz"] = npz(x=x, y=Y)
    assert read_bundle(bundle_with(content, manifest_dict(content=content, with_replay=True)))
    x[3, 1, 1, 0] = np.nan
    content["replay.npz"] = npz(x=x, y=Y)
    with pytest.raises(BundleError, match="replay set inputs hold non-finite values"):
        read_bundle(bundle_with(content, manifest_dict(content=content, with_replay=True)))
