"""Robust image reading and atomic, deterministic PNG writing.

``read_image(path)`` always returns a ``float32`` array ``(H, W, 3)`` with values in ``[0, 1]``, in
the file's own encoding (for ordinary photos that is sRGB: no colour management, ICC profiles and
``gAMA`` chunks are ignored). Conversions:

- grayscale (8- or 16-bit, 1-bit): the value is replicated into R, G and B;
- palette images: expanded through the palette (with its transparency, if any);
- images with alpha (RGBA, grayscale+alpha, palette+transparency): **composited over white**, in the
  stored (sRGB) values, ``out = a·c + (1 − a)``, as image viewers and browsers on a white page show
  them. White rather than black because transparent regions of photos and scans are usually "paper"
  or "background", and a black fill would add false dark edges around anti-aliased borders;
- 16-bit PNGs (grayscale, RGB, with alpha or ``tRNS`` transparency, interlaced or not): divided by
  65535 with full 16-bit precision, decoded and encoded with ``pypng`` (Pillow alone would drop
  16-bit colour PNGs to 8 bits); with an ``sBIT`` chunk, values are scaled from its bit depth;
- TIFFs (8/16-bit integers, or float32/float64 with values in ``[0, 1]``) through ``tifffile``;
- CMYK, YCbCr, LAB...: converted to RGB by Pillow; EXIF orientation is applied.

Every failure (missing file, folder, empty file, not an image, corrupt or truncated data, zero
size, NaN/Inf or out-of-range float values, unsupported layout) raises
:class:`dmdiff.errors.ImageReadError` naming the file and the reason, never a library traceback.

``write_png(path, image, bits=8)`` writes an RGB (or grayscale) PNG through a temporary file in the
same folder and ``os.replace``, so readers never see a half-written file. The bytes depend only on
the pixel values (no timestamps): the same image always gives the same file.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import png

from dmdiff.errors import DmdiffError, ImageReadError
from dmdiff.runinfo import atomic_write_bytes

__all__ = ["read_image", "write_png", "check_min_size", "ImageSizeError", "IMAGE_EXTENSIONS"]


class ImageSizeError(DmdiffError, ValueError):
    """An image is too small for what it is used for (the message gives its size and the minimum)."""

#: File name extensions treated as images when scanning folders (lower case, with the dot).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm",
                    ".pgm", ".pnm", ".jp2")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``float32`` ``(H, W, 3)`` RGB in ``[0, 1]`` (values as stored, sRGB).

    See the module docstring for the conversions (grayscale, alpha over white, palette, 16-bit,
    float TIFF).

    Raises:
        ImageReadError: the file is missing, not a regular file, empty, not an image, corrupt or
            truncated, has zero size, holds NaN/Inf or float values outside ``[0, 1]``, or has a
            layout that cannot be read as an RGB image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ImageReadError(path, f"cannot open the file ({e.strerror or e})") from None
    if size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")

    image = None
    if head.startswith(_PNG_SIGNATURE):
        image = _read_png16(path)  # None unless it is a 16-bit PNG
    elif head[:4] in _TIFF_MAGICS:
        image = _read_tiff(path)  # None when tifffile cannot decode it: Pillow gets a try
    if image is None:
        image = _read_pillow(path)
    return _finish(path, image)


def _finish(path: Path, image: np.ndarray) -> np.ndarray:
    """Check a decoded ``(H, W, 3)`` float array (size, finiteness, range) and make it float32."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageReadError(path, f"unsupported image layout: array of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(path, f"image has zero size ({image.shape[1]}×{image.shape[0]} px)")
    if not np.all(np.isfinite(image)):
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise ImageReadError(path, f"image contains {bad} NaN or infinite value(s)")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ImageReadError(
            path, f"float image values span [{lo:.4g}, {hi:.4g}], outside [0, 1]; HDR or linear "
                  "float images are not supported: rescale to [0, 1] sRGB values first")
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def _to_rgb(path: Path, values: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``values`` (H, W) or (H, W, 3) float in [0, 1], optional alpha (H, W) → (H, W, 3) float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        values = np.repeat(values[:, :, None], 3, axis=2)
    if alpha is not None:
        a = np.asarray(alpha, dtype=np.float64)[:, :, None]
        values = a * values + (1.0 - a)  # composite over white (see the module docstring)
    return values


def _read_pillow(path: Path) -> np.ndarray:
    """Decode with Pillow (any format it knows) → (H, W, 3) float64 in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "palette images with transparency ..." notes
            with Image.open(path) as im:
                im.seek(0)  # first frame of animations / multi-page files
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a broken EXIF block must not make the pixels unreadable
                    pass
                return _pillow_to_array(path, im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file, or a format that cannot be read "
                                   "(PNG, JPEG, TIFF, BMP, WebP, GIF... are supported)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
            KeyError, TypeError, MemoryError) as e:
        raise ImageReadError(path, f"corrupt or truncated image data ({type(e).__name__}: {e})") from None


def _pillow_to_array(path: Path, im) -> np.ndarray:
    """A loaded Pillow image → (H, W, 3) float64 in [0, 1]."""
    mode = im.mode
    if im.width == 0 or im.height == 0:
        raise ImageReadError(path, f"image has zero size ({im.width}×{im.height} px)")
    if mode == "P":
        mode = "RGBA" if "transparency" in im.info else "RGB"
        im = im.convert(mode)
    elif mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode == "1":
        im, mode = im.convert("L"), "L"
    elif mode in ("La", "RGBa"):
        im = im.convert("LA" if mode == "La" else "RGBA")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _to_rgb(path, np.asarray(im, dtype=np.float64) / 65535.0, None)
    if mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageReadError(path, "32-bit integer images are not supported (values beyond the "
                                       "16-bit range); save it as 8- or 16-bit")
        return _to_rgb(path, a / 65535.0, None)
    if mode == "F":
        return _to_rgb(path, np.asarray(im, dtype=np.float64), None)
    if mode == "L":
        return _to_rgb(path, np.asarray(im, dtype=np.float64) / 255.0, None)
    if mode == "LA":
        a = np.asarray(im, dtype=np.float64) / 255.0
        return _to_rgb(path, a[:, :, 0], a[:, :, 1])
    if mode == "RGBA":
        a = np.asarray(im, dtype=np.float64) / 255.0
        return _to_rgb(path, a[:, :, :3], a[:, :, 3])
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    return np.asarray(im, dtype=np.float64) / 255.0


def _read_tiff(path: Path) -> np.ndarray | None:
    """TIFF through tifffile (8/16-bit integer or float samples); None if tifffile cannot decode it."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile is a dependency of scikit-image
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = tifffile.imread(path, key=0)
    except Exception:  # compression codecs missing, exotic layout...: let Pillow try (and report)
        return None
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (samples first) layout
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise ImageReadError(path, f"unsupported TIFF layout: array of shape {a.shape} "
                                   "(expected grayscale, RGB or RGBA)")
    if a.dtype == np.bool_:
        a = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.integer):
        if a.dtype.itemsize > 2 or a.dtype.kind == "i":
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ImageReadError(path, f"unsupported TIFF sample type {a.dtype} (use 8- or 16-bit "
                                           "unsigned integers, or float in [0, 1])")
            scale = 255.0 if a.size and a.max() <= 255 and a.dtype.itemsize == 1 else 65535.0
        else:
            scale = 255.0 if a.dtype.itemsize == 1 else 65535.0
        a = a.astype(np.float64) / scale
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    else:
        raise ImageReadError(path, f"unsupported TIFF sample type {a.dtype}")
    if a.ndim == 2:
        return _to_rgb(path, a, None)
    if a.shape[2] == 2:
        return _to_rgb(path, a[:, :, 0], np.clip(a[:, :, 1], 0, 1))
    if a.shape[2] == 4:
        return _to_rgb(path, a[:, :, :3], np.clip(a[:, :, 3], 0, 1))
    return a


# ---- 16-bit PNG decoding through pypng (Pillow reduces 16-bit colour PNGs to 8 bits) ----------

# What pypng (and zlib / struct underneath it) raises on a damaged file.
_PNG_DECODE_ERRORS = (png.Error, zlib.error, EOFError, struct.error, ValueError, IndexError,
                      TypeError, AttributeError, OverflowError, MemoryError)


def _read_png16(path: Path) -> np.ndarray | None:
    """Decode a 16-bit PNG with pypng (any colour type, tRNS, interlaced); None for other PNGs.

    PNGs of other bit depths return None: Pillow reads those exactly.
    """
    data = path.read_bytes()
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageReadError(path, "corrupt PNG (missing IHDR header)")
    if data[24] != 16:  # IHDR bit depth
        return None
    try:
        reader = png.Reader(bytes=data)
        reader.preamble()
        width, height = reader.width, reader.height
        if width == 0 or height == 0:
            raise ImageReadError(path, f"image has zero size ({width}×{height} px)")
        # asDirect: tRNS → a synthesised alpha plane; sBIT → values scaled to that bit depth
        _, _, rows, info = reader.asDirect()
        planes, depth = int(info["planes"]), int(info["bitdepth"])
        samples = np.empty((height, width * planes), dtype=np.uint16)
        count = 0
        for row in rows:
            if count < height:
                values = np.asarray(row, dtype=np.uint16)
                if values.shape != (width * planes,):
                    raise ImageReadError(path, "corrupt or truncated PNG (an image row has the wrong "
                                               "length)")
                samples[count] = values
            count += 1
    except ImageReadError:
        raise
    except _PNG_DECODE_ERRORS as e:
        # str() of a png.Error already starts with its class name
        detail = str(e) if isinstance(e, png.Error) else f"{type(e).__name__}: {e}"
        raise ImageReadError(path, f"corrupt or truncated PNG ({detail})") from None
    if count < height:
        raise ImageReadError(path, f"truncated PNG (image data holds {count} of {height} rows)")
    a = samples.reshape(height, width, planes).astype(np.float64) / float((1 << depth) - 1)
    if planes == 1:
        return _to_rgb(path, a[:, :, 0], None)
    if planes == 2:
        return _to_rgb(path, a[:, :, 0], a[:, :, 1])
    if planes == 3:
        return _to_rgb(path, a, None)
    return _to_rgb(path, a[:, :, :3], a[:, :, 3])


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _quantise(image: np.ndarray, bits: int) -> np.ndarray:
    """Float [0, 1] (clipped) or matching unsigned integers → uint8/uint16 samples."""
    a = np.asarray(image)
    dtype = np.uint8 if bits == 8 else np.uint16
    if np.issubdtype(a.dtype, np.integer):
        if a.dtype != dtype:
            raise ValueError(f"write_png(bits={bits}) takes float images in [0, 1] or {np.dtype(dtype).name} "
                             f"samples, got {a.dtype}")
        return a
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"write_png takes float images in [0, 1], got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError("write_png: image contains NaN or infinite values")
    top = (1 << bits) - 1
    return np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * top).astype(dtype)


def _png16_bytes(samples: np.ndarray) -> bytes:
    """Encode uint16 (H, W, C) samples (C = 1 or 3) as a 16-bit PNG with pypng."""
    height, width, channels = samples.shape
    writer = png.Writer(width, height, greyscale=channels == 1, bitdepth=16, compression=6)
    rows = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(height, -1)
    buf = io.BytesIO()
    writer.write_packed(buf, (row.tobytes() for row in rows))  # rows already big-endian bytes
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> Path:
    """Write ``image`` as a PNG, atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        path: destination file (its folder is created if missing).
        image: ``(H, W, 3)`` RGB or ``(H, W)`` / ``(H, W, 1)`` grayscale; float values in ``[0, 1]``
            (clipped, rounded to the nearest level), or ``uint8`` (bits=8) / ``uint16`` (bits=16)
            samples written as they are.
        bits: 8 or 16 bits per sample.

    Returns:
        The path written. The bytes depend only on the pixel values (deterministic).

    Raises:
        ValueError: wrong shape, dtype, bit depth, or NaN/Inf values.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"write_png takes an (H, W, 3) or (H, W) image, got shape {a.shape}")
    samples = _quantise(a, bits)
    if bits == 8:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(samples), mode="L" if samples.ndim == 2 else "RGB").save(
            buf, format="PNG", compress_level=6)
        payload = buf.getvalue()
    else:
        payload = _png16_bytes(samples if samples.ndim == 3 else samples[:, :, None])
    return atomic_write_bytes(path, payload)


def check_min_size(image: np.ndarray, min_px: int, what: str = "crop", path=None) -> None:
    """Raise a clear error when ``image`` (H, W, ...) is smaller than ``min_px`` on either side.

    The message reads e.g. ``image is 20×30 px, smaller than the 64 px crop`` (width × height),
    prefixed by ``path`` when given (then an :class:`ImageReadError`).

    Raises:
        ImageReadError: if ``path`` is given; otherwise :class:`ImageSizeError`.
    """
    height, width = int(np.shape(image)[0]), int(np.shape(image)[1])
    if height < min_px or width < min_px:
        reason = f"image is {width}×{height} px, smaller than the {min_px} px {what}"
        if path is not None:
            raise ImageReadError(path, reason)
        raise ImageSizeError(reason)
