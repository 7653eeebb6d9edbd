"""Shared fixtures: small synthetic Xenium bundles in the real file formats, the vendored Visium outs/, and the
synthetic Space Ranger writer (``_spaceranger_synth.py``)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hescape.data.xenium_bundle import XeniumBundleOptions, small_bundle_config, write_xenium_bundle

DATA = Path(__file__).parent / "data"
VISIUM = DATA / "visium-spaceranger-1.0.0"

#: 300 × 300 µm at 0.5 µm/px: small and fast, still ~600 cells and a dozen pseudo-spots.
SMALL = small_bundle_config(300.0, pixel_size_um=0.5)


@pytest.fixture(scope="session")
def xenium_bundle(tmp_path_factory) -> Path:
    """Integer cell ids, cells.parquet, cell_feature_matrix.h5, YXS zlib pyramid, 23° rotation."""
    return write_xenium_bundle(tmp_path_factory.mktemp("xb") / "bundle", SMALL, XeniumBundleOptions())


@pytest.fixture(scope="session")
def xenium_bundle_variant(tmp_path_factory) -> Path:
    """String cell ids, cells.csv.gz, MEX matrix, transcripts, planar CYX JPEG pyramid, mirrored + rotated."""
    opts = XeniumBundleOptions(string_cell_ids=True, cells_format="csv.gz", matrix_format="mex", transcripts=True,
                               he_axes="CYX", he_compression="jpeg", he_flip=True, he_rotation_deg=-71.0,
                               he_um_per_px=0.29)
    return write_xenium_bundle(tmp_path_factory.mktemp("xbv") / "bundle", SMALL, opts)


@pytest.fixture
def bundle_copy(xenium_bundle, tmp_path) -> Path:
    """A writable copy of the default bundle, for bad-input tests."""
    return Path(shutil.copytree(xenium_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def small_cfg():
    return SMALL


@pytest.fixture(scope="session")
def visium_outs() -> Path:
    return VISIUM


@pytest.fixture(scope="session")
def synth() -> ModuleType:
    """The synthetic Space Ranger writer ``_spaceranger_synth.py``: Visium / Visium HD outputs at a known µm/px
    (``write_visium_outs``, ``write_visium_hd_outs``), H&E-like images (``he_image``) and the 55 µm disc measure
    (``dark_disc_diameter_um``). Imported by path (under importlib mode the tests folder is not on ``sys.path``),
    once, under one ``sys.modules`` name that every test file shares."""
    name = "_hescape_data_spaceranger_synth"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_spaceranger_synth.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
