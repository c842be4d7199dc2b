"""Delta updates: a zstd frame compressed with the parent artifact as a raw-content dictionary.

This is zstd's `--patch-from`: the control plane calls `make_patch(parent, target)`, the device
`apply_patch(parent, patch, max_output=target_length)`. Bytes in, bytes out; nothing here opens
a file or trusts the patch. The caller checks the patch's sha256 before and the rebuilt
artifact's sha256 after (docs/ota.md, "Delta updates"); this module adds what only the decoder
can enforce:

- the frame must declare its content size, and that size must not exceed `max_output`, checked
  in the frame header before anything is allocated; the decoder then writes into a buffer of
  exactly that size, so a lying frame stops at the cap instead of growing;
- the frame's window may not exceed what the parent and `max_output` need (zstd's decoder
  memory follows the window), and the decoder is told the same bound;
- exactly one frame, with a checksum, and nothing after it: a wrong parent almost always
  fails the checksum, garbage and truncation fail the frame, all as one `PatchError`.

    EdgedError (edged.errors)
    └── PatchError      a patch that cannot rebuild the target from this parent (bad data)
"""

from __future__ import annotations

import zstandard

from edged.errors import EdgedError

__all__ = ["PatchError", "apply_patch", "make_patch", "window_log_for"]

_WINDOW_LOG_MAX = 31  # zstd's limit on 64-bit hosts; 2 GiB is far beyond any bundle


class PatchError(EdgedError):
    """A patch that cannot rebuild the target from the parent held here."""


def window_log_for(parent_size: int, target_size: int) -> int:
    """log2 of the window a patch between these sizes needs, as `zstd --patch-from` picks it:
    the bit length of the larger size, at least zstd's minimum."""
    needed = max(parent_size, target_size).bit_length()
    return max(zstandard.WINDOWLOG_MIN, min(_WINDOW_LOG_MAX, needed))


def make_patch(parent: bytes, target: bytes, *, level: int = 19) -> bytes:
    """A zstd frame that rebuilds `target` from `parent`: long-distance matching, a window
    covering both, the content size and a checksum in the frame."""
    if not parent:
        raise ValueError("a patch needs a non-empty parent")
    if not target:
        raise ValueError("a patch needs a non-empty target: no artifact is empty")
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(target),
        dict_size=len(parent),
        window_log=window_log_for(len(parent), len(target)),
        enable_ldm=True,
        write_content_size=True,
        write_checksum=True,
        write_dict_id=False,
    )
    compressor = zstandard.ZstdCompressor(dict_data=_dictionary(parent), compression_params=params)
    return compressor.compress(target)


def apply_patch(parent: bytes, patch: bytes, *, max_output: int) -> bytes:
    """The target rebuilt from `parent` and `patch`, never more than `max_output` bytes;
    `PatchError` (one sentence) for anything that does not decode cleanly."""
    if max_output < 1:
        raise ValueError(f"max_output must be positive, not {max_output}")
    if not parent:
        raise PatchError("cannot apply a patch: the parent artifact is empty")
    try:
        frame = zstandard.get_frame_parameters(patch)
    except zstandard.ZstdError as exc:
        raise PatchError(f"patch is not a zstd frame ({exc})") from exc
    if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise PatchError("patch frame does not declare its content size")
    if frame.content_size > max_output:
        raise PatchError(
            f"patch declares {frame.content_size} bytes of output, over the {max_output}-byte cap"
        )
    max_window = 1 << window_log_for(len(parent), max_output)
    if frame.window_size > max_window:
        raise PatchError(
            f"patch needs a {frame.window_size}-byte window, over the {max_window} bytes "
            "this parent and cap allow"
        )
    if not frame.has_checksum:
        raise PatchError("patch frame carries no checksum")
    if frame.content_size == 0:
        # zstandard returns b"" for an empty frame without decoding it: nothing to check.
        raise PatchError("patch declares an empty target")
    decompressor = zstandard.ZstdDecompressor(
        dict_data=_dictionary(parent), max_window_size=max_window
    )
    try:
        target = decompressor.decompress(patch, max_output_size=max_output, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise PatchError(f"patch does not rebuild a target from this parent ({exc})") from exc
    if len(target) != frame.content_size:  # the decoder checks this too; never trust one layer
        raise PatchError(f"patch rebuilt {len(target)} bytes but declares {frame.content_size}")
    return target


def _dictionary(parent: bytes) -> zstandard.ZstdCompressionDict:
    # Raw content, always: a parent that happens to start with zstd's dictionary magic must
    # not be parsed as a trained dictionary.
    return zstandard.ZstdCompressionDict(parent, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
