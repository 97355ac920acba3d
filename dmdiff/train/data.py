"""Training batches as a pure function of ``(seed, micro-batch index)``, and the validation pairs.

Nothing here keeps iteration state, so a resumed run sees exactly the batches the interrupted
one would have seen. Global micro-batch ``m`` (optimizer step ``m // grad_accum``) of process
``rank`` among ``world`` holds the sample *slots* ``p = (m · world + rank) · batch_size + i``:

- **order**: slot ``p`` takes pair ``perm_e[p mod N]`` with ``e = p // N`` (the epoch) and
  ``perm_e`` a permutation drawn from ``(seed, e)``: every pair once per epoch, reshuffled per epoch;
- **crops/flips**: :class:`~dmdiff.data.dataset.PairedFolderDataset` with ``set_epoch(p)``, i.e.
  drawn from ``(seed, p, index)``;
- **path**: ``"batch"`` sampling draws one path per micro-batch from ``(seed, m)`` (the same on
  every process); ``"sample"`` one per slot from ``(seed, p)``;
- **exposure** (``exposure_range``): one gain per slot from ``(seed, p)``.

Targets (docs/method.md): positive ``lr → gt``; neutral ``lr → gt_blur`` (the ideal-lens image; ``gt``
where a dataset has none); negative ``gt → lr``. A model with a deconvolved input
(``DMDiffConfig.input_deconvolves``) sees ``lr_input``, its whole frame's network input cropped with
the pair, wherever ``lr`` is the input (:func:`path_input`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dmdiff.data.dataset import LensGrids, PairedFolderDataset, crop_maps, gt_blur_note, has_split, read_lens
from dmdiff.errors import DmdiffError
from dmdiff.model.dmdiff import DMDiffConfig, colour_anchor, network_input
from dmdiff.optics.deconvolution import check_psf_grid
from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear
from dmdiff.train.config import PATH_IO, PATHS, TrainConfig, TrainWarning
from dmdiff.train.pseudo import pairs_lens

_ORDER, _PATH_BATCH, _PATH_SAMPLE, _EXPOSURE = 1, 2, 3, 4   # stream tags of the seed sequences
IMAGES = ("lr", "gt", "gt_blur")
#: What a model computes on whole captures, by the key a training pair carries it under: its colour
#: anchor and its network input (:func:`frame_products`).
FRAME_PRODUCTS = ("anchor", "lr_input")
#: A product of whole images: ``product(frame, name)``, ``frame`` ``(1, 3, H, W)`` being image
#: ``name`` of its dataset, → ``(1, 3, H, W)``.
FrameProduct = Callable[[torch.Tensor, str], torch.Tensor]


def input_too(model_config: DMDiffConfig) -> str:
    """``" (and model.KEY: null)"``, KEY the key that deconvolves the network input of a model whose
    anchor deconvolution an error asks to switch off (the input needs the anchor's grid); ``""`` when
    its input is the capture."""
    key = model_config.input_deconvolution_key
    return "" if key is None else f" (and model.{key}: null)"


def lens_grids(root: str | Path) -> LensGrids | None:
    """The true PSF grid of each image's lens in the training set ``root``: its ``lens.json``'s (one
    lens, or each image's in a lens family), or for pseudo pairs the lenses ``pseudo.json`` records
    they imitate; None without either (real captures).

    Raises:
        DmdiffError: an unreadable ``lens.json``, or pseudo pairs that do not record their lenses.
    """
    meta = read_lens(root)
    return LensGrids.of_record(pairs_lens(Path(root)) if meta is None else meta)


def frame_products(model_config: DMDiffConfig, root: str | Path) -> dict[str, FrameProduct]:
    """What the dataset at ``root`` must compute on whole frames and crop with the images, by key
    (:data:`FRAME_PRODUCTS`): the colour anchor (``anchor``) of a model with the Wiener anchor
    (``anchor_wiener_nsr``) and the network input (``lr_input``) of one with a deconvolved input
    (``input_rl_iterations`` or ``input_wiener_nsr``); empty when the model computes its anchor on the training crop itself.
    Both deconvolve with a PSF grid that spans the frame, so a crop's is the part of its frame's that
    the crop covers, as at inference (tiles take the whole photo's). Each frame is deconvolved with
    its own lens's grid (:func:`lens_grids`): the dataset's lens, or in a lens family the image's,
    as ``dmdiff evaluate`` and ``dmdiff restore --lens`` do.

    Raises:
        DmdiffError: the model's anchor deconvolves and ``root`` records no lens.
    """
    if model_config.anchor_wiener_nsr is None:
        return {}
    grids = lens_grids(root)
    if grids is None:
        raise DmdiffError(f"model.anchor_wiener_nsr: {root} has no lens.json with a lens spec (real captures?): "
                          "no PSF grid to deconvolve the colour anchor with; set model.anchor_wiener_nsr: null"
                          f"{input_too(model_config)} to anchor to the capture itself")
    normalised: dict[str, torch.Tensor] = {}

    def grid(name: str) -> torch.Tensor:
        key = grids.spec(name).cache_key()
        if key not in normalised:
            normalised[key] = torch.from_numpy(check_psf_grid(grids(name))).float()
        return normalised[key]

    products = {"anchor": lambda frame, name: colour_anchor(frame, model_config, grid(name))}
    if model_config.input_deconvolves:
        products["lr_input"] = lambda frame, name: network_input(frame, model_config, grid(name))
    return products


def path_input(pair: dict, source: str) -> torch.Tensor:
    """The network input of a training or validation ``pair`` for a path reading ``source``
    (:data:`~dmdiff.train.config.PATH_IO`): the deconvolved capture ``lr_input`` where the pair has
    one and the path reads ``lr``, else ``pair[source]``."""
    return pair["lr_input"] if source == "lr" and "lr_input" in pair else pair[source]


def open_train_sets(cfg: TrainConfig) -> list[PairedFolderDataset]:
    """The train splits of ``cfg.data`` and ``cfg.extra_data`` (validated on opening; with
    :func:`frame_products`, ``PairedFolderDataset.with_frame_products`` adds the frames' colour
    anchors and network inputs).

    Maps are used only when every dataset has them (else none are, with a warning); a dataset
    without ``gt_blur_train/`` makes the neutral path fall back to its GT (warning), when the
    neutral path is trained at all.

    Raises:
        DmdiffError: a folder is missing, empty, has mismatched pairs or images smaller than
            ``crop_px`` (the dataset's own checks), or the datasets' maps differ in grid size.
    """
    roots = [cfg.data, *cfg.extra_data]
    sets = [PairedFolderDataset(root, "train", crop_px=cfg.crop_px, seed=cfg.seed, flips=cfg.flips)
            for root in roots]
    with_maps = [ds.map_paths is not None for ds in sets]
    if any(with_maps) and not all(with_maps):
        without = [str(ds.root) for ds, m in zip(sets, with_maps) if not m]
        warnings.warn(f"training without degradation maps: {', '.join(without)} has none (maps/), so the "
                      "maps of the other datasets are not used either", TrainWarning, stacklevel=2)
        sets = [PairedFolderDataset(root, "train", crop_px=cfg.crop_px, seed=cfg.seed, flips=cfg.flips,
                                    use_maps=False) for root in roots]
    grids = {str(ds.root): np.load(ds.map_paths[0], mmap_mode="r", allow_pickle=False).shape
             for ds in sets if ds.map_paths is not None}
    if len(set(grids.values())) > 1:
        raise DmdiffError(f"the datasets' maps have different shapes ({grids}); batches need one grid size")
    if cfg.path_probs.normalised()[1] > 0:
        for root in roots:
            note = gt_blur_note(root)
            if note:
                warnings.warn(note, TrainWarning, stacklevel=2)
        no_blur = [str(ds.root) for ds in sets if ds.gt_blur_paths is None]
        if no_blur:
            warnings.warn(f"{', '.join(no_blur)}: no gt_blur_train/ (ideal-lens images); the neutral path "
                          "uses the GT image as its target there", TrainWarning, stacklevel=2)
    return sets


class StepBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` → batch dict (module docstring). Use with ``DataLoader(batch_size=None)``.

    Items: ``input``, ``target`` float32 ``(B, 3, h, w)`` sRGB in ``[0, 1]``; ``path`` int64 ``(B,)``
    (index into :data:`PATHS`); ``maps`` float32 ``(B, 7, G, G)`` when the data has maps; ``anchor``
    ``(B, 3, h, w)``, the crops of the ``lr`` frames' colour anchors, when the datasets have one
    (``input`` is the pair's :func:`path_input`: the deconvolved capture for a model that has one);
    ``index`` int64 ``(B,)`` (pair index into the concatenated datasets).
    """

    def __init__(self, sets: Sequence[PairedFolderDataset], cfg: TrainConfig, n_micro: int,
                 rank: int = 0, world: int = 1):
        self.sets = list(sets)
        self.offsets = np.cumsum([0] + [len(ds) for ds in self.sets])
        self.n_pairs = int(self.offsets[-1])
        self.cfg, self.n_micro, self.rank, self.world = cfg, n_micro, rank, world
        self.probs = np.asarray(cfg.path_probs.normalised())

    def __len__(self) -> int:
        return self.n_micro

    def slots(self, m: int) -> np.ndarray:
        """Global sample slots of micro-batch ``m`` on this process."""
        b = self.cfg.batch_size
        start = (m * self.world + self.rank) * b
        return np.arange(start, start + b)

    def pair_index(self, slot: int) -> int:
        """The pair (index into the concatenated datasets) that fills ``slot``."""
        epoch, pos = divmod(int(slot), self.n_pairs)
        perm = np.random.default_rng([self.cfg.seed, _ORDER, epoch]).permutation(self.n_pairs)
        return int(perm[pos])

    def paths(self, m: int, slots: np.ndarray) -> np.ndarray:
        """Path ids ``(B,)`` of micro-batch ``m``."""
        seed = self.cfg.seed
        if self.cfg.path_sampling == "batch":
            path = np.random.default_rng([seed, _PATH_BATCH, m]).choice(len(PATHS), p=self.probs)
            return np.full(len(slots), path, dtype=np.int64)
        return np.array([np.random.default_rng([seed, _PATH_SAMPLE, int(p)]).choice(len(PATHS), p=self.probs)
                         for p in slots], dtype=np.int64)

    def item(self, slot: int, index: int) -> dict:
        """The cropped (and, with ``exposure_range``, re-exposed) pair for ``slot``."""
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        ds = self.sets[k]
        ds.set_epoch(slot)
        pair = ds[index - int(self.offsets[k])]
        if self.cfg.exposure_range is not None:
            lo, hi = self.cfg.exposure_range
            u = np.random.default_rng([self.cfg.seed, _EXPOSURE, int(slot)]).uniform()
            pair = {**pair, **{key: expose(pair[key], lo * (hi / lo) ** u) for key in IMAGES if key in pair}}
        return pair

    def __getitem__(self, m: int) -> dict:
        if not 0 <= m < self.n_micro:
            raise IndexError(m)
        slots = self.slots(m)
        paths = self.paths(m, slots)
        indices = [self.pair_index(p) for p in slots]
        inputs, targets, maps, anchors = [], [], [], []
        for slot, index, path in zip(slots, indices, paths):
            pair = self.item(int(slot), index)
            source, target = PATH_IO[PATHS[path]]
            inputs.append(path_input(pair, source))
            targets.append(pair.get(target, pair["gt"]))
            if "maps" in pair:
                maps.append(pair["maps"])
            if "anchor" in pair:
                anchors.append(pair["anchor"])
        batch = {"input": torch.stack(inputs), "target": torch.stack(targets),
                 "path": torch.from_numpy(paths), "index": torch.tensor(indices, dtype=torch.int64)}
        if maps:
            batch["maps"] = torch.stack(maps)
        if anchors:
            batch["anchor"] = torch.stack(anchors)
        return batch


def expose(image: torch.Tensor, gain: float) -> torch.Tensor:
    """An sRGB image (any shape, values in [0, 1]) with its linear light scaled by ``gain``, clipped."""
    return linear_to_srgb((srgb_to_linear(image) * gain).clamp(0, 1)).clamp(0, 1)


def validation_split(root: str | Path) -> str:
    """The split of the dataset at ``root`` that training validates on: ``"val"`` when it has one,
    else ``"test"`` (datasets of ``--images``, or made by older versions), with a warning, since
    settings must not be chosen on the test split."""
    if has_split(root, "val"):
        return "val"
    warnings.warn(f"{root} has no validation split (gt_val/): the training curve's validation uses its test "
                  "split; choose no setting by it", TrainWarning, stacklevel=3)
    return "test"


def validation_pairs(cfg: TrainConfig, use_maps: bool = True,
                     products: dict[str, FrameProduct] | None = None) -> list[dict]:
    """``cfg.val_images`` pairs of the validation split of ``cfg.data`` (:func:`validation_split`),
    evenly spaced over the sorted names (so the crops of one photo do not fill the set), centre-cropped to
    ``val_crop_px`` (when smaller than the image): dicts of ``lr``, ``gt`` ``(3, h, w)``, ``maps``
    ``(7, G, G)`` when present and ``use_maps``, the crops of the whole frame's ``products``
    (:func:`frame_products`: ``anchor``, ``lr_input``), ``name``.

    Raises:
        DmdiffError: validation is on but ``data`` has no usable validation or test split.
    """
    if cfg.val_images == 0:
        return []
    root = Path(cfg.data)
    split = validation_split(root)
    try:
        ds = PairedFolderDataset(root, split, use_maps=use_maps)
    except DmdiffError as e:
        raise DmdiffError(f"validation needs the {split} split of {root}: {e} (set val_images: 0 to "
                          "train without validation)") from None
    if products:
        ds = ds.with_frame_products(products)
    out = []
    count = min(cfg.val_images, len(ds))
    for i in sorted({round(k * (len(ds) - 1) / max(count - 1, 1)) for k in range(count)}):
        pair = ds[i]
        h, w = pair["gt"].shape[-2:]
        c = cfg.val_crop_px
        if c is not None and c < min(h, w):
            y0, x0 = (h - c) // 2, (w - c) // 2
            pair = {k: v[:, y0:y0 + c, x0:x0 + c] if k in (*IMAGES, *FRAME_PRODUCTS) else v for k, v in pair.items()}
            if "maps" in pair:
                pair["maps"] = torch.from_numpy(crop_maps(pair["maps"].numpy(), (h, w), (y0, x0, c, c)))
        out.append(pair)
    return out

