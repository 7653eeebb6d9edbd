"""Image encoders. Importing this package registers every built-in image encoder family."""

from . import (
    conch,  # noqa: F401
    ctranspath,  # noqa: F401
    small,  # noqa: F401  (random-init demo and test encoders)
    timm_pathology,  # noqa: F401  (UNI, UNI2-h, GigaPath, H-optimus, H0-mini, Virchow2, ResNet-50)
)
