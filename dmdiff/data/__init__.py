from dmdiff.data.dataset import PairedFolderDataset  # noqa: F401
from dmdiff.data.sources import (  # noqa: F401
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    bundled_photos,
    dead_leaves,
    training_images,
)
