"""Image-quality metrics: PSNR, SSIM, LPIPS (only with its real weights) and a gradient sharpness proxy.

Used by training validation, ``dmdiff evaluate``, the notebooks and the widgets. All full-reference
metrics take the **output first, the reference second** (PSNR and SSIM are symmetric anyway).

Inputs (the conventions of docs/architecture.md): numpy ``(H, W, 3)`` or a stack ``(N, H, W, 3)``, or torch ``(3, H, W)``
or ``(B, 3, H, W)``; float sRGB values nominally in ``[0, 1]``, channel order R, G, B. Values are
**not clipped** here (clip and quantise outputs first if that is your protocol); NaN/inf and integer
dtypes are refused. A single image gives a ``float``, a batch a float64 ``numpy`` array ``(N,)``.

Definitions, so numbers can be compared with papers:

* **PSNR** ``= 10·log10(data_range² / MSE)`` in dB, the MSE over all pixels and all channels of
  one image (``on="rgb"``) or over the luma channel (``on="y"``), computed in float64. Identical
  images give ``inf``. Equals ``skimage.metrics.peak_signal_noise_ratio(ref, out,
  data_range=data_range)`` (checked to 1e-6 dB in the tests).
* **Y** (``on="y"``): ITU-R BT.601 luma as in the super-resolution literature (MATLAB
  ``rgb2ycbcr``, BasicSR ``test_y_channel``, skimage ``rgb2ycbcr``): the "studio swing" range
  16–235 of 255, ``Y = (16 + 65.481·R + 128.553·G + 24.966·B) / 255`` for R, G, B in ``[0, 1]``;
  not rounded to 8 bits. PSNR/SSIM on Y then use ``data_range = 1`` (i.e. 255 on the 8-bit scale).
* **SSIM** is scikit-image's ``structural_similarity`` (the field's reference implementation),
  called on float64 arrays with ``data_range=1`` and, for RGB, ``channel_axis=-1`` (the mean of
  the per-channel SSIMs). Default ``gaussian=True``: the settings of Wang et al. (2004), as
  skimage's documentation gives them — ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False`` (an 11×11 Gaussian window, ``truncate=3.5``), as BasicSR and
  pyiqa use. ``gaussian=False``: skimage's defaults (7×7 uniform window, sample covariance).
* ``crop_border=c`` drops ``c`` pixels on each side before measuring (the SR convention).
* **LPIPS** (Zhang et al. 2018) via the ``lpips`` package, default trunk AlexNet (the LPIPS
  authors' recommendation for a forward metric, pyiqa's default; ``net="vgg"`` for the VGG
  variant used in the training loss). The trunk's ImageNet weights are a download that this
  package never makes: see :func:`lpips_status` and :class:`LPIPSMetric`. No number from a random
  trunk is ever reported as LPIPS.
* **Gradient sharpness** (:func:`mean_gradient_magnitude`, :func:`gradient_sharpness_ratio`): a
  simple, weight-free proxy for the perception side of the fidelity–perception curve. It is *not*
  a perceptual metric: it measures how much edge contrast an image has, and noise, ringing and
  hallucinated texture raise it just like real detail does.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import scipy.ndimage
import torch
from skimage.metrics import structural_similarity

from dmdiff.errors import DmdiffError

__all__ = [
    "MetricInputError", "Y_COEFFS", "Y_OFFSET", "to_numpy_images", "rgb_to_y", "psnr", "psnr_torch",
    "ssim", "ssim_map", "mean_gradient_magnitude", "gradient_sharpness_ratio", "lpips_status", "LPIPSMetric",
    "compute_metrics", "summarize",
]

#: BT.601 luma weights on the 16–235 scale (per unit R, G, B, on 0–255 output): Y = 16 + Σ w·RGB.
Y_COEFFS = (65.481, 128.553, 24.966)
#: The luma offset on the 0–255 scale.
Y_OFFSET = 16.0
#: BT.601 full-range luma weights (= Y_COEFFS / 219), used for the gradient measure.
_LUMA_FULL = np.array([0.299, 0.587, 0.114])


class MetricInputError(DmdiffError, ValueError):
    """Images handed to a metric have the wrong shape, dtype or values."""


# ---------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def to_numpy_images(x, name: str = "image") -> tuple[np.ndarray, bool]:
    """Convert images to a float64 numpy stack ``(N, H, W, 3)``.

    Args:
        x: numpy ``(H, W, 3)`` / ``(N, H, W, 3)`` or torch ``(3, H, W)`` / ``(B, 3, H, W)`` (any
            device; detached), float values.
        name: how to call the input in error messages.

    Returns:
        ``(stack, batched)``: the float64 stack and whether the input was a batch.

    Raises:
        MetricInputError: wrong number of dimensions or channels, integer/bool dtype, NaN or inf.
    """
    if _is_torch(x):
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise MetricInputError(f"{name}: torch images must be (3, H, W) or (B, 3, H, W), got shape "
                                   f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise MetricInputError(f"{name}: expected float values in [0, 1], got dtype {x.dtype}")
        batched = x.ndim == 4
        arr = x.detach().to("cpu").double().numpy()
        arr = np.moveaxis(arr if batched else arr[None], 1, -1)
    else:
        arr = np.asarray(x)
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise MetricInputError(f"{name}: numpy images must be (H, W, 3) or (N, H, W, 3), got shape "
                                   f"{arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise MetricInputError(f"{name}: expected float values in [0, 1], got dtype {arr.dtype} "
                                   "(for 8-bit data divide by 255)")
        batched = arr.ndim == 4
        arr = arr.astype(np.float64, copy=False) if batched else arr[None].astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise MetricInputError(f"{name} contains NaN or infinite values")
    return arr, batched


def _pair(output, reference, crop_border: int) -> tuple[np.ndarray, np.ndarray, bool]:
    a, batched_a = to_numpy_images(output, "output")
    b, batched_b = to_numpy_images(reference, "reference")
    if a.shape != b.shape or batched_a != batched_b:
        raise MetricInputError(f"output and reference differ in shape: {_shape(output)} vs {_shape(reference)}")
    if _check_crop(crop_border, a.shape[1:3]):
        a = a[:, crop_border:-crop_border, crop_border:-crop_border]
        b = b[:, crop_border:-crop_border, crop_border:-crop_border]
    return a, b, batched_a


def _check_crop(crop_border, size: tuple[int, int]) -> int:
    """Validate ``crop_border`` for an image of ``size`` (H, W); return it."""
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise MetricInputError(f"crop_border must be an integer >= 0, got {crop_border!r}")
    if 2 * crop_border >= min(size):
        raise MetricInputError(f"crop_border={crop_border} leaves nothing of a {size[1]}×{size[0]} image")
    return int(crop_border)


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _check_on(on: str) -> None:
    if on not in ("rgb", "y"):
        raise MetricInputError(f'on must be "rgb" or "y", got {on!r}')


def _result(values: np.ndarray, batched: bool):
    return values if batched else float(values[0])


def rgb_to_y(rgb):
    """BT.601 luma on the 16–235 scale, divided by 255 (see the module docstring).

    Args:
        rgb: ``(..., 3)`` numpy array or ``(B, 3, H, W)`` / ``(3, H, W)`` torch tensor, R, G, B in [0, 1].

    Returns:
        Luma in ``[16/255, 235/255]`` for inputs in ``[0, 1]``: numpy ``(...)`` (float64 for numpy
        input) or torch ``(B, H, W)`` / ``(H, W)`` (same dtype, differentiable).
    """
    w = [c / 255.0 for c in Y_COEFFS]
    if _is_torch(rgb):
        return Y_OFFSET / 255.0 + w[0] * rgb[..., 0, :, :] + w[1] * rgb[..., 1, :, :] + w[2] * rgb[..., 2, :, :]
    rgb = np.asarray(rgb, dtype=np.float64)
    return Y_OFFSET / 255.0 + rgb @ np.array(w)


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------


def psnr(output, reference, data_range: float = 1.0, on: str = "rgb", crop_border: int = 0):
    """Peak signal-to-noise ratio in dB (module docstring: definition, Y, input forms).

    Args:
        output, reference: images of the same shape, ``(H, W, 3)`` / ``(N, H, W, 3)`` numpy or
            ``(3, H, W)`` / ``(B, 3, H, W)`` torch, float in ``[0, 1]``.
        data_range: the peak value (1.0 for ``[0, 1]`` images).
        on: ``"rgb"`` (all channels) or ``"y"`` (BT.601 luma, 16–235 scaled).
        crop_border: pixels dropped on each side first.

    Returns:
        ``float`` for one image, float64 ``(N,)`` array for a batch; ``inf`` where images are equal.
    """
    _check_on(on)
    if not data_range > 0:
        raise MetricInputError(f"data_range must be > 0, got {data_range!r}")
    a, b, batched = _pair(output, reference, crop_border)
    if on == "y":
        a, b = rgb_to_y(a), rgb_to_y(b)
    mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse)
    return _result(values, batched)


def psnr_torch(output, reference, data_range: float = 1.0, on: str = "rgb", crop_border: int = 0):
    """Differentiable, batched PSNR in dB for training logs and losses (torch, any device).

    Same definition as :func:`psnr` (MSE per image over channels and pixels, or over BT.601 Y),
    computed in the inputs' dtype (float32 gives about 1e-5 dB agreement with :func:`psnr`).

    Args:
        output, reference: ``(B, 3, H, W)`` (or ``(3, H, W)``) float tensors in ``[0, 1]``.

    Returns:
        ``(B,)`` tensor (a 0-d tensor for ``(3, H, W)`` input); ``inf`` where images are equal.
    """

    _check_on(on)
    if not (_is_torch(output) and _is_torch(reference)):
        raise MetricInputError("psnr_torch takes torch tensors; use psnr for numpy images")
    if output.shape != reference.shape or output.ndim not in (3, 4) or output.shape[-3] != 3:
        raise MetricInputError(f"psnr_torch needs two (B, 3, H, W) tensors of the same shape, got "
                               f"{tuple(output.shape)} and {tuple(reference.shape)}")
    c = _check_crop(crop_border, tuple(output.shape[-2:]))
    if c:
        output, reference = output[..., c:-c, c:-c], reference[..., c:-c, c:-c]
    if on == "y":
        output, reference = rgb_to_y(output), rgb_to_y(reference)
        dims = (-2, -1)
    else:
        dims = (-3, -2, -1)
    mse = torch.mean((output - reference) ** 2, dim=dims)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(output, reference, on: str = "rgb", crop_border: int = 0, gaussian: bool = True):
    """Structural similarity through ``skimage.metrics.structural_similarity`` (module docstring).

    Args:
        output, reference: images of the same shape (see :func:`psnr`), float in ``[0, 1]``.
        on: ``"rgb"`` (mean of per-channel SSIM, ``channel_axis=-1``) or ``"y"`` (BT.601 luma).
        crop_border: pixels dropped on each side first.
        gaussian: True — Wang et al. settings (``gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False``, 11×11 window); False — skimage defaults (7×7 uniform).
            ``data_range=1`` always.

    Returns:
        ``float`` for one image, float64 ``(N,)`` array for a batch.

    Raises:
        MetricInputError: bad inputs, or an image smaller than the window (11 or 7 pixels).
    """

    _check_on(on)
    a, b, batched = _pair(output, reference, crop_border)
    a, b, kwargs = _ssim_inputs(a, b, on, gaussian)
    values = np.array([structural_similarity(x, y, **kwargs) for x, y in zip(a, b)], dtype=np.float64)
    return _result(values, batched)


def _ssim_inputs(a: np.ndarray, b: np.ndarray, on: str, gaussian: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(N, H, W, 3)`` pairs → what :func:`ssim` hands scikit-image: the images (Y for ``on="y"``)
    and the keyword arguments; MetricInputError for images smaller than the window."""
    win = 11 if gaussian else 7
    if min(a.shape[1:3]) < win:
        raise MetricInputError(f"SSIM needs images of at least {win}×{win} pixels (after crop_border), "
                               f"got {a.shape[2]}×{a.shape[1]}")
    kwargs = dict(data_range=1.0)
    if gaussian:
        kwargs.update(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if on == "y":
        return rgb_to_y(a), rgb_to_y(b), kwargs
    return a, b, {**kwargs, "channel_axis": -1}


def ssim_map(output, reference, on: str = "rgb", gaussian: bool = True) -> tuple[np.ndarray, int]:
    """The local SSIM of one image pair, ``(H, W)`` float64 (the mean over channels for ``"rgb"``),
    and the border width ``b`` that :func:`ssim` leaves out: ``ssim(...) == map[b:-b, b:-b].mean()``.
    Averaging the map over a region of pixels gives that region's SSIM (e.g. a field zone)."""
    _check_on(on)
    a, b, batched = _pair(output, reference, 0)
    if batched:
        raise MetricInputError("ssim_map takes one image pair, not a batch")
    a, b, kwargs = _ssim_inputs(a, b, on, gaussian)
    _, full = structural_similarity(a[0], b[0], full=True, **kwargs)
    full = full.mean(axis=-1) if full.ndim == 3 else full
    return full.astype(np.float64), (11 if gaussian else 7) // 2


# ---------------------------------------------------------------------------------------------
# gradient sharpness (a proxy, not a perceptual metric)
# ---------------------------------------------------------------------------------------------


def mean_gradient_magnitude(image, crop_border: int = 0):
    """No-reference edge-contrast measure: the mean Sobel gradient magnitude of the luma.

    Luma is BT.601 full range (``0.299 R + 0.587 G + 0.114 B``, sRGB values); the gradient is
    ``scipy.ndimage.sobel / 8`` along each axis (units: luma per pixel, so a ramp of slope ``s``
    gives ``s``), mirrored at the border; the magnitude ``sqrt(gx² + gy²)`` is averaged over the
    image. Blur lowers it; noise, ringing and over-sharpening raise it — it is a sharpness
    *proxy*, not a perceptual metric.

    Args:
        image: ``(H, W, 3)`` / ``(N, H, W, 3)`` numpy or ``(3, H, W)`` / ``(B, 3, H, W)`` torch.
        crop_border: pixels dropped on each side after the gradient is taken.

    Returns:
        ``float`` for one image, float64 ``(N,)`` array for a batch (luma units per pixel).
    """

    a, batched = to_numpy_images(image)
    out = []
    for img in a:
        luma = img @ _LUMA_FULL
        gy = scipy.ndimage.sobel(luma, axis=0, mode="mirror") / 8.0
        gx = scipy.ndimage.sobel(luma, axis=1, mode="mirror") / 8.0
        mag = np.hypot(gx, gy)
        if _check_crop(crop_border, mag.shape):
            mag = mag[crop_border:-crop_border, crop_border:-crop_border]
        out.append(mag.mean())
    return _result(np.array(out, dtype=np.float64), batched)


def gradient_sharpness_ratio(output, reference, crop_border: int = 0):
    """Edge contrast of ``output`` relative to ``reference``: ratio of :func:`mean_gradient_magnitude`.

    1 means as much gradient energy as the reference; < 1 blurrier; > 1 sharper than the reference,
    or noisier, or ringing (this proxy cannot tell which). Use it as the x axis of a
    fidelity–perception plot only with that caveat; it is not LPIPS or any learned metric.

    Returns:
        ``float`` for one image pair, float64 ``(N,)`` array for a batch.
    """
    a, b, batched = _pair(output, reference, 0)
    num = np.atleast_1d(mean_gradient_magnitude(a, crop_border))
    den = np.atleast_1d(mean_gradient_magnitude(b, crop_border))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = num / den
    return _result(values, batched)


# ---------------------------------------------------------------------------------------------
# LPIPS, only with real weights
# ---------------------------------------------------------------------------------------------

_LPIPS_NETS = ("alex", "vgg")


def _backbone_weights(net: str):
    """The torchvision weights enum entry that ``lpips`` asks for (``pretrained=True``) for a trunk."""
    from torchvision import models  # local: LPIPS only, with downloaded weights

    if net == "alex":
        return models.AlexNet_Weights.IMAGENET1K_V1
    if net == "vgg":
        return models.VGG16_Weights.IMAGENET1K_V1
    raise MetricInputError(f"LPIPS net must be one of {_LPIPS_NETS}, got {net!r}")


def _backbone_path(net: str) -> tuple[Path, str]:
    """Where torch's hub cache keeps the trunk's checkpoint, and the URL it comes from."""

    url = _backbone_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def _linear_path(net: str) -> Path:
    """The LPIPS linear-layer weights shipped inside the ``lpips`` package (v0.1)."""
    import lpips  # local: LPIPS is optional (its weights are a download)

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """Whether LPIPS with real weights can run here, without downloading anything.

    Checks that ``lpips`` imports, that its linear-layer weights (``lpips/weights/v0.1/<net>.pth``)
    are present, and that torchvision's ImageNet checkpoint of the trunk is in torch's hub cache
    (``torch.hub.get_dir()/checkpoints/``: ``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``;
    ``$TORCH_HOME`` moves it). The file's hash is checked when :class:`LPIPSMetric` loads it.

    Args:
        net: ``"alex"`` or ``"vgg"``.

    Returns:
        ``(available, reason)``: ``reason`` says what was found, or what is missing and how to get it.
    """
    if net not in _LPIPS_NETS:
        raise MetricInputError(f"LPIPS net must be one of {_LPIPS_NETS}, got {net!r}")
    try:
        lin = _linear_path(net)
    except ImportError as exc:
        return False, f"the lpips package is not installed ({exc}); pip install lpips"
    if not lin.is_file():
        return False, f"the lpips package lacks its linear-layer weights {lin}; reinstall lpips"
    path, url = _backbone_path(net)
    if not path.is_file() or path.stat().st_size == 0:
        return False, (f"LPIPS-{net} needs the ImageNet weights of its trunk, which are not downloaded "
                       f"automatically: fetch {url} and save it as {path} (torch's hub cache; set "
                       f"$TORCH_HOME to use another folder), e.g. `python -c \"import torchvision; "
                       f"torchvision.models.{'alexnet' if net == 'alex' else 'vgg16'}(weights='IMAGENET1K_V1')\"` "
                       "on a machine with internet access")
    return True, f"LPIPS-{net}: trunk weights {path}, linear weights {lin}"


def _sha256_prefix_ok(path: Path) -> tuple[bool, str]:
    """Check a torch-hub file name's ``-<sha256 prefix>.`` against the file's content."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if not match:
        return True, ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    got = digest.hexdigest()
    return got.startswith(match.group(1)), got


class LPIPSMetric:
    """LPIPS distance (lower is more similar) with the published weights, or a clear error.

    Builds ``lpips.LPIPS`` with a *random* trunk and no linear weights (so ``lpips`` and
    torchvision download nothing), then loads the trunk's torchvision ImageNet checkpoint from
    torch's hub cache and the linear layers from the ``lpips`` package, both with
    ``torch.load(..., weights_only=True)``; every parameter must be covered by a checkpoint.

    Args:
        net: ``"alex"`` (default) or ``"vgg"``.
        device: torch device for the network.
        check_hash: verify the trunk file's SHA-256 against the prefix in its name (as torch hub does).

    Raises:
        DmdiffError: the weights are missing (the message names the file, its URL and where to put
            it), corrupt, or do not fit the network.

    Call ``metric(output, reference)`` with images as in :func:`psnr` (``[0, 1]`` values; LPIPS sees
    them mapped to ``[-1, 1]``); returns a ``float`` or a float64 ``(N,)`` array. No gradients.
    """

    def __init__(self, net: str = "alex", device="cpu", check_hash: bool = True):
        available, reason = lpips_status(net)
        if not available:
            raise DmdiffError(f"LPIPS is unavailable: {reason}")
        import lpips

        path, url = _backbone_path(net)
        if check_hash:
            ok, got = _sha256_prefix_ok(path)
            if not ok:
                raise DmdiffError(f"{path} does not match the SHA-256 in its name (got {got[:16]}…): the file "
                                  f"is corrupt or truncated; delete it and download {url} again")
        with warnings.catch_warnings():  # torchvision's deprecation warning for pretrained=False
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        try:
            trunk = torch.load(path, map_location="cpu", weights_only=True)
            linear = torch.load(_linear_path(net), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling/IO failure means an unusable file
            raise DmdiffError(f"cannot load LPIPS weights ({exc}); delete {path} and download {url} again") from exc
        loaded = {}
        for slice_name, block in model.net.named_children():  # slices keep torchvision's layer indices
            for index, layer in block.named_children():
                for pname, _ in layer.named_parameters():
                    src = f"features.{index}.{pname}"
                    if src not in trunk:
                        raise DmdiffError(f"{path} has no tensor {src!r}: not the {net} ImageNet checkpoint; "
                                          f"download {url} again")
                    loaded[f"net.{slice_name}.{index}.{pname}"] = trunk[src]
        loaded.update(linear)
        missing = [name for name, _ in model.named_parameters() if name not in loaded]
        if missing:
            raise DmdiffError(f"LPIPS weights do not cover {missing[:3]}; reinstall lpips / re-download {url}")
        try:
            result = model.load_state_dict(loaded, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise DmdiffError(f"LPIPS weights do not fit the {net} network ({exc}); re-download {url}") from exc
        if result.unexpected_keys:
            raise DmdiffError(f"unexpected tensors {result.unexpected_keys[:3]} in the LPIPS weights; "
                              "reinstall lpips")
        self.net = net
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.name = f"lpips_{net}"

    def __repr__(self) -> str:
        return f"LPIPSMetric(net={self.net!r}, device={str(self.device)!r})"

    def __call__(self, output, reference):
        a, b, batched = _pair(output, reference, 0)
        ta = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float().to(self.device)
        tb = torch.from_numpy(np.ascontiguousarray(b.transpose(0, 3, 1, 2))).float().to(self.device)
        with torch.no_grad():
            d = self.model(ta, tb, normalize=True)
        return _result(d.reshape(-1).double().cpu().numpy(), batched)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def compute_metrics(output, reference, crop_border: int = 0, lpips: LPIPSMetric | None = None) -> dict[str, float]:
    """All full-reference metrics of one image pair, as a flat dict of floats.

    Keys: ``psnr``, ``psnr_y`` (dB), ``ssim``, ``ssim_y`` (Wang et al. settings),
    ``grad_ratio`` (:func:`gradient_sharpness_ratio`) and, when an :class:`LPIPSMetric` is given,
    ``lpips_alex`` / ``lpips_vgg``. Feed a list of these to :func:`summarize`.
    """
    a, b, batched = _pair(output, reference, 0)
    if batched:
        raise MetricInputError("compute_metrics takes one image pair; loop over a batch")
    row = {
        "psnr": psnr(a[0], b[0], on="rgb", crop_border=crop_border),
        "psnr_y": psnr(a[0], b[0], on="y", crop_border=crop_border),
        "ssim": ssim(a[0], b[0], on="rgb", crop_border=crop_border),
        "ssim_y": ssim(a[0], b[0], on="y", crop_border=crop_border),
        "grad_ratio": gradient_sharpness_ratio(a[0], b[0], crop_border=crop_border),
    }
    if lpips is not None:
        if crop_border:
            c = crop_border
            a, b = a[:, c:-c, c:-c], b[:, c:-c, c:-c]
        row[lpips.name] = lpips(a[0], b[0])
    return row


def summarize(rows: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each numeric column of a list of per-image metric dicts.

    Non-numeric values (names, paths) and booleans are skipped; a key missing from some rows is
    summarised over the rows that have it. The std is the population std (``ddof=0``) over images.
    A column holding ``inf`` (the PSNR of an image identical to its reference) gets mean ``inf``
    and std NaN.

    Returns:
        ``{key: {"mean": float, "std": float, "n": int}}`` in first-seen key order.
    """
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            columns.setdefault(key, []).append(float(value))
    out = {}
    for key, values in columns.items():
        v = np.array(values, dtype=np.float64)
        finite = np.all(np.isfinite(v))
        out[key] = {"mean": float(v.mean()), "std": float(v.std()) if finite else math.nan, "n": len(values)}
    return out
