"""hescape.models: image and gene towers, projection heads and contrastive losses."""

from .config import GeneEncoderCfg, ImageEncoderCfg, ModelCfg
from .encoders import MLPGeneEncoder, ProjectionHead, TimmImageEncoder
from .errors import HescapeModelError
from .losses import ClipLoss, SigLipLoss, create_loss
from .model import HescapeCLIP, cfg_from_dict, cfg_to_dict
from .registry import create_model, get_model_cfg, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "GeneEncoderCfg", "ImageEncoderCfg", "ModelCfg",
    "TimmImageEncoder", "MLPGeneEncoder", "ProjectionHead", "HescapeCLIP", "cfg_from_dict", "cfg_to_dict",
    "ClipLoss", "SigLipLoss", "create_loss",
    "create_model", "get_model_cfg", "list_models", "register_model",
    "HescapeModelError",
]
