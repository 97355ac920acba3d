"""read_image / write_png: conversions, precision, clear errors on bad files, atomic deterministic writes."""

import struct
import zlib

import numpy as np
import png
import pytest
from PIL import Image

from dmdiff.errors import DmdiffError, ImageReadError
from dmdiff.imageio import ImageSizeError, check_min_size, read_image, write_png


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

    from dmdiff.runinfo import atomic_directory, atomic_write_text

    mask = os.umask(0o022)
    try:
        file = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(mask)
    assert file.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
