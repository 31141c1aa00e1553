"""`gemmalab bench`, run as a user runs it (fresh process), on every backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemmalab.config import Gemma3Config


def cli(*args: str) -> subprocess.CompletedProcess:
    # a wide terminal, so rich does not abbreviate table headers the tests read
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True, env=env)


def test_bench_json_is_consistent(backend):
    result = cli("bench", "--preset", "tiny", "--prompt-tokens", "20", "--gen-tokens", "5", "--json", "-b", backend)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    config = Gemma3Config.preset("tiny")
    assert row["backend"] == backend and row["generated_tokens"] == 5 and row["prompt_tokens"] == 20
    n_local = sum(map(config.is_sliding, range(config.num_hidden_layers)))
    # batch 1, keys + values, fp32: the local layers hold exactly one window
    window_bytes = n_local * 2 * config.num_key_value_heads * config.sliding_window * config.head_dim * 4
    assert row["kv_cache_bytes"]["sliding_attention"] == window_bytes
    assert row["weight_bytes"] == config.num_parameters() * 4
    assert row["bytes_per_token"] == row["weight_bytes"] + sum(row["kv_cache_bytes"].values())
    assert row["roofline_tokens_per_s"] == pytest.approx(row["bandwidth_bytes_per_s"] / row["bytes_per_token"])
    assert row["roofline_fraction"] == pytest.approx(row["generation_tokens_per_s"] / row["roofline_tokens_per_s"])
    assert row["generation_tokens_per_s"] > 0 and row["prompt_tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0


def test_bench_table_for_people():
    result = cli("bench", "--preset", "tiny", "--prompt-tokens", "12", "--gen-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "decode tok/s" in result.stdout and "roofline" in result.stdout
