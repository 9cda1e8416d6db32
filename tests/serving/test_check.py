"""`serving.check` on real files: the tiny GGUF from PyPI, and safetensors snapshots built here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serving_harness import write_safetensors, write_snapshot

from contracts.config import ModelPair, ModelsCatalog
from contracts.dataroot import DataRoot
from serving import check


def gpu_pair(**normal: object) -> ModelPair:
    spec = {
        "served_name": "t",
        "weights": "fam/T-Instruct",
        "hf_repo": "org/T-Instruct",
        "weight_bytes": 1000,
        "layers": 2,
        "kv_heads": 1,
        "head_dim": 4,
        "context": 16,
    }
    thinking = {**spec, "served_name": "t:thinking", "weights": "fam/T-R1"}
    return ModelPair.model_validate(
        {"device": "gpu", "normal": {**spec, **normal}, "thinking": thinking}
    )


def test_tiny_absent_is_placeable_and_placed_matches_package_hash(
    tmp_path: Path, tiny_root: DataRoot, catalog: ModelsCatalog
) -> None:
    [empty] = check.check_pairs(DataRoot.at(tmp_path), catalog, ["tiny"])
    assert [m.state for m in empty.models] == ["placeable", "placeable"]
    assert empty.ready

    [placed] = check.check_pairs(tiny_root, catalog, ["tiny"])
    assert [m.state for m in placed.models] == ["complete", "complete"]
    assert placed.models[0].detail == "sha256 matches"
    assert placed.models[0].size == 253_113_024
    # Both roles map one file: its weights count once, each role has its own KV cache.
    kv = 2 * 18 * 1 * 256 * 2 * 8192
    assert placed.memory_total == 253_113_024 + 2 * kv


def test_tiny_with_a_flipped_byte_is_corrupt(
    tmp_path: Path, tiny_root: DataRoot, catalog: ModelsCatalog
) -> None:
    root = DataRoot.at(tmp_path)
    spec = catalog.pairs["tiny"].normal
    target = root.model_weights / spec.weights
    target.parent.mkdir(parents=True)
    shutil.copyfile(tiny_root.model_weights / spec.weights, target)
    with target.open("r+b") as fh:
        fh.seek(1_000_000)
        byte = fh.read(1)
        fh.seek(1_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    [report] = check.check_pairs(root, catalog, ["tiny"])
    assert report.models[0].state == "corrupt"
    assert not report.ready
    [unhashed] = check.check_pairs(root, catalog, ["tiny"], hashes=False)
    assert unhashed.models[0].state == "complete"


def make_catalog(pair: ModelPair) -> ModelsCatalog:
    return ModelsCatalog(pairs={"t": pair})


def test_complete_snapshot(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    shards = {
        "model-00001-of-00002.safetensors": {"a": 300, "b": 20},
        "model-00002-of-00002.safetensors": {"c": 700},
    }
    write_snapshot(root.model_weights / "fam/T-Instruct", shards)
    write_snapshot(root.model_weights / "fam/T-R1", {"model.safetensors": {"x": 64}})
    [report] = check.check_pairs(root, make_catalog(gpu_pair()), ["t"])
    assert [m.state for m in report.models] == ["complete", "complete"], report
    assert report.models[0].detail == "2 shard(s), 1020 bytes of tensors"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("drop_shard", "model-00002-of-00002.safetensors missing"),
        ("truncate_shard", "(truncated?)"),
        ("drop_tokenizer", "no tokenizer"),
        ("drop_config", "config.json missing"),
        ("shrink_index", "the index says"),
    ],
)
def test_damaged_snapshot_is_incomplete(tmp_path: Path, damage: str, expected: str) -> None:
    root = DataRoot.at(tmp_path)
    folder = root.model_weights / "fam/T-Instruct"
    shards = {
        "model-00001-of-00002.safetensors": {"a": 300},
        "model-00002-of-00002.safetensors": {"c": 700},
    }
    write_snapshot(folder, shards)
    second = folder / "model-00002-of-00002.safetensors"
    if damage == "drop_shard":
        second.unlink()
    elif damage == "truncate_shard":
        with second.open("r+b") as fh:
            fh.truncate(second.stat().st_size - 100)
    elif damage == "drop_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "drop_config":
        (folder / "config.json").unlink()
    elif damage == "shrink_index":
        index = folder / "model.safetensors.index.json"
        index.write_text(index.read_text().replace('"total_size": 1000', '"total_size": 999'))
    [normal] = check.check_pairs(root, make_catalog(gpu_pair()), ["t"])[0].models[:1]
    assert normal.state == "incomplete"
    assert expected in normal.detail


def test_missing_folder_names_the_repo_to_copy(tmp_path: Path) -> None:
    [report] = check.check_pairs(DataRoot.at(tmp_path), make_catalog(gpu_pair()), ["t"])
    assert report.models[0].state == "missing"
    assert "org/T-Instruct" in report.models[0].detail
    assert not report.ready


def test_listed_hashes_are_checked(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    folder = root.model_weights / "fam/T-Instruct"
    write_snapshot(folder, {"model.safetensors": {"a": 10}})
    good = check.sha256_file(folder / "model.safetensors")
    [ok] = check.check_pairs(
        root, make_catalog(gpu_pair(sha256={"model.safetensors": good})), ["t"]
    )
    assert ok.models[0].state == "complete"
    assert "1 hashes match" in ok.models[0].detail
    bad = gpu_pair(sha256={"model.safetensors": "0" * 64})
    [wrong] = check.check_pairs(root, make_catalog(bad), ["t"])
    assert wrong.models[0].state == "corrupt"


def test_safetensors_size_from_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    data = write_safetensors(path, {"w": 1234, "b": 6})
    expected, tensors = check.safetensors_data_size(path)
    assert (expected, tensors) == (path.stat().st_size, data) == (path.stat().st_size, 1240)


def test_32b_pair_memory(catalog: ModelsCatalog) -> None:
    """Qwen2.5-32B shape: 64 layers, 8 KV heads of 128, bf16 → 256 KiB a token, 8 GiB at 32k."""
    [report] = check.check_pairs(DataRoot.at("/nonexistent"), catalog, ["32b"])
    mem = report.models[0].memory
    assert mem is not None
    assert mem.kv_per_token == 2 * 64 * 8 * 128 * 2 == 256 * 1024
    assert mem.kv == 8 * 2**30
    assert mem.per_gpu == pytest.approx((65.5e9 + 8 * 2**30) / 2 / 0.9)
    assert report.gpus == 4
    assert report.memory_total == 2 * (65_500_000_000 + 8 * 2**30)


def test_unknown_pair_lists_known(catalog: ModelsCatalog) -> None:
    with pytest.raises(check.UnknownPair, match="known: 14b, 32b"):
        check.check_pairs(DataRoot.at("/nonexistent"), catalog, ["nope"])


def test_gpu_pair_without_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="normal: a GPU model needs layers"):
        gpu_pair(layers=None)
