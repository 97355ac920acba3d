from dmdiff.model.backbone import PRESETS, Backbone, load_backbone, save_backbone  # noqa: F401
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig, Prompts, RestoreLatents  # noqa: F401
from dmdiff.model.lora import (  # noqa: F401
                               ModulatedLora,
                               ModulationMLP,
                               ModulationState,
                               add_modulated_lora,
                               trainable_parameters,
)
from dmdiff.model.pipeline import DMDiffPipeline, DMDiffPipelineOutput  # noqa: F401
from dmdiff.model.svda import SVDA, SVDAOutput, degradation_features  # noqa: F401
