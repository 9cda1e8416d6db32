"""A generated data tree and the shipped retention policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from retention_harness import Tree, build

from retention.policy import RetentionPolicy, load_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy() -> RetentionPolicy:
    return load_policy(REPO / "configs" / "retention-policies.yaml")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build(tmp_path)
