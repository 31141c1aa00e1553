"""``gemmalab info``, run as a user runs it: a preset, a checkpoint folder (good, config-only, damaged) and a
Hub repo id (cached by hand, absent offline, unreachable). Every checkpoint is written by the test run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot
from safetensors import safe_open

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# A port nothing listens on: the connection is refused at once, as with no route to the Hub, whatever the
# machine's real network.
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


def _tensor_count(files: list[Path]) -> int:
    """Tensors as transformers saved them, counted by safetensors itself."""
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            total += len(list(handle.keys()))
    return total


def _info_json(*args: str, env: dict | None = None) -> dict:
    result = run_cli("info", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _hub_cache(cache: Path, repo_id: str, files: list[Path]) -> Path:
    """The Hugging Face cache layout, by hand: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot_folder = repo / "snapshots" / COMMIT
    snapshot_folder.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot_folder / file.name)
    return snapshot_folder


@pytest.fixture(scope="module")
def sharded(tiny_hf, tmp_path_factory) -> Path:
    """The tiny checkpoint saved by transformers in shards, with model.safetensors.index.json."""
    _, model, _ = tiny_hf
    folder = tmp_path_factory.mktemp("tiny-sharded")
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    return folder


# --- presets and good folders -------------------------------------------------------------------------
def test_info_preset_json():
    info = _info_json("gemma-3-270m")
    assert info["layer_pattern"] == "LLLLLG" * 3
    assert (info["local_layers"], info["global_layers"], info["sliding_window"]) == (15, 3, 512)
    # 270M: 262144 x 640 embedding + 18 blocks; the embedding is 63% of it (DESIGN.md, §4)
    assert info["embedding_parameters"] == 262144 * 640
    assert round(info["embedding_parameters"] / info["parameters"], 2) == 0.63
    assert info["weight_bytes"]["bfloat16"] == 2 * info["parameters"]
    assert info["weight_bytes"]["float32"] == 4 * info["parameters"]
    # KV per token per layer: 2 (k, v) x 1 kv head x 256 x 2 bytes = 1024; 3 global layers
    assert info["kv_cache_bytes_bf16"]["global_per_token"] == 3 * 1024
    assert info["kv_cache_bytes_bf16"]["local_max"] == 15 * 1024 * 512
    assert info["weights"] is None  # a preset has no checkpoint


def test_info_reports_the_weights_of_a_checkpoint_folder(tiny_hf):
    _, _, folder = tiny_hf
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    weights = _info_json(str(folder))["weights"]
    assert weights == {
        "files": [f.name for f in files],
        "bytes": size,
        "tensors": _tensor_count(files),
        "dtypes": ["float32"],
        "ok": True,
        "problem": None,
        "quantization": None,  # dense (a quantized folder: tests/test_quantized_checkpoints.py)
    }
    result = run_cli("info", str(folder))
    assert result.returncode == 0, result.stderr
    assert "LLLLLG" in result.stdout and "tied" in result.stdout
    assert f"model.safetensors: {size / 1024:.1f} KiB ({size:,} bytes), {_tensor_count(files)} tensors, float32" \
        in result.stdout
    assert "names and shapes match config.json" in result.stdout


def test_info_reports_sharded_weights(sharded):
    files = sorted(sharded.glob("*.safetensors"))
    weights = _info_json(str(sharded))["weights"]
    assert weights["files"] == [f.name for f in files]
    assert weights["bytes"] == sum(f.stat().st_size for f in files)
    assert weights["tensors"] == _tensor_count(files)
    assert weights["ok"] is True


def test_info_of_a_config_only_folder_says_there_are_no_weights(tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "LLLLLG" in result.stdout and "no *.safetensors" in result.stdout
    assert _info_json(str(tmp_path))["weights"] == {
        "files": [], "bytes": 0, "tensors": 0, "dtypes": [], "ok": None, "problem": None, "quantization": None,
    }


# --- damaged folders: the report, then one error line, exit 1, nothing touched --------------------------
def _assert_report_then_failure(folder: Path, *fragments: str) -> None:
    before = snapshot(folder)
    result = run_cli("info", str(folder))
    assert_clean_failure(result, *fragments)
    assert "LLLLLG" in result.stdout and "not usable" in result.stdout  # the shape report still prints
    as_json = run_cli("info", str(folder), "--json")
    assert_clean_failure(as_json, *fragments)
    weights = json.loads(as_json.stdout)["weights"]
    assert weights["ok"] is False and all(f in weights["problem"] for f in fragments)
    assert snapshot(folder) == before


def test_info_of_a_truncated_file_names_it(tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    bad = Path(shutil.copytree(folder, tmp_path / "bad"))
    path = bad / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    _assert_report_then_failure(bad, str(path), "truncated", "re-download")


def test_info_of_a_truncated_header_names_the_file(tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    bad = Path(shutil.copytree(folder, tmp_path / "bad"))
    os.truncate(bad / "model.safetensors", 100)  # inside the header: safetensors itself refuses it
    _assert_report_then_failure(bad, str(bad / "model.safetensors"), "re-download")


def test_info_of_an_index_naming_a_missing_shard(sharded, tmp_path):
    bad = Path(shutil.copytree(sharded, tmp_path / "bad"))
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.unlink()
    _assert_report_then_failure(bad, shard.name, "re-download")


def test_info_of_nothing_is_one_line(tmp_path):
    assert_clean_failure(run_cli("info", str(tmp_path / "missing")))


# --- repo ids: the cache first, config.json only --------------------------------------------------------
def test_info_of_a_repo_id_reads_the_cache_offline(tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    snapshot_folder = _hub_cache(tmp_path / "hub", "someone/tiny-gemma", [folder / "config.json"])
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("info", "someone/tiny-gemma", env=env)
    assert result.returncode == 0, result.stderr
    assert "LLLLLG" in result.stdout and "gemmalab download someone/tiny-gemma" in result.stdout
    info = _info_json("someone/tiny-gemma", env=env)
    assert info["folder"] == str(snapshot_folder) and info["weights"]["files"] == [] and info["weights"]["ok"] is None


def test_info_of_a_cached_repo_reports_its_weights(tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    _hub_cache(tmp_path / "hub", "someone/tiny-gemma", [folder / "config.json", folder / "model.safetensors"])
    # No network needed: with the model cached, an unreachable Hub is never asked.
    weights = _info_json("someone/tiny-gemma", env={"HF_HUB_CACHE": str(tmp_path / "hub"), **UNREACHABLE})["weights"]
    assert weights["files"] == ["model.safetensors"] and weights["ok"] is True


def test_info_of_an_absent_repo_offline_is_one_line(tmp_path):
    result = run_cli("info", "someone/absent-model", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)},
                     timeout=60)
    assert_clean_failure(result, "someone/absent-model", "offline mode is on (HF_HUB_OFFLINE=1)",
                         "gemmalab download someone/absent-model")


@pytest.mark.parametrize("command", ["info", "download"])
def test_an_unreachable_hub_is_one_line_naming_the_network(command, tmp_path):
    """Not the raw LocalEntryNotFoundError after huggingface-hub's retries (about 25 s), nor its two-line message."""
    result = run_cli(command, "someone/absent-model", env={"HF_HUB_CACHE": str(tmp_path), **UNREACHABLE}, timeout=60)
    assert_clean_failure(result, "someone/absent-model", "the Hugging Face Hub cannot be reached", "check the network")
