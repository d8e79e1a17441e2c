"""The one way images are read: ``read_image`` (full decode) and ``check_image`` (cheap start check).

``read_image`` decodes any file PIL can open, in any PIL pixel mode and bit depth, to ``(3, H, W)``
float32 RGB in ``[0, 1]``:

- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ...) are converted to RGB by PIL and
  divided by 255; grey is repeated over the three channels;
- 16-bit grey (``I;16*``, and ``I``, PIL's 32-bit integer mode, which holds 16-bit PNG/TIFF data) is
  divided by 65535 (clipped to ``[0, 1]``);
- 32-bit float (``F``) is taken as already in ``[0, 1]`` (clipped; NaN becomes 0);
- an alpha channel is dropped (as ``PIL.Image.convert("RGB")`` and torchvision's RGB mode do);
- a multi-frame file (animated GIF, multi-page TIFF) gives its first frame, as detectron2 reads it;
- the EXIF orientation tag (phones write one instead of rotating the pixels) is applied by default
  (``exif_orientation="apply"``), as detectron2 and mmcv/OpenCV read images: annotation tools show
  and export the displayed frame (width, height and boxes). ``"ignore"`` (``data.exif_orientation``)
  serves the pixels as stored, for datasets annotated on those.

``check_image`` is what the dataset runs on every image at start: header-level, not a decode. It
returns the size under the chosen orientation convention (``probe_image``: the stored size and the tag). It
opens the header (size, mode, format), refuses images above ``PIL.Image.MAX_IMAGE_PIXELS`` (set the
environment variable ``DETLIB_MAX_IMAGE_PIXELS`` to raise the limit, 0 for none), pixel modes and
codecs this PIL cannot decode, and files cut short, from their last bytes (JPEG's end-of-image
marker, PNG's ``IEND`` chunk, GIF's trailer) or their declared sizes (BMP, TIFF strips, WebP). A
file whose ending looks wrong (e.g. data after the end marker) and files of other formats are
decoded in full, once; that is rare in practice, so the check costs about one header read per image.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detlib.data.validation import AnnotationError

MAX_PIXELS_ENV = "DETLIB_MAX_IMAGE_PIXELS"
ORIENTATIONS = ("apply", "ignore")  # data.exif_orientation
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose giving the displayed frame (PIL's ImageOps.exif_transpose table);
# 5-8 swap width and height.
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}

GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", *GREY16, "F")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"


class ImageDecodeError(AnnotationError):
    """An image file that cannot be decoded; the message names the file.

    ``path`` and ``reason`` are set when known. The constructor also takes the message alone, so the
    exception keeps its type when a DataLoader worker re-raises it in the main process.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.reason = message if reason is None else reason


def pixel_limit() -> int | None:
    """The largest image accepted, in pixels: ``$DETLIB_MAX_IMAGE_PIXELS`` if set (0: no limit), else
    ``PIL.Image.MAX_IMAGE_PIXELS``. The environment variable also sets PIL's limit, so that
    DataLoader workers, which inherit it, agree with the start check."""
    env = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"environment variable {MAX_PIXELS_ENV} must be an integer, got {env!r}") from None
        Image.MAX_IMAGE_PIXELS = value if value > 0 else None
    return Image.MAX_IMAGE_PIXELS


def _too_large(path: Path, width: int, height: int) -> str | None:
    limit = Image.MAX_IMAGE_PIXELS  # as set by pixel_limit()
    if limit is None or width * height <= limit:
        return None
    return (f"too large: {width}x{height} = {width * height} pixels, above PIL's decompression-bomb limit of "
            f"{limit} pixels; {_ALLOW}")


_ALLOW = (f"if such images are intended, set the environment variable {MAX_PIXELS_ENV} to a higher limit "
          "(0: none), else downscale the file")


def _open(path: Path) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb warning made our own error (it names the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # above twice the limit: PIL refuses to open it
            reason = f"too large: {e}; {_ALLOW}"
            raise ImageDecodeError(f"{path}: {reason}", path, reason) from e
    problem = _too_large(path, *im.size)
    if problem:
        im.close()
        raise ImageDecodeError(f"{path}: {problem}", path, problem)
    return im


def _check_convention(exif_orientation: str) -> None:
    if exif_orientation not in ORIENTATIONS:
        raise ValueError(f"data.exif_orientation must be {'|'.join(ORIENTATIONS)}, got {exif_orientation!r}")


def orientation_of(im: Image.Image) -> int:
    """The image's EXIF orientation tag, 1..8; 1 (as stored) when absent, unreadable or out of range."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels still decode, take them as stored
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` of the displayed frame of an image stored as ``size`` with this EXIF orientation."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _to_array(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` RGB: uint8 for 8-bit modes, float32 in [0, 1] for 16-bit and float ones."""
    if im.mode in GREY16:
        grey = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    if im.mode == "F":
        grey = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    if im.mode not in MODES:
        raise ValueError(f"pixel mode {im.mode} is not supported")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def read_image(path: str | os.PathLike, exif_orientation: str = "apply") -> Tensor:
    """Decode ``path`` to ``(3, H, W)`` float32 RGB in ``[0, 1]`` (see the module notes for each mode).

    ``exif_orientation``: ``apply`` (H, W of the displayed frame) or ``ignore`` (of the stored pixels).

    Raises:
        ImageDecodeError: the file is missing, cannot be decoded, or is above the pixel limit; the
            message names the file and the reason.
    """
    path = Path(path)
    _check_convention(exif_orientation)
    pixel_limit()
    try:
        with _open(path) as im:
            im.load()  # the first frame only
            orientation = orientation_of(im) if exif_orientation == "apply" else 1
            arr = _to_array(im.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else im)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{path}: file not found", path, "file not found") from e
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, EOFError, struct.error...
        reason = f"cannot decode ({type(e).__name__}: {e})"
        raise ImageDecodeError(f"{path}: {reason}", path, reason) from e
    image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return image.float().div_(255) if image.dtype == torch.uint8 else image


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - n, 0))
        return f.read()


def _cut_short(path: Path, im: Image.Image) -> str | None:
    """Why the file looks cut short, from its last bytes or declared sizes; ``None`` if it looks whole.

    ``"unknown"`` for formats without such a cheap check (they are decoded instead).
    """
    fmt = im.format
    if fmt == "PNG":
        return None if _tail(path, len(PNG_END)) == PNG_END else "no PNG end chunk (IEND) at the end"
    if fmt in ("JPEG", "MPO"):
        return None if _tail(path, 2) == JPEG_END else "no JPEG end-of-image marker (FFD9) at the end"
    if fmt == "GIF":
        return None if _tail(path, 1) == b";" else "no GIF trailer at the end"
    size = path.stat().st_size
    if fmt == "WEBP":
        with open(path, "rb") as f:
            head = f.read(8)
        declared = struct.unpack("<I", head[4:8])[0] + 8
        return None if size >= declared else f"{size} bytes, the header declares {declared}"
    if fmt == "BMP":
        with open(path, "rb") as f:
            head = f.read(6)
        declared = struct.unpack("<I", head[2:6])[0]
        if declared == 0:
            return "unknown"
        return None if size >= declared else f"{size} bytes, the header declares {declared}"
    if fmt == "TIFF":
        tags = getattr(im, "tag_v2", {})
        for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
            offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
            if offsets is not None and counts is not None:
                offsets = offsets if isinstance(offsets, tuple) else (offsets,)
                counts = counts if isinstance(counts, tuple) else (counts,)
                end = max((o + c for o, c in zip(offsets, counts)), default=0)
                return None if size >= end else f"{size} bytes, its image data extends to byte {end}"
    return "unknown"


def _codec_missing(im: Image.Image) -> str | None:
    """The codec named in the header that PIL has no decoder for (e.g. EPS without Ghostscript), if any."""
    for tile in im.tile or ():
        codec = tile[0]
        if codec not in Image.DECODERS and not hasattr(Image.core, f"{codec}_decoder"):
            return f"{im.format} codec {codec!r} is not built into PIL"
    return None


def check_image(path: str | os.PathLike, exif_orientation: str = "apply") -> tuple[int, int]:
    """The start check of one image: its ``(width, height)`` as ``read_image`` serves it under
    ``exif_orientation``, if training can decode it (see ``probe_image``)."""
    _check_convention(exif_orientation)
    size, orientation = probe_image(path)
    return oriented_size(size, orientation) if exif_orientation == "apply" else size


def probe_image(path: str | os.PathLike) -> tuple[tuple[int, int], int]:
    """The start check of one image: ``((width, height) as stored, EXIF orientation 1..8)`` if training
    can decode it.

    Header-level (see the module notes); a file whose end or declared size looks wrong, or of a
    format without such a check, is decoded once to be sure.

    Raises:
        FileNotFoundError: no such file.
        ImageDecodeError: anything that would make ``read_image`` fail; ``reason`` says what.
    """
    path = Path(path)
    pixel_limit()
    try:
        im = _open(path)
    except (FileNotFoundError, ImageDecodeError):
        raise
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, and plugin errors on a broken header
        reason = f"unreadable ({type(e).__name__}: {e})"
        raise ImageDecodeError(f"{path}: {reason}", path, reason) from e
    with im:
        size, mode, orientation = im.size, im.mode, orientation_of(im)
        # A codec PIL lacks may still be handled by the plugin itself (EPS with Ghostscript): decode to know.
        short = _codec_missing(im)
        if short is None and mode in MODES:
            try:
                short = _cut_short(path, im)
            except (OSError, struct.error, TypeError, ValueError) as e:
                short = f"unknown ({e})"
    if mode not in MODES:
        reason = f"unreadable (pixel mode {mode!r} is not supported; supported: {', '.join(MODES)})"
        raise ImageDecodeError(f"{path}: {reason}", path, reason)
    if short is not None:  # decode it to be sure (e.g. a JPEG with data after its end marker is fine)
        try:
            read_image(path)
        except ImageDecodeError as e:
            why = "" if short.startswith("unknown") else f"{short}; "
            reason = f"unreadable ({why}{e.reason})"
            raise ImageDecodeError(f"{path}: {reason}", path, reason) from e
    return size, orientation
