"""read_image / write_png: conversions, precision, clear errors on bad files, atomic deterministic writes."""

import io
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

from dmdiff import imageio
from dmdiff.errors import DmdiffError, ImageReadError
from dmdiff.imageio import (
    DEFAULT_MAX_PIXELS,
    ImageSizeError,
    check_min_size,
    max_pixels,
    read_image,
    write_png,
)

REPO = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png16_reference(samples: np.ndarray, colour: int, filters) -> bytes:
    """A 16-bit PNG written by the spec, one filter type per row (cycled from ``filters``)."""
    h, w, ch = samples.shape
    raw = samples.astype(">u2").tobytes()
    stride, bpp = w * ch * 2, ch * 2
    out = bytearray()
    for r in range(h):
        t = filters[r % len(filters)]
        row = raw[r * stride:(r + 1) * stride]
        prev = raw[(r - 1) * stride:r * stride] if r else bytes(stride)
        out.append(t)
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][t]
            out.append((row[i] - pred) % 256)
    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(out)))
            + _chunk(b"IEND", b""))


def test_rgb_8bit_round_trip_and_range(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((17, 23, 3)).astype(np.float32)
    path = write_png(tmp_path / "a.png", x)
    y = read_image(path)
    assert y.dtype == np.float32 and y.shape == (17, 23, 3)
    assert np.abs(y - x).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(y * 255, np.round(y * 255), atol=1e-4)


def test_rgb_16bit_round_trip_keeps_precision(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((19, 21, 3)).astype(np.float64)
    write_png(tmp_path / "a.png", x, bits=16)
    y = read_image(tmp_path / "a.png")
    assert np.abs(y - x).max() <= 0.5 / 65535 + 1e-7  # 8-bit would be off by up to 2e-3
    assert len(np.unique(np.round(y * 65535))) > 256


@pytest.mark.parametrize("colour, channels", [(2, 3), (6, 4), (0, 1), (4, 2)])
def test_16bit_png_all_row_filters(tmp_path, colour, channels):
    rng = np.random.default_rng(colour)
    samples = rng.integers(0, 65536, size=(9, 7, channels)).astype(np.uint16)
    samples[..., -1] = 65535 if channels in (2, 4) else samples[..., -1]  # opaque alpha
    path = tmp_path / "f.png"
    path.write_bytes(png16_reference(samples, colour, filters=[0, 1, 2, 3, 4, 4, 3]))
    y = read_image(path)
    expect = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=2)
    np.testing.assert_array_equal(np.round(y.astype(np.float64) * 65535), expect)


def test_16bit_rgba_alpha_over_white(tmp_path):
    samples = np.zeros((2, 2, 4), np.uint16)
    samples[..., 0] = 65535  # red
    samples[0, 0, 3], samples[0, 1, 3], samples[1, :, 3] = 0, 65535, 32768
    path = tmp_path / "a.png"
    path.write_bytes(png16_reference(samples, 6, filters=[4]))
    y = read_image(path)
    np.testing.assert_allclose(y[0, 0], [1, 1, 1], atol=1e-6)  # transparent -> white
    np.testing.assert_allclose(y[0, 1], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(y[1, 0], [1, 0.5, 0.5], atol=1e-4)


@pytest.mark.parametrize("greyscale", [False, True])
def test_16bit_interlaced_png_full_precision(tmp_path, greyscale):
    rng = np.random.default_rng(5)
    planes = 1 if greyscale else 3
    samples = rng.integers(0, 65536, size=(13, 11, planes)).astype(np.uint16)
    with open(tmp_path / "i.png", "wb") as f:
        png.Writer(11, 13, greyscale=greyscale, bitdepth=16, interlace=True).write(
            f, samples.reshape(13, -1).tolist())
    y = read_image(tmp_path / "i.png")
    expect = np.repeat(samples, 3, axis=2) if greyscale else samples
    np.testing.assert_array_equal(np.round(y.astype(np.float64) * 65535), expect)


@pytest.mark.parametrize("greyscale", [False, True])
def test_16bit_trns_colour_key_is_transparent_white(tmp_path, greyscale):
    samples = np.full((2, 3, 1 if greyscale else 3), 1000, np.uint16)
    samples[0, 1] = 40000
    key = (1000,) if greyscale else (1000, 1000, 1000)
    with open(tmp_path / "t.png", "wb") as f:
        png.Writer(3, 2, greyscale=greyscale, bitdepth=16, transparent=key).write(
            f, samples.reshape(2, -1).tolist())
    y = read_image(tmp_path / "t.png")
    np.testing.assert_allclose(y[0, 0], [1, 1, 1], atol=1e-7)  # the key colour -> white
    np.testing.assert_allclose(y[1, 2], [1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(y[0, 1], [40000 / 65535] * 3, atol=1e-7)


def test_16bit_png_bad_crc_and_short_data_are_clean_errors(tmp_path):
    x = np.random.default_rng(6).random((8, 8, 3))
    good = write_png(tmp_path / "g.png", x, bits=16).read_bytes()
    bad = bytearray(good)
    bad[good.index(b"IDAT") + 10] ^= 0xFF  # payload byte: the chunk checksum no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(bad))
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "crc.png")
    _assert_clean_error(e, tmp_path / "crc.png", "corrupt or truncated PNG")
    assert "hecksum" in e.value.reason
    rows = np.zeros((3, 1 + 8 * 6), np.uint8)  # 3 of the 8 rows the header promises
    header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    (tmp_path / "short.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + _chunk(b"IEND", b""))
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "short.png")
    _assert_clean_error(e, tmp_path / "short.png", "truncated")


def test_grayscale_8_and_16_bit_replicated(tmp_path):
    g8 = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(g8, mode="L").save(tmp_path / "g8.png")
    y = read_image(tmp_path / "g8.png")
    assert y.shape == (6, 10, 3)
    np.testing.assert_allclose(y[..., 0], g8 / 255, atol=1e-6)
    assert np.array_equal(y[..., 0], y[..., 1]) and np.array_equal(y[..., 1], y[..., 2])
    g16 = (np.arange(60, dtype=np.uint16).reshape(6, 10) * 1001 + 3)
    Image.fromarray(g16).save(tmp_path / "g16.png")  # Pillow writes I;16
    y = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(np.round(y[..., 1].astype(np.float64) * 65535), g16)


def test_rgba_and_gray_alpha_composited_over_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 2] = 255  # blue
    rgba[0, :, 3] = [0, 255, 51]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    y = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(y[0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(y[0, 1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(y[0, 2], [0.8, 0.8, 1.0], atol=1e-6)
    la = np.array([[[0, 0], [0, 255]]], np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    y = read_image(tmp_path / "la.png")
    np.testing.assert_allclose(y[0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(y[0, 1], [0, 0, 0], atol=1e-6)


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    im.save(tmp_path / "p.png")
    y = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(y[0, 0], [1, 0, 0])
    np.testing.assert_allclose(y[0, 1], [0, 1, 0])
    im.save(tmp_path / "pt.png", transparency=1)
    y = read_image(tmp_path / "pt.png")
    np.testing.assert_allclose(y[0, 1], [1, 1, 1])  # the transparent index shows white
    np.testing.assert_allclose(y[0, 0], [1, 0, 0])


def test_one_bit_and_jpeg(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_allclose(read_image(tmp_path / "b.png")[0], [[0, 0, 0], [1, 1, 1]])
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    y = read_image(tmp_path / "c.jpg")
    assert y.shape == (8, 8, 3) and y.min() > 0.9


def test_float_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    x = np.random.default_rng(0).random((5, 6, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", x, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), x, atol=1e-7)
    x16 = (x * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", x16, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "u16.tif"), x16 / 65535, atol=1e-7)
    bad = x.copy()
    bad[1, 2, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad, photometric="rgb")
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "hdr.tif", x * 4, photometric="rgb")
    with pytest.raises(ImageReadError, match=r"outside \[0, 1\]"):
        read_image(tmp_path / "hdr.tif")


def _assert_clean_error(excinfo, path, fragment):
    err = excinfo.value
    assert isinstance(err, DmdiffError) and isinstance(err, ValueError)
    assert err.path == str(path) and str(path) in str(err)
    assert fragment in err.reason
    assert err.__cause__ is None  # no chained library traceback
    assert err.__context__ is None or err.__suppress_context__


def test_missing_empty_folder_and_text_file(tmp_path):
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "nope.png")
    _assert_clean_error(e, tmp_path / "nope.png", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "empty.png")
    _assert_clean_error(e, tmp_path / "empty.png", "empty")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "notes.png")
    _assert_clean_error(e, tmp_path / "notes.png", "not an image")


@pytest.mark.parametrize("bits", [8, 16])
def test_truncated_and_corrupt_png(tmp_path, bits):
    x = np.random.default_rng(2).random((40, 40, 3))
    good = write_png(tmp_path / "good.png", x, bits=bits).read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "trunc.png")
    assert "truncated" in e.value.reason or "corrupt" in e.value.reason
    corrupt = bytearray(good)
    start = good.index(b"IDAT") + 20
    corrupt[start:start + 30] = bytes(30)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "corrupt.png")
    assert "corrupt" in e.value.reason or "truncated" in e.value.reason


def test_truncated_jpeg(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="truncated|corrupt"):
        read_image(tmp_path / "t.jpg")


def test_write_png_deterministic_atomic_and_checked(tmp_path):
    x = np.random.default_rng(3).random((16, 12, 3))
    for bits in (8, 16):
        a = write_png(tmp_path / f"a{bits}.png", x, bits=bits).read_bytes()
        b = write_png(tmp_path / f"b{bits}.png", x.astype(np.float32), bits=bits).read_bytes()
        assert a == b
        write_png(tmp_path / f"a{bits}.png", 1 - x, bits=bits)  # replace an existing file
        np.testing.assert_allclose(read_image(tmp_path / f"a{bits}.png"), 1 - x, atol=0.51 / (2**bits - 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a16.png", "a8.png", "b16.png", "b8.png"]
    g = write_png(tmp_path / "sub" / "g.png", x[..., 0])  # grayscale, folder created
    np.testing.assert_allclose(read_image(g)[..., 2], x[..., 0], atol=0.51 / 255)
    with pytest.raises(ValueError, match="NaN"):
        write_png(tmp_path / "n.png", np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "s.png", np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="bits"):
        write_png(tmp_path / "s.png", x, bits=12)
    assert not (tmp_path / "n.png").exists() and not (tmp_path / "s.png").exists()


def test_tiny_image_min_size_message(tmp_path):
    write_png(tmp_path / "tiny.png", np.zeros((30, 20, 3)))
    img = read_image(tmp_path / "tiny.png")
    assert img.shape == (30, 20, 3)
    with pytest.raises(ImageSizeError, match="image is 20×30 px, smaller than the 64 px crop"):
        check_min_size(img, 64)
    with pytest.raises(ImageReadError, match="tiny.png: image is 20×30 px"):
        check_min_size(img, 64, path=tmp_path / "tiny.png")
    check_min_size(img, 20)  # large enough: no error


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Temporary files/folders are private (0600/0700); what lands must follow the umask instead."""
    import os

    from dmdiff.outputs import atomic_directory, atomic_write_text

    mask = os.umask(0o022)
    try:
        file = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder", "test") as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(mask)
    assert file.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_write_npy_round_trips_atomically_and_refuses_object_arrays(tmp_path):
    """Degradation maps are written as .npy bytes made in memory, then renamed into place: a failed
    write (an object array, which only a pickle could hold) leaves neither a file nor a temporary."""
    from dmdiff.outputs import write_npy

    maps = np.random.default_rng(0).uniform(size=(7, 4, 4)).astype(np.float32)
    write_npy(tmp_path / "maps" / "a.npy", maps)
    loaded = np.load(tmp_path / "maps" / "a.npy", allow_pickle=False)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, maps)
    with pytest.raises(ValueError):
        write_npy(tmp_path / "maps" / "b.npy", np.array([{"a": 1}], dtype=object))
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.npy"]


# ---- the pixel limit: checked from the header, before any pixel memory is allocated ----------

BOMB_SIDE = 15000  # 225 megapixels declared by files of a few hundred bytes


def _png_bomb(path: Path, bits: int) -> Path:
    """An RGB PNG whose IHDR declares BOMB_SIDE² px, followed by a few rows' worth of zeros."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, bits, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                     + _chunk(b"IDAT", zlib.compress(bytes(4000))) + _chunk(b"IEND", b""))
    return path


def _jpeg_bomb(path: Path) -> Path:
    """A real 16×16 RGB JPEG whose frame header (SOF0) is patched to declare BOMB_SIDE² px."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack(">HH", BOMB_SIDE, BOMB_SIDE)
    path.write_bytes(bytes(data))
    return path


def _tiff_bomb(path: Path) -> Path:
    """A little-endian TIFF: one uncompressed 16-bit grayscale strip declared BOMB_SIDE² px, 64 bytes stored."""
    tags = [(256, 4, BOMB_SIDE), (257, 4, BOMB_SIDE), (258, 3, 16), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, BOMB_SIDE), (279, 4, BOMB_SIDE * BOMB_SIDE * 2)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = data_offset if tag == 273 else value
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)  # SHORT or LONG
        ifd += struct.pack("<HHI", tag, kind, 1) + field
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + ifd + struct.pack("<I", 0) + bytes(64))
    return path


BOMBS = {"png16": lambda d: _png_bomb(d / "bomb16.png", 16), "png8": lambda d: _png_bomb(d / "bomb8.png", 8),
         "jpeg": lambda d: _jpeg_bomb(d / "bomb.jpg"), "tiff": lambda d: _tiff_bomb(d / "bomb.tif")}
LIMIT_MESSAGE = (f"image is {BOMB_SIDE}×{BOMB_SIDE} px (225 megapixels), over the pixel limit of "
                 f"{DEFAULT_MAX_PIXELS / 1e6:g} megapixels")


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_oversized_image_is_refused_from_its_header(tmp_path, monkeypatch, kind):
    """16-bit PNG (pypng), 8-bit PNG and JPEG (Pillow), TIFF (tifffile): the limit fires before decoding."""
    monkeypatch.delenv("DMDIFF_MAX_PIXELS", raising=False)
    path = BOMBS[kind](tmp_path)
    assert path.stat().st_size < 5000
    if kind in ("png16", "tiff"):  # their own decoder must refuse it, not the Pillow fallback
        monkeypatch.setattr(imageio, "_read_pillow", lambda *a: pytest.fail("fell through to Pillow"))
    if kind == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].shape == (BOMB_SIDE, BOMB_SIDE)  # tifffile parses the header
    pillow_limit = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert time.perf_counter() - start < 1.0
    assert info.value.path == str(path) and info.value.reason.startswith(LIMIT_MESSAGE)
    assert path.name in str(info.value) and "DMDIFF_MAX_PIXELS" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's own setting is left as it was


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_oversized_images_are_refused_without_allocating(tmp_path):
    """In a process limited to 400 MB of address space (Python and the libraries take about 120 MB),
    where decoding any bomb (0.45 to 1.35 GB of samples) fails, each is refused with the limit's message."""
    paths = [str(make(tmp_path)) for make in BOMBS.values()]
    script = ("import sys\nfrom dmdiff.imageio import read_image\nfrom dmdiff.errors import ImageReadError\n"
              "for p in sys.argv[1:]:\n    try:\n        read_image(p)\n"
              "    except ImageReadError as e:\n        print(e.reason)\n")
    limit = 400_000_000
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no thread arenas
    done = subprocess.run([sys.executable, "-c", script, *paths], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert done.returncode == 0, done.stderr
    reasons = done.stdout.splitlines()
    assert len(reasons) == len(paths) and all(r.startswith(LIMIT_MESSAGE) for r in reasons), done.stdout


def test_pixel_limit_from_environment_and_per_call(tmp_path, monkeypatch):
    path = write_png(tmp_path / "photo.png", np.random.default_rng(0).random((80, 60, 3)))  # 4800 px
    monkeypatch.delenv("DMDIFF_MAX_PIXELS", raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv("DMDIFF_MAX_PIXELS", " ")
    assert max_pixels() == DEFAULT_MAX_PIXELS  # empty: the default
    monkeypatch.setenv("DMDIFF_MAX_PIXELS", "4799")
    assert max_pixels() == 4799
    with pytest.raises(ImageReadError, match=r"photo.png: image is 60×80 px \(0.0048 megapixels\), over the "
                                             r"pixel limit of 0.004799 megapixels \(4799 px\)"):
        read_image(path)
    assert read_image(path, max_pixels=4800).shape == (80, 60, 3)  # the per-call limit wins
    monkeypatch.setenv("DMDIFF_MAX_PIXELS", "4_800")
    assert read_image(path).shape == (80, 60, 3)  # exactly at the limit is allowed
    with pytest.raises(ImageReadError, match="over the pixel limit"):
        read_image(path, max_pixels=4799)
    with pytest.raises(ValueError, match="max_pixels must be a positive"):
        read_image(path, max_pixels=0)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5e8"])
def test_invalid_pixel_limit_variable_is_a_clear_error(tmp_path, monkeypatch, value):
    path = write_png(tmp_path / "photo.png", np.zeros((8, 8, 3)))
    monkeypatch.setenv("DMDIFF_MAX_PIXELS", value)
    for call in (max_pixels, lambda: read_image(path)):
        with pytest.raises(DmdiffError, match="environment variable DMDIFF_MAX_PIXELS: ") as info:
            call()
        assert not isinstance(info.value, ImageReadError)  # a setting to fix, not a bad file to skip


def test_pillows_own_limit_does_not_apply(tmp_path, monkeypatch):
    """Pillow would call a 100×100 image a decompression bomb under MAX_IMAGE_PIXELS = 1000: ours rules,
    and Pillow's value is restored afterwards."""
    monkeypatch.delenv("DMDIFF_MAX_PIXELS", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_png(tmp_path / "photo.png", np.random.default_rng(1).random((100, 100, 3)))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert read_image(path).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_integer_samples_keep_their_float64_rounded_values(tmp_path):
    """Scaling in float32 gives, bit for bit, the float64 quotient rounded to float32, for every 8-bit
    and 16-bit value (with and without alpha)."""
    values8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb8 = np.stack([values8, values8[::-1], values8.T], axis=2)
    values16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    Image.fromarray(np.dstack([rgb8, np.full((16, 16), 255, np.uint8)])).save(tmp_path / "rgba.png")
    cases = [(write_png(tmp_path / "rgb8.png", rgb8), rgb8, 255),
             (write_png(tmp_path / "gray16.png", values16, bits=16), values16[:, :, None], 65535),
             (tmp_path / "rgba.png", rgb8, 255)]
    for path, samples, top in cases:
        expect = np.broadcast_to(samples.astype(np.float64) / top, samples.shape[:2] + (3,)).astype(np.float32)
        got = read_image(path)
        assert got.dtype == np.float32 and got.tobytes() == expect.tobytes(), path.name


def test_simulate_skips_an_oversized_image_and_goes_on(tmp_path, psf_cache):
    """The real command, in a process limited to 5 GB of address space: the 16-bit PNG bomb is listed
    as skipped (with the limit) and the two ordinary photos make the dataset."""
    images, out = tmp_path / "images", tmp_path / "dataset"
    rng = np.random.default_rng(2)
    for name in ("first", "second"):
        write_png(images / f"{name}.png", rng.random((80, 80, 3)))
    _png_bomb(images / "bomb.png", 16)
    limit = 5_000_000_000
    env = {k: v for k, v in os.environ.items() if k != "DMDIFF_MAX_PIXELS"}  # the default limit
    done = subprocess.run([sys.executable, "-m", "dmdiff.cli", "simulate", "--images", str(images), "--out", str(out),
                           "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert done.returncode in (0, 1), done.stderr  # 1: done, with skipped inputs listed
    assert "bomb.png" in done.stderr and LIMIT_MESSAGE in done.stderr, done.stderr
    assert (out / "lens.json").is_file()
    made = {p.stem.rsplit("_", 1)[0] for p in out.glob("gt_t*/*.png")}  # gt_train/, gt_test/
    assert made == {"first", "second"}


def test_max_pixels_option_of_the_command_line(tmp_path, monkeypatch, capsys):
    from dmdiff.cli import main

    monkeypatch.setenv("DMDIFF_MAX_PIXELS", str(DEFAULT_MAX_PIXELS))  # undone after the test: main sets it
    write_png(tmp_path / "images" / "photo.png", np.zeros((80, 80, 3)))
    with pytest.raises(SystemExit) as info:
        main(["--max-pixels", "0", "simulate", "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "--max-pixels: the pixel limit must be positive" in capsys.readouterr().err
    status = main(["--max-pixels", "6399", "simulate", "--images", str(tmp_path / "images"),
                   "--out", str(tmp_path / "out"), "--smoke"])
    err = capsys.readouterr().err
    assert status == 2 and "photo.png (image is 80×80 px" in err and "pixel limit of 0.006399 megapixels" in err
    assert not (tmp_path / "out").exists()
