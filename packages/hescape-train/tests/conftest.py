"""A tiny synthetic dataset shared by the training tests."""

from __future__ import annotations

import pytest
from hescape.data import SyntheticConfig, build_synthetic_dataset
from hescape.data.geometry import get_geometry

#: HESCAPE hexagons, 112 µm patches stored at the generator's 2 µm/px (56 px)
TINY = SyntheticConfig(sample_size_um=360.0, n_donors=3, pixel_size_um=2.0,
                       geometry=get_geometry("hescape").with_(um_per_px=2.0))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return build_synthetic_dataset(tmp_path_factory.mktemp("train-ds") / "tiny", TINY, progress=False)
