"""Builders for weights on disk: real safetensors shards and Hugging Face snapshot folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_safetensors(path: Path, tensors: dict[str, int]) -> int:
    """A valid safetensors file with one uint8 tensor per entry (name → bytes); its data size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(
        struct.pack("<Q", len(raw))
        + raw
        + bytes(range(256)) * (offset // 256)
        + bytes(offset % 256)
    )
    return offset


def write_snapshot(folder: Path, shards: dict[str, dict[str, int]]) -> None:
    """A Hugging Face snapshot: config, tokenizer, shards and the index that names them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    weight_map: dict[str, str] = {}
    total = 0
    for shard, tensors in shards.items():
        total += write_safetensors(folder / shard, tensors)
        weight_map.update({name: shard for name in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
