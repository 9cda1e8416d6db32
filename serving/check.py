"""`autovibe models check`: are a pair's weights on disk and whole, and how much memory it needs.

Weights are never fetched at run time, so this is the operator's one look before serving. A
GGUF file is checked against its SHA-256 (the PyPI package's `EXPECTED_SHA256` for the tiny
model). A Hugging Face snapshot folder is checked for its config, its tokenizer, and every
safetensors shard the index names: each shard's header says how long its data is, so a
truncated copy is caught without hashing tens of gigabytes; per-file hashes are compared when
the catalogue lists them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Literal

from contracts.config import ModelPair, ModelsCatalog, ModelSpec
from contracts.dataroot import DataRoot

KV_BYTES_PER_VALUE = 2
"""The KV cache holds 16-bit floats (vLLM `kv_cache_dtype=auto` on bf16 models, llama.cpp f16)."""

KV_FORMULA = "KV = 2 (K,V) x layers x kv_heads x head_dim x 2 B x context"
MEMORY_FORMULA = "need = weights + KV; per GPU = need / tensor_parallel / gpu_memory_utilization"

State = Literal["complete", "placeable", "missing", "incomplete", "corrupt"]
READY: tuple[State, ...] = ("complete", "placeable")
"""`placeable`: absent, but a local package holds it and serving places it (the tiny GGUF)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Memory:
    """Memory one replica of a model needs: weights plus a full-context KV cache."""

    weights: int
    kv_per_token: int
    context: int
    tensor_parallel: int
    gpu_memory_utilization: float | None
    """None on CPU (no reservation share)."""

    @property
    def kv(self) -> int:
        return self.kv_per_token * self.context

    @property
    def total(self) -> int:
        return self.weights + self.kv

    @property
    def per_gpu(self) -> float:
        """GPU memory each of the replica's GPUs must have for vLLM to fit it."""
        return self.total / self.tensor_parallel / (self.gpu_memory_utilization or 1.0)


@dataclass(frozen=True)
class ModelCheck:
    role: Literal["normal", "thinking"]
    served_name: str
    path: Path
    state: State
    detail: str
    size: int
    """Bytes found on disk."""
    memory: Memory | None
    """None when the catalogue lacks the attention shape or the weight size."""


@dataclass(frozen=True)
class PairCheck:
    pair: str
    device: Literal["cpu", "gpu"]
    models: list[ModelCheck] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(m.state in READY for m in self.models)

    @property
    def memory_total(self) -> int:
        """Bytes the pair needs at one replica per model (both models are served side by side).

        On CPU llama.cpp maps the weights file, so two roles sharing one file count it once.
        """
        total, seen = 0, set()
        for m in self.models:
            if m.memory is None:
                continue
            shared = self.device == "cpu" and m.path in seen
            total += m.memory.kv if shared else m.memory.total
            seen.add(m.path)
        return total

    @property
    def gpus(self) -> int:
        """GPUs one replica of each model takes (0 on CPU)."""
        if self.device != "gpu":
            return 0
        return sum(m.memory.tensor_parallel for m in self.models if m.memory is not None)

    def as_dict(self) -> dict[str, object]:
        return {
            "pair": self.pair,
            "device": self.device,
            "ready": self.ready,
            "memory_bytes": self.memory_total,
            "gpus": self.gpus,
            "models": [
                {
                    "role": m.role,
                    "served_name": m.served_name,
                    "path": str(m.path),
                    "state": m.state,
                    "detail": m.detail,
                    "size_bytes": m.size,
                    "memory": None
                    if m.memory is None
                    else {
                        "weights_bytes": m.memory.weights,
                        "kv_bytes": m.memory.kv,
                        "kv_bytes_per_token": m.memory.kv_per_token,
                        "context": m.memory.context,
                        "total_bytes": m.memory.total,
                        "tensor_parallel": m.memory.tensor_parallel,
                        "per_gpu_bytes": round(m.memory.per_gpu) if self.device == "gpu" else None,
                    },
                }
                for m in self.models
            ],
            "formula": [KV_FORMULA, MEMORY_FORMULA],
        }


class UnknownPair(KeyError):
    """A pair name not in configs/models.yaml."""


def memory(spec: ModelSpec, pair: ModelPair) -> Memory | None:
    """Memory estimate for one replica of `spec` (see `KV_FORMULA`), or None when unknown."""
    if None in (spec.weight_bytes, spec.layers, spec.kv_heads, spec.head_dim):
        return None
    assert spec.weight_bytes and spec.layers and spec.kv_heads and spec.head_dim
    per_token = 2 * spec.layers * spec.kv_heads * spec.head_dim * KV_BYTES_PER_VALUE
    gpu = pair.device == "gpu"
    return Memory(
        weights=spec.weight_bytes,
        kv_per_token=per_token,
        context=spec.context,
        tensor_parallel=spec.tensor_parallel if gpu else 1,
        gpu_memory_utilization=pair.gpu_memory_utilization if gpu else None,
    )


def expected_sha256(spec: ModelSpec) -> str | dict[str, str] | None:
    """The catalogue's hash, else the source package's `EXPECTED_SHA256` for a PyPI source."""
    if spec.sha256 is not None:
        return spec.sha256
    source = spec.source or ""
    if source.startswith("pypi:"):
        try:
            module = import_module(source.removeprefix("pypi:").replace("-", "_"))
        except ImportError:
            return None
        value = getattr(module, "EXPECTED_SHA256", None)
        return value if isinstance(value, str) else None
    return None


def sha256_file(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """Hash once per file version: the tiny pair's two roles share one file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _source_installed(spec: ModelSpec) -> bool:
    source = spec.source or ""
    if not source.startswith("pypi:"):
        return False
    try:
        import_module(source.removeprefix("pypi:").replace("-", "_"))
    except ImportError:
        return False
    return True


def _check_file(path: Path, spec: ModelSpec, hashes: bool) -> tuple[State, str, int]:
    if not path.exists():
        if _source_installed(spec):
            return "placeable", f"not placed yet; serving places it from {spec.source}", 0
        fetch = (
            f" (copy it from {spec.hf_repo or spec.source})" if spec.hf_repo or spec.source else ""
        )
        return "missing", f"{path} does not exist{fetch}", 0
    size = path.stat().st_size
    expected = expected_sha256(spec)
    if isinstance(expected, str) and hashes:
        actual = sha256_file(path)
        if actual != expected:
            return "corrupt", f"sha256 {actual} != expected {expected}", size
        return "complete", "sha256 matches", size
    return "complete", "present (no hash known)" if expected is None else "present", size


def safetensors_data_size(path: Path) -> tuple[int, int]:
    """(expected file size from the header, bytes of tensor data); ValueError if unreadable."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"implausible header length {header_len}")
        header_raw = fh.read(header_len)
    if len(header_raw) < header_len:
        raise ValueError("header cut short")
    try:
        header = json.loads(header_raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"header is not JSON: {exc.msg}") from exc
    end = 0
    data = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        end = max(end, stop)
        data += stop - start
    return 8 + header_len + end, data


def _check_folder(path: Path, spec: ModelSpec, hashes: bool) -> tuple[State, str, int]:
    if not path.is_dir():
        return "missing", f"{path} does not exist (copy {spec.hf_repo} there)", 0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    problems: list[str] = []
    if not (path / "config.json").is_file():
        problems.append("config.json missing")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    index_path = path / "model.safetensors.index.json"
    total_size: int | None = None
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        total_size = index.get("metadata", {}).get("total_size")
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        problems.append("no safetensors weights")
    data = 0
    for shard in shards:
        shard_path = path / shard
        if not shard_path.is_file():
            problems.append(f"{shard} missing")
            continue
        try:
            expected, shard_data = safetensors_data_size(shard_path)
        except ValueError as exc:
            problems.append(f"{shard}: {exc}")
            continue
        actual = shard_path.stat().st_size
        if actual != expected:
            problems.append(f"{shard}: {actual} bytes, its header says {expected} (truncated?)")
        data += shard_data
    if total_size is not None and not problems and data != total_size:
        problems.append(f"shards hold {data} bytes of tensors, the index says {total_size}")
    if problems:
        return "incomplete", "; ".join(problems), size
    expected_hashes = spec.sha256 if isinstance(spec.sha256, dict) else {}
    if hashes:
        for name, digest in sorted(expected_hashes.items()):
            file = path / name
            if not file.is_file():
                return "incomplete", f"{name} missing", size
            actual_digest = sha256_file(file)
            if actual_digest != digest:
                return "corrupt", f"{name}: sha256 {actual_digest} != expected {digest}", size
    hashed = f", {len(expected_hashes)} hashes match" if expected_hashes and hashes else ""
    return "complete", f"{len(shards)} shard(s), {data} bytes of tensors{hashed}", size


def check_model(
    root: DataRoot, pair: ModelPair, role: Literal["normal", "thinking"], hashes: bool = True
) -> ModelCheck:
    spec: ModelSpec = getattr(pair, role)
    path = root.model_weights / spec.weights
    # GPU weights are Hugging Face snapshot folders (vLLM); CPU weights one GGUF file.
    folder = pair.device == "gpu" or path.is_dir()
    state, detail, size = (_check_folder if folder else _check_file)(path, spec, hashes)
    return ModelCheck(role, spec.served_name, path, state, detail, size, memory(spec, pair))


def check_pairs(
    root: DataRoot, catalog: ModelsCatalog, only: list[str] | None = None, hashes: bool = True
) -> list[PairCheck]:
    """One report per pair (all, or those named in `only`); UnknownPair for a name not listed."""
    names = only or list(catalog.pairs)
    unknown = [n for n in names if n not in catalog.pairs]
    if unknown:
        raise UnknownPair(
            f"unknown pair {', '.join(unknown)}; known: {', '.join(sorted(catalog.pairs))}"
        )
    out = []
    for name in names:
        pair = catalog.pairs[name]
        models = [check_model(root, pair, role, hashes) for role in ("normal", "thinking")]
        out.append(PairCheck(name, pair.device, models))
    return out
