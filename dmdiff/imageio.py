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
size, NaN/Inf or out-of-range float values, unsupported layout, over the pixel limit) raises
:class:`dmdiff.errors.ImageReadError` naming the file and the reason, never a library traceback.

**Pixel limit.** Every decoder reads the image's width and height from the file header and refuses
images of more than :func:`max_pixels` pixels (:data:`DEFAULT_MAX_PIXELS`, or ``$DMDIFF_MAX_PIXELS``,
or ``dmdiff --max-pixels N``, or ``read_image(path, max_pixels=N)``) *before* allocating any pixel
memory, so a small file declaring a huge image (a "decompression bomb") is an ordinary unreadable
file, not an out-of-memory crash. This one limit replaces Pillow's own ``Image.MAX_IMAGE_PIXELS``
checks for the duration of each read.

``write_png(path, image, bits=8)`` writes an RGB (or grayscale) PNG through a temporary file in the
same folder and ``os.replace``, so readers never see a half-written file. The bytes depend only on
the pixel values (no timestamps): the same image always gives the same file.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageOps, UnidentifiedImageError

from dmdiff.errors import DmdiffError, ImageReadError
from dmdiff.outputs import atomic_write_bytes

__all__ = ["read_image", "write_png", "png_bytes", "to_samples", "check_min_size", "ImageSizeError", "IMAGE_EXTENSIONS",
           "DEFAULT_MAX_PIXELS", "max_pixels", "parse_max_pixels"]


class ImageSizeError(DmdiffError, ValueError):
    """An image is too small for what it is used for (the message gives its size and the minimum)."""

#: File name extensions treated as images when scanning folders (lower case, with the dot).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm",
                    ".pgm", ".pnm", ".jp2")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: Largest image :func:`read_image` decodes, in pixels (width × height): 160 megapixels, just above
#: the largest single-shot camera sensors (medium format: 102 and 151 MP). The memory it implies:
#: the returned float32 RGB array takes 12 bytes per pixel (1.9 GB at the limit) and decoding peaks
#: at about 25 bytes per pixel (4 GB: the decoder's samples, float32 intermediates, the result);
#: images with alpha are composited in float64 and peak at about 50 bytes per pixel (8 GB).
#: A file declaring more is refused from its header. Raise it with ``$DMDIFF_MAX_PIXELS`` or
#: ``dmdiff --max-pixels N``.
DEFAULT_MAX_PIXELS = 160_000_000

MAX_PIXELS_ENV = "DMDIFF_MAX_PIXELS"


def parse_max_pixels(text: str) -> int:
    """A pixel limit written as text (``"200000000"``, ``"200_000_000"``) → a positive ``int``.

    Raises:
        ValueError: not a whole number, or not positive (the message says so).
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of pixels (e.g. {DEFAULT_MAX_PIXELS})") from None
    if value <= 0:
        raise ValueError(f"the pixel limit must be positive, got {value}")
    return value


def max_pixels() -> int:
    """The pixel limit in effect (pixels, width × height): ``$DMDIFF_MAX_PIXELS`` if set and not
    empty, else :data:`DEFAULT_MAX_PIXELS`. Read at every call, so a change takes effect at once.

    Raises:
        DmdiffError: ``$DMDIFF_MAX_PIXELS`` is not a positive whole number (the message names it).
    """
    text = os.environ.get(MAX_PIXELS_ENV, "")
    if not text.strip():
        return DEFAULT_MAX_PIXELS
    try:
        return parse_max_pixels(text)
    except ValueError as e:
        raise DmdiffError(f"environment variable {MAX_PIXELS_ENV}: {e}") from None


def _pixel_limit(override: int | None) -> int:
    """``read_image``'s ``max_pixels`` argument, or :func:`max_pixels` when it is None."""
    if override is None:
        return max_pixels()
    if isinstance(override, bool) or not isinstance(override, (int, np.integer)) or override <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {override!r}")
    return int(override)


def _check_pixels(path: Path, width: int, height: int, limit: int) -> None:
    """Refuse a ``width`` × ``height`` px image (read from its header) above ``limit`` pixels."""
    pixels = int(width) * int(height)
    if pixels > limit:
        raise ImageReadError(
            path, f"image is {width}×{height} px ({pixels / 1e6:.4g} megapixels), over the pixel limit "
                  f"of {limit / 1e6:.4g} megapixels ({limit} px); set {MAX_PIXELS_ENV} or pass "
                  "dmdiff --max-pixels N to raise it")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as ``float32`` ``(H, W, 3)`` RGB in ``[0, 1]`` (values as stored, sRGB).

    See the module docstring for the conversions (grayscale, alpha over white, palette, 16-bit,
    float TIFF).

    Args:
        path: the image file.
        max_pixels: refuse images of more than this many pixels (width × height), checked from the
            header before decoding; None: the limit in effect (:func:`max_pixels`).

    Raises:
        ImageReadError: the file is missing, not a regular file, empty, not an image, corrupt or
            truncated, has zero size, is over the pixel limit, holds NaN/Inf or float values outside
            ``[0, 1]``, or has a layout that cannot be read as an RGB image.
        DmdiffError: ``$DMDIFF_MAX_PIXELS`` is set to something other than a positive whole number.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    limit = _pixel_limit(max_pixels)
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
        image = _read_png16(path, limit)  # None unless it is a 16-bit PNG
    elif head[:4] in _TIFF_MAGICS:
        image = _read_tiff(path, limit)  # None when tifffile cannot decode it: Pillow gets a try
    if image is None:
        image = _read_pillow(path, limit)
    return _finish(path, image)


def _finish(path: Path, image: np.ndarray) -> np.ndarray:
    """Check a decoded ``(H, W, 3)`` float array from :func:`_to_rgb` (size, finiteness, range),
    clip it to ``[0, 1]`` in place and return it as float32."""
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
    np.clip(image, 0.0, 1.0, out=image)
    return image.astype(np.float32, copy=False)


def _to_rgb(values: np.ndarray, alpha: np.ndarray | None = None, scale: float = 1) -> np.ndarray:
    """Samples → a new ``(H, W, 3)`` float array, values ``/ scale``, alpha composited over white.

    Args:
        values: ``(H, W)`` (grayscale, replicated into R, G, B) or ``(H, W, 3)`` samples: integers,
            bools, or floats in ``[0, 1]`` (``scale`` 1).
        alpha: ``(H, W)`` alpha samples on the same ``scale``, or None.
        scale: the samples' full-scale value (255, 65535, ``2**bits - 1``; 1 for floats).

    Returns:
        float32 without alpha: dividing in float32 gives the very bits of dividing in float64 and
        rounding to float32 (IEEE division is correctly rounded; checked for every 1- to 16-bit
        value), at half the memory. float64 with alpha (composited in float64) or for float64
        samples: :func:`_finish` checks and clips those before rounding them to float32.
    """
    dtype = np.float64 if alpha is not None or np.asarray(values).dtype == np.float64 else np.float32
    rgb = np.array(values, dtype=dtype)  # a copy of our own: scaled and composited in place
    if scale != 1:
        np.divide(rgb, dtype(scale), out=rgb)
    if alpha is not None:
        a = np.clip(np.asarray(alpha, dtype=np.float64) / scale, 0.0, 1.0)
        if rgb.ndim == 3:
            a = a[:, :, None]
        rgb *= a  # composite over white, out = a·c + (1 − a) (see the module docstring)
        rgb += 1.0 - a
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return rgb


_pillow_lock = threading.Lock()
_pillow_reads = 0  # reads in progress in this process (guarded by _pillow_lock)
_pillow_saved_limit = None  # Pillow's MAX_IMAGE_PIXELS before the first of them


@contextlib.contextmanager
def _pillow_limit_lifted():
    """Lift Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) while reads run, so
    that ours (:func:`max_pixels`, checked from the header) is the one that applies. Concurrent reads
    in threads share one lifting; the last to finish restores Pillow's value."""
    global _pillow_reads, _pillow_saved_limit

    with _pillow_lock:
        if _pillow_reads == 0:
            _pillow_saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pillow_reads += 1
    try:
        yield
    finally:
        with _pillow_lock:
            _pillow_reads -= 1
            if _pillow_reads == 0:
                Image.MAX_IMAGE_PIXELS = _pillow_saved_limit


def _read_pillow(path: Path, limit: int) -> np.ndarray:
    """Decode with Pillow (any format it knows), at most ``limit`` px → (H, W, 3) float array."""

    try:
        with warnings.catch_warnings(), _pillow_limit_lifted():
            warnings.simplefilter("ignore")  # e.g. "palette images with transparency ..." notes
            with Image.open(path) as im:  # reads the header only
                _check_pixels(path, im.width, im.height, limit)
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
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
            KeyError, TypeError, MemoryError) as e:
        raise ImageReadError(path, f"corrupt or truncated image data ({type(e).__name__}: {e})") from None


def _pillow_to_array(path: Path, im) -> np.ndarray:
    """A loaded Pillow image → (H, W, 3) float array from :func:`_to_rgb`."""
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
        return _to_rgb(np.asarray(im), scale=65535)
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageReadError(path, "32-bit integer images are not supported (values beyond the "
                                       "16-bit range); save it as 8- or 16-bit")
        return _to_rgb(a, scale=65535)
    if mode == "F":
        return _to_rgb(np.asarray(im))
    if mode == "L":
        return _to_rgb(np.asarray(im), scale=255)
    if mode == "LA":
        a = np.asarray(im)
        return _to_rgb(a[:, :, 0], a[:, :, 1], scale=255)
    if mode == "RGBA":
        a = np.asarray(im)
        return _to_rgb(a[:, :, :3], a[:, :, 3], scale=255)
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    return _to_rgb(np.asarray(im), scale=255)


def _read_tiff(path: Path, limit: int) -> np.ndarray | None:
    """TIFF through tifffile (8/16-bit integer or float samples), first page, at most ``limit`` px →
    (H, W, 3) float array from :func:`_to_rgb`; None if tifffile cannot decode it."""
    try:
        import tifffile  # local: an optional decoder
    except ImportError:  # pragma: no cover - tifffile is a dependency of scikit-image
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]  # its header only: the pixels are read by asarray
                _check_pixels(path, page.imagewidth, page.imagelength, limit)
                if page.imagedepth > 1:
                    raise ImageReadError(path, f"unsupported TIFF layout: a volume of {page.imagedepth} "
                                               "slices (expected a 2-D image)")
                a = tif.asarray(key=0)
    except ImageReadError:
        raise
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
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        scale = 1
    elif np.issubdtype(a.dtype, np.integer):
        if a.dtype.itemsize > 2 or a.dtype.kind == "i":
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ImageReadError(path, f"unsupported TIFF sample type {a.dtype} (use 8- or 16-bit "
                                           "unsigned integers, or float in [0, 1])")
            scale = 255 if a.size and a.max() <= 255 and a.dtype.itemsize == 1 else 65535
        else:
            scale = 255 if a.dtype.itemsize == 1 else 65535
    else:
        raise ImageReadError(path, f"unsupported TIFF sample type {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 2:
        return _to_rgb(a[:, :, 0], a[:, :, 1], scale)
    if a.ndim == 3 and a.shape[2] == 4:
        return _to_rgb(a[:, :, :3], a[:, :, 3], scale)
    return _to_rgb(a, scale=scale)


# ---- 16-bit PNG decoding through pypng (Pillow reduces 16-bit colour PNGs to 8 bits) ----------

# What pypng (and zlib / struct underneath it) raises on a damaged file.
_PNG_DECODE_ERRORS = (png.Error, zlib.error, EOFError, struct.error, ValueError, IndexError,
                      TypeError, AttributeError, OverflowError, MemoryError)


def _read_png16(path: Path, limit: int) -> np.ndarray | None:
    """Decode a 16-bit PNG with pypng (any colour type, tRNS, interlaced), at most ``limit`` px →
    (H, W, 3) float array from :func:`_to_rgb`; None for other PNGs.

    PNGs of other bit depths return None: Pillow reads those exactly.
    """
    data = path.read_bytes()
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageReadError(path, "corrupt PNG (missing IHDR header)")
    if data[24] != 16:  # IHDR bit depth
        return None
    _check_pixels(path, *struct.unpack(">II", data[16:24]), limit)  # IHDR width, height
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
    a, top = samples.reshape(height, width, planes), (1 << depth) - 1
    if planes == 1:
        return _to_rgb(a[:, :, 0], scale=top)
    if planes == 2:
        return _to_rgb(a[:, :, 0], a[:, :, 1], top)
    if planes == 3:
        return _to_rgb(a, scale=top)
    return _to_rgb(a[:, :, :3], a[:, :, 3], top)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def to_samples(image: np.ndarray, bits: int = 8) -> np.ndarray:
    """Integer samples of an image as a ``bits``-bit file stores them: float ``[0, 1]`` (clipped,
    rounded to the nearest level) or matching unsigned integers (kept) → uint8 (8) / uint16 (16).

    Raises:
        ValueError: another dtype, or NaN/Inf values.
    """
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


def png_bytes(image: np.ndarray, bits: int = 8) -> bytes:
    """Encode ``image`` as PNG file bytes (what :func:`write_png` writes).

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` / ``(H, W, 1)`` grayscale; float values in ``[0, 1]``
            (clipped, rounded to the nearest level), or ``uint8`` (bits=8) / ``uint16`` (bits=16)
            samples written as they are.
        bits: 8 or 16 bits per sample.

    Returns:
        The bytes; they depend only on the pixel values (deterministic).

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
    samples = to_samples(a, bits)
    if bits == 16:
        return _png16_bytes(samples if samples.ndim == 3 else samples[:, :, None])

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(samples), mode="L" if samples.ndim == 2 else "RGB").save(
        buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> Path:
    """Write ``image`` (see :func:`png_bytes`) as a PNG, atomically (a temporary file in the same
    folder, then ``os.replace``; its folder is created if missing). Returns the path written.

    Raises:
        ValueError: wrong shape, dtype, bit depth, or NaN/Inf values.
    """
    return atomic_write_bytes(path, png_bytes(image, bits))


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
