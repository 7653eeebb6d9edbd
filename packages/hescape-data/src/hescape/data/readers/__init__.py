"""Readers of spatial-transcriptomics outputs: 10x matrices, Visium (Space Ranger) and Xenium bundles, images."""

from .image import ArrayImage, SlideImage, TiffImage, open_image
from .tenx import FeatureMatrix, read_10x_h5, read_10x_matrix, read_10x_mex

__all__ = ["ArrayImage", "SlideImage", "TiffImage", "open_image", "FeatureMatrix", "read_10x_h5",
           "read_10x_matrix", "read_10x_mex"]
