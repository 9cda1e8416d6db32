"""Model weights under `model-weights/`: placed from local sources only, never from a hub."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from contracts.config import ModelSpec
from contracts.dataroot import DataRoot


class WeightsMissing(Exception):
    """Weights are neither on disk nor obtainable from a local source."""


def ensure_weights(root: DataRoot, spec: ModelSpec) -> Path:
    """Path of `spec`'s weights, assembling them from their PyPI package when absent."""
    target = root.model_weights / spec.weights
    if target.exists():
        return target
    source = spec.source or ""
    if source.startswith("pypi:"):
        package = source.removeprefix("pypi:").replace("-", "_")
        try:
            module = import_module(package)
        except ImportError as exc:
            raise WeightsMissing(
                f"{target} is missing and package {package!r} is not installed "
                f"(`uv sync` installs it)"
            ) from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        assembled: Path = module.assemble(target)
        return assembled
    raise WeightsMissing(
        f"{target} is missing; copy the weights there (no hub downloads at run time)"
    )
