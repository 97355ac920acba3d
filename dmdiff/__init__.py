"""dmdiff: a workbench for Degradation-Modeled Multipath Diffusion (metalens photo restoration).

Subpackages:
    dmdiff.optics  metalens point-spread functions, spatially varying blur, sensor and ISP.
    dmdiff.data    image reading/writing, dataset simulation, the paired-folder dataset.
    dmdiff.model   backbones, degradation-modulated LoRA, SVDA, the DMDiff module and pipeline.
"""

__version__ = "0.1.0"
