"""hescape.data: paired H&E / gene-expression datasets.

Gene panels of the HESCAPE benchmark, a synthetic Xenium-like generator, 55 µm pseudo-spot pooling,
sharded Arrow datasets with a manifest, and a torch Dataset over them; readers of real Xenium bundles and
Space Ranger outputs with µm-exact H&E patches (``hescape-data build ...``).
"""

from .arrow import SCHEMA_VERSION, DatasetWriter, SpotRecords, encode_png, read_manifest, verify_dataset
from .batch_effects import BatchEffects
from .build import build_synthetic_dataset, cache_dir, default_dataset
from .dataset import PairedSpotDataset, decode_image
from .errors import (
    AlignmentError,
    DatasetFormatError,
    HescapeDataError,
    InputFormatError,
    OutputLocationError,
    PanelMismatchError,
    SplitLeakageError,
)
from .ingest import PatchOptions, SpotOptions, build_visium_dataset, build_visium_hd_dataset, build_xenium_dataset
from .ingest_more import build_anndata_dataset, build_hest_dataset
from .ingest_spatialdata import build_spatialdata_dataset
from .merge import merge_datasets
from .panels import GenePanel, list_panels, load_panel, load_split_preset
from .patches import extract_patch, extract_patches
from .pseudospots import assign_cells, pool_counts, spot_grid
from .readers.visium import read_visium
from .readers.visium_hd import read_visium_hd
from .readers.xenium import read_xenium
from .samplesheet import build_from_samplesheet, read_samplesheet
from .splits import apply_splits, check_no_donor_leakage, donor_split_assignment, preset_split_assignment
from .synthetic import SyntheticConfig, generate_sample
from .xenium_bundle import XeniumBundleOptions, write_xenium_bundle

__version__ = "0.1.0"

__all__ = [
    # datasets on disk
    "SCHEMA_VERSION", "DatasetWriter", "SpotRecords", "encode_png", "read_manifest", "verify_dataset",
    "PairedSpotDataset", "decode_image",
    # synthetic data
    "SyntheticConfig", "generate_sample", "build_synthetic_dataset", "default_dataset", "cache_dir", "BatchEffects",
    # panels and splits
    "GenePanel", "list_panels", "load_panel", "load_split_preset", "check_no_donor_leakage",
    "apply_splits", "donor_split_assignment", "preset_split_assignment",
    # real inputs: readers, µm-exact patches, ingestion
    "read_xenium", "read_visium", "read_visium_hd", "extract_patch", "extract_patches", "build_xenium_dataset",
    "build_visium_dataset", "build_visium_hd_dataset", "build_spatialdata_dataset",
    "build_anndata_dataset", "build_hest_dataset",
    # many samples: a samplesheet built in parallel into one dataset; datasets merged
    "build_from_samplesheet", "read_samplesheet", "merge_datasets",
    "SpotOptions", "PatchOptions", "XeniumBundleOptions", "write_xenium_bundle",
    # pooling
    "spot_grid", "assign_cells", "pool_counts",
    # errors
    "HescapeDataError", "DatasetFormatError", "PanelMismatchError", "SplitLeakageError", "InputFormatError",
    "AlignmentError", "OutputLocationError",
]
