"""dmdiff: a workbench for Degradation-Modeled Multipath Diffusion (metalens photo restoration).

Layers, each importing only the ones before it (``tests/test_architecture.py`` holds the table):

* base: ``errors``, ``config``, ``outputs`` (what may be written where), ``runinfo``, ``weights``
  (safetensors), ``device``, ``imageio``, ``metrics``, ``viz``;
* ``dmdiff.optics``: metalens point-spread functions, spatially varying blur, sensor and ISP;
* ``dmdiff.data``: the bundled sources, dataset simulation, the paired-folder dataset;
* ``dmdiff.model``: backbones, degradation-modulated LoRA, SVDA, the DMDiff module and its pipeline
  (the one inference path);
* ``dmdiff.runs``: the run-folder layout, finding and loading trained models;
* ``dmdiff.train`` and ``dmdiff.restore``: training (loop, recipe, pseudo pairs, ablations) and
  restoring files;
* ``dmdiff.evaluation``: the held-out report, its methods, baselines and the α trade-off;
* applications: ``widgets``, ``bench``, ``repro``, ``cli`` (``python -m dmdiff``).
"""

__version__ = "0.1.0"
