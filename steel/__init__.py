"""steel: PyTorch Lightning experiment suite for Severstal steel surface defect segmentation."""

__version__ = "0.1.0"

N_CLASSES = 4
KAGGLE_SHAPE = (256, 1600)
