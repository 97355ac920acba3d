"""Multipath training of DMDiff (``dmdiff train``) and the pseudo-pair step (``dmdiff pseudo``)."""

from dmdiff.train.config import (  # noqa: F401
    PATHS,
    LossConfig,
    PathProbs,
    PseudoConfig,
    RecipeConfig,
    TrainConfig,
    load_train_config,
)
