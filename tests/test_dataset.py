"""PairedFolderDataset: validation before use, aligned crops, map resampling, flips, layouts."""

import numpy as np
import pytest
import torch

from dmdiff.data.dataset import PairedFolderDataset, crop_maps, read_lens
from dmdiff.errors import DmdiffError
from dmdiff.imageio import write_png

H, W, G = 48, 40, 3


def node_coords(n, g=G):
    return (np.arange(g) + 0.5) * n / g - 0.5


def make_dataset(root, split="train", n=4, maps=True, blur=True, size=(H, W)):
    """gt: a ramp in x (R), a ramp in y (G), an id (B); lr = 1 − gt (exact on the 8-bit grid)."""
    h, w = size
    for k in range(n):
        gt = np.zeros((h, w, 3))
        gt[..., 0] = np.round(np.linspace(0, 1, w) * 255)[None, :] / 255
        gt[..., 1] = np.round(np.linspace(0, 1, h) * 255)[:, None] / 255
        gt[..., 2] = k / 255
        write_png(root / f"gt_{split}" / f"img_{k:03d}.png", gt)
        write_png(root / f"lr_{split}" / f"img_{k:03d}.png", 1 - gt)
        if blur:
            write_png(root / f"gt_blur_{split}" / f"img_{k:03d}.png", gt)
        if maps:
            # channel 0: the node's x coordinate, channel 1: its y coordinate, others: the index
            m = np.full((7, G, G), float(k), np.float32)
            m[0] = node_coords(w)[None, :]
            m[1] = node_coords(h)[:, None]
            (root / "maps").mkdir(exist_ok=True)
            np.save(root / "maps" / f"img_{k:03d}.npy", m)
    return root


def test_full_images_and_fields(tmp_path):
    ds = PairedFolderDataset(make_dataset(tmp_path), "train")
    assert len(ds) == 4 and ds.names == [f"img_{k:03d}" for k in range(4)]
    item = ds[2]
    assert set(item) == {"lr", "gt", "gt_blur", "maps", "name"} and item["name"] == "img_002"
    assert item["gt"].shape == (3, H, W) and item["gt"].dtype == torch.float32
    assert item["maps"].shape == (7, G, G)
    torch.testing.assert_close(item["lr"], 1 - item["gt"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(item["maps"][0].numpy(), np.broadcast_to(node_coords(W), (G, G)), atol=1e-5)


@pytest.mark.parametrize("flips", [False, True])
def test_crops_are_aligned_and_maps_follow_the_window(tmp_path, flips):
    ds = PairedFolderDataset(make_dataset(tmp_path), "train", crop_px=24, seed=3, flips=flips, vflips=flips)
    seen_flip = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            gt, lr, gb, maps = (item[k].numpy() for k in ("gt", "lr", "gt_blur", "maps"))
            assert gt.shape == (3, 24, 24) and maps.shape == (7, G, G)
            np.testing.assert_allclose(lr, 1 - gt, atol=1e-6)
            np.testing.assert_allclose(gb, gt, atol=1e-6)
            # recover the window from the ramps: x0 from R, y0 from G (flips reverse the ramps)
            xs = np.round(gt[0, 0] * 255)
            ys = np.round(gt[1, :, 0] * 255)
            ramp_x = np.round(np.linspace(0, 1, W) * 255)
            ramp_y = np.round(np.linspace(0, 1, H) * 255)
            hflip, vflip = xs[0] > xs[-1], ys[0] > ys[-1]
            seen_flip.add((hflip, vflip))
            x0 = int(np.argmin(np.abs(ramp_x - (xs[-1] if hflip else xs[0]))))
            y0 = int(np.argmin(np.abs(ramp_y - (ys[-1] if vflip else ys[0]))))
            # maps hold node coordinates, linear inside the node span: resampled maps give the crop's
            # node coordinates (clamped to the outer nodes), flipped like the image
            want_x = np.clip(x0 + node_coords(24), node_coords(W)[0], node_coords(W)[-1])
            want_y = np.clip(y0 + node_coords(24), node_coords(H)[0], node_coords(H)[-1])
            got_x, got_y = maps[0][0], maps[1][:, 0]
            np.testing.assert_allclose(got_x, want_x[::-1] if hflip else want_x, atol=1e-4)
            np.testing.assert_allclose(got_y, want_y[::-1] if vflip else want_y, atol=1e-4)
            np.testing.assert_allclose(maps[2:], i, atol=1e-5)
    assert seen_flip == ({(False, False), (True, False), (False, True), (True, True)} if flips else {(False, False)})


def test_crops_are_reproducible_and_change_with_epoch(tmp_path):
    root = make_dataset(tmp_path)
    a = PairedFolderDataset(root, crop_px=16, seed=1)
    b = PairedFolderDataset(root, crop_px=16, seed=1)
    torch.testing.assert_close(a[1]["gt"], b[1]["gt"])
    first = a[1]["gt"].clone()
    changed = False
    for epoch in range(1, 5):
        a.set_epoch(epoch)
        changed |= not torch.equal(a[1]["gt"], first)
    assert changed
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert batch["lr"].shape == (4, 3, 16, 16) and batch["maps"].shape == (4, 7, G, G)
    assert batch["name"] == a.names


def test_crop_maps_identity_and_clamp():
    m = np.random.default_rng(0).random((7, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(crop_maps(m, (50, 60), (0, 0, 50, 60)), m, atol=1e-6)
    corner = crop_maps(m, (50, 60), (0, 0, 5, 6))  # a tiny window before the first nodes
    np.testing.assert_allclose(corner, np.broadcast_to(m[:, :1, :1], (7, 5, 5)), atol=1e-6)


def test_real_capture_layout_without_maps_or_blur(tmp_path):
    root = make_dataset(tmp_path, split="test", maps=False, blur=False)
    item = PairedFolderDataset(root, "test", crop_px=8)[0]
    assert set(item) == {"lr", "gt", "name"}


def test_plain_gt_lr_layout(tmp_path):
    root = make_dataset(tmp_path, maps=False)
    for kind in ("gt", "lr", "gt_blur"):
        (root / f"{kind}_train").rename(root / kind)
    ds = PairedFolderDataset(root, "train")
    assert len(ds) == 4 and "gt_blur" in ds[0]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DmdiffError, match="not found"):
        PairedFolderDataset(tmp_path / "nope")
    root = make_dataset(tmp_path / "a", maps=False)
    with pytest.raises(DmdiffError, match=r"lr_test/.*found: gt_blur_train/, gt_train/, lr_train/"):
        PairedFolderDataset(root, "test")
    (root / "gt_test").mkdir()
    (root / "lr_test").mkdir()
    (root / "gt_test" / "notes.txt").write_text("x")
    with pytest.raises(DmdiffError, match="gt_test holds no images"):
        PairedFolderDataset(root, "test")


def test_mismatched_names_listed(tmp_path):
    root = make_dataset(tmp_path, n=8, maps=False)
    for k in range(6):
        (root / "lr_train" / f"img_{k:03d}.png").rename(root / "lr_train" / f"other_{k:03d}.png")
    with pytest.raises(DmdiffError) as e:
        PairedFolderDataset(root)
    msg = str(e.value)
    assert "6 only in gt_train/" in msg and "img_000, img_001" in msg and "(1 more)" in msg
    assert "6 only in lr_train/" in msg and "other_000" in msg


def test_mismatched_blur_names(tmp_path):
    root = make_dataset(tmp_path, maps=False)
    (root / "gt_blur_train" / "img_001.png").unlink()
    with pytest.raises(DmdiffError, match=r"gt_blur_train/.*1 only in gt_train/ \(img_001\)"):
        PairedFolderDataset(root)


def test_mismatched_sizes(tmp_path):
    root = make_dataset(tmp_path, maps=False)
    write_png(root / "lr_train" / "img_002.png", np.zeros((H, W + 1, 3)))
    with pytest.raises(DmdiffError, match=r"different image sizes: img_002 \(gt 40×48, lr 41×48 px\)"):
        PairedFolderDataset(root)


def test_bad_maps(tmp_path):
    root = make_dataset(tmp_path)
    (root / "maps" / "img_003.npy").unlink()
    with pytest.raises(DmdiffError, match="missing: img_003.npy"):
        PairedFolderDataset(root)
    PairedFolderDataset(root, use_maps=False)  # the pairs alone still work
    np.save(root / "maps" / "img_003.npy", np.zeros((6, G, G), np.float32))
    with pytest.raises(DmdiffError, match=r"shape \(7, G, G\)"):
        PairedFolderDataset(root)
    (root / "maps" / "img_003.npy").write_bytes(b"garbage")
    with pytest.raises(DmdiffError, match="unreadable map"):
        PairedFolderDataset(root)


@pytest.mark.parametrize("bad, needle", [
    (np.nan, "1 of the 63 map values are NaN or infinite"),
    (np.inf, "1 of the 63 map values are NaN or infinite"),
    (-np.inf, "1 of the 63 map values are NaN or infinite"),
])
def test_non_finite_maps_name_the_file(tmp_path, bad, needle):
    root = make_dataset(tmp_path)
    m = np.load(root / "maps" / "img_002.npy")
    m[3, 1, 2] = bad
    np.save(root / "maps" / "img_002.npy", m)
    with pytest.raises(DmdiffError, match=rf"img_002\.npy: {needle}"):
        PairedFolderDataset(root)
    np.save(root / "maps" / "img_002.npy", np.full((7, G, G), "x"))
    with pytest.raises(DmdiffError, match=r"img_002\.npy: maps must hold real numbers, got dtype <U1"):
        PairedFolderDataset(root)


def test_crop_too_large_and_corrupt_image(tmp_path):
    root = make_dataset(tmp_path, maps=False)
    with pytest.raises(DmdiffError, match=r"crop_px = 41 is larger than 4 image\(s\).*img_000 \(40×48 px\)") as e:
        PairedFolderDataset(root, crop_px=41)
    # the hint is one that training accepts too (TrainConfig.crop_px cannot be null)
    assert "use a crop_px of at most 40 (the smallest image side)" in str(e.value) and "None" not in str(e.value)
    with pytest.raises(DmdiffError, match="crop_px"):
        PairedFolderDataset(root, crop_px=0)
    (root / "lr_train" / "img_001.png").write_text("not a png")
    with pytest.raises(DmdiffError, match="img_001.png.*not an image"):
        PairedFolderDataset(root)


@pytest.mark.parametrize("content", [b"{not json", b'{"spec": "\xff\xfe"}', b'{"seed": ' + b"9" * 5000 + b"}"])
def test_unreadable_lens_json_names_the_file(tmp_path, content):
    (tmp_path / "lens.json").write_bytes(content)
    with pytest.raises(DmdiffError, match=r"lens\.json: unreadable lens\.json"):
        read_lens(tmp_path)
