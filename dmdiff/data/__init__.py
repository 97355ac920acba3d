from dmdiff.data.sources import TEST_PHOTOS, TRAIN_PHOTOS, bundled_photos, dead_leaves, training_images  # noqa: F401
from dmdiff.data.dataset import PairedFolderDataset  # noqa: F401
