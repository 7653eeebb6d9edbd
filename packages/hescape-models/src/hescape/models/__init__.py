"""hescape.models: image and gene towers with their input contracts, projection heads and contrastive losses."""

from .base import GeneEncoder, ImageEncoder
from .config import FINETUNE_MODES, PROJECTIONS, ModelCfg, TowerCfg
from .contracts import GeneContract, ImageContract, contract_from_dict
from .errors import HescapeModelError
from .finetune import apply_finetune, count_parameters
from .heads import ProjectionHead
from .losses import ClipLoss, SigLipLoss, create_loss
from .model import MAX_LOGIT_SCALE, HescapeCLIP, cfg_from_dict, cfg_to_dict
from .registry import create_model, get_model_cfg, list_models, register_model
from .weights import WeightsError, WeightsSpec, load_weights, read_state_dict
from .zoo import (
    EncoderEntry,
    create_gene_encoder,
    create_image_encoder,
    describe_encoders,
    get_encoder_entry,
    list_gene_encoders,
    list_image_encoders,
    register_encoder,
)

__version__ = "0.2.0"

__all__ = [
    "ImageEncoder", "GeneEncoder", "ImageContract", "GeneContract", "contract_from_dict",
    "TowerCfg", "ModelCfg", "FINETUNE_MODES", "PROJECTIONS",
    "EncoderEntry", "register_encoder", "get_encoder_entry", "list_image_encoders", "list_gene_encoders",
    "create_image_encoder", "create_gene_encoder", "describe_encoders",
    "WeightsSpec", "WeightsError", "load_weights", "read_state_dict",
    "ProjectionHead", "apply_finetune", "count_parameters",
    "HescapeCLIP", "MAX_LOGIT_SCALE", "cfg_from_dict", "cfg_to_dict",
    "ClipLoss", "SigLipLoss", "create_loss",
    "create_model", "get_model_cfg", "list_models", "register_model",
    "HescapeModelError",
]
