from dmdiff.optics.blur import SpatiallyVaryingBlur  # noqa: F401
from dmdiff.optics.camera import MAP_CHANNELS, Capture, MetalensCamera  # noqa: F401
from dmdiff.optics.grid import PSFGrid, ideal_psf_rgb, psf_grid, sharpness_maps  # noqa: F401
from dmdiff.optics.propagation import ideal_psf, psf  # noqa: F401
from dmdiff.optics.spec import MetalensSpec, SpecError  # noqa: F401
