"""`gemmalab bench`, run as a user runs it (fresh process), on every backend, and its core `gemmalab.bench.bench`.

Tiny presets and a few tokens: these tests check what is printed and that the numbers hang together,
never how fast anything runs.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_failure, run_cli

import gemmalab
from gemmalab.bench import DECODING, LOADING, PREFILL, WARMUP_DECODING, WARMUP_PREFILL, bench
from gemmalab.config import Gemma3Config
from gemmalab.errors import BackendError, InputError

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # a preset must never reach the Hugging Face Hub
_runs: dict[tuple[str, ...], object] = {}


def bench_json(*args: str) -> tuple[dict, str]:
    """(the one JSON row, stderr) of `gemmalab bench ARGS --json`, offline; each command line runs once."""
    if args not in _runs:
        result = run_cli("bench", *args, "--json", env=OFFLINE)
        assert result.returncode == 0, result.stderr
        (row,) = json.loads(result.stdout)  # stdout is pure JSON: progress went to stderr
        _runs[args] = (row, result.stderr)
    return _runs[args]


def test_bench_json_is_consistent(backend):
    row, _ = bench_json("--preset", "tiny", "--prompt-tokens", "20", "--gen-tokens", "5", "-b", backend)
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
    assert row["prompt_tokens_per_s"] == pytest.approx(20 / row["time_to_first_token_s"])
    assert row["warmup_seconds"] > 0 and row["load_seconds"] > 0


def test_preset_source_is_the_preset_offline(backend):
    by_option, _ = bench_json("--preset", "tiny", "--prompt-tokens", "20", "--gen-tokens", "5", "-b", backend)
    by_source, _ = bench_json("tiny", "--prompt-tokens", "20", "--gen-tokens", "5", "-b", backend)
    assert by_source.keys() == by_option.keys()
    same = ("backend", "model", "dtype", "parameters", "prompt_tokens", "generated_tokens", "kv_cache_bytes",
            "weight_bytes", "bytes_per_token")
    assert {k: by_source[k] for k in same} == {k: by_option[k] for k in same}
    assert by_source["model"] == "tiny"


def test_progress_goes_to_stderr_one_line_per_phase(backend):
    _, stderr = bench_json("tiny", "--prompt-tokens", "20", "--gen-tokens", "5", "-b", backend)
    lines = stderr.splitlines()
    expected = ["memory read bandwidth: measuring", f"{backend}: loading tiny",
                f"{backend}: warm-up (compile): prefill 20 tokens", f"{backend}: warm-up (compile): decoding 5 tokens",
                f"{backend}: prefill 20 tokens", f"{backend}: decoding 5 tokens", f"{backend}: done"]
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, (fragment, stderr)
    assert all(line.startswith("bench ") for line in lines), stderr
    assert len(lines) == 8, stderr  # bandwidth: start and done; the backend: five phases and done


def test_quick_says_what_it_shortened():
    backend = "torch" if "torch" in gemmalab.backends() else gemmalab.backends()[0]  # CLI logic: one backend
    row, stderr = bench_json("tiny", "--quick", "-b", backend)
    assert (row["prompt_tokens"], row["generated_tokens"]) == (128, 32)
    assert "quick run: prompt 128 tokens, generate 32, instead of 512 and 128" in stderr
    assert f"full run (several minutes on a CPU): gemmalab bench tiny --backend {backend}" in stderr


def test_table_fits_80_columns_with_every_backend():
    result = run_cli("bench", "tiny", "-b", "all", "--quick", "--prompt-tokens", "12", "--gen-tokens", "3",
                     columns=80, env=OFFLINE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80, result.stdout
    assert "…" not in result.stdout, result.stdout
    for label in ("warm-up run (compile), s", "time to first token, s", "prompt, tokens/s", "decode, tokens/s",
                  "decode roofline, tokens/s", "decode / roofline", "read per token, GB", "peak memory, GiB"):
        assert sum(label in line for line in lines) == 1, (label, result.stdout)
    assert "quick run: prompt 12 tokens, generate 3" in result.stdout
    assert "full run (several minutes on a CPU): gemmalab bench tiny --backend all" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--prompt-tokens", "0"], "prompt_tokens (--prompt-tokens) must be a whole number >= 1", 1),
        (["--gen-tokens", "-1"], "gen_tokens (--gen-tokens) must be a whole number >= 2", 1),
        (["--gen-tokens", "1"], "gen_tokens (--gen-tokens) must be a whole number >= 2", 1),
        (["--prefill-chunk", "0"], "prefill_chunk (--prefill-chunk) must be", 1),
        (["--prompt-tokens", "4090", "--gen-tokens", "10"], "4096 positions", 1),
        (["-b", "nonsense"], "unknown backend 'nonsense'", 1),
        (["--dtype", "fp8"], "unknown dtype 'fp8'", 1),
        (["--prompt-tokens", "many"], "--prompt-tokens", 2),
    ],
)
def test_bad_input_is_one_line_before_any_work(args, fragment, code):
    result = run_cli("bench", "tiny", *args, env=OFFLINE)
    assert_clean_failure(result, fragment, code=code)  # one line: no bandwidth measured, no model built


def test_unknown_preset_is_one_line():
    assert_clean_failure(run_cli("bench", "--preset", "gemma-9-000m", env=OFFLINE), "unknown preset")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"prompt_tokens": 2.5}, "prompt_tokens"),
        ({"gen_tokens": -1}, "gen_tokens"),
        ({"gen_tokens": True}, "gen_tokens"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
        ({"bandwidth": -1.0}, "bandwidth"),
        ({"prompt_tokens": 4000, "gen_tokens": 100}, "4096 positions"),
        ({"dtype": "int4"}, "unknown dtype"),
    ],
)
def test_api_checks_inputs_before_building(backend, kwargs, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        bench(backend, preset="tiny", **{"prompt_tokens": 8, "gen_tokens": 3, **kwargs})
    assert "\n" not in str(info.value)


def test_api_refuses_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend 'all'"):
        bench("all", preset="tiny", prompt_tokens=8, gen_tokens=3)


def test_api_reports_every_phase_in_order(backend):
    events: list[tuple[str, int, int]] = []
    result = bench(backend, preset="tiny", prompt_tokens=9, gen_tokens=4, bandwidth=1e10,
                   progress=lambda *event: events.append(event))
    tokens = range(1, 5)
    assert events == [(LOADING, 0, 0), (WARMUP_PREFILL, 0, 0), *[(WARMUP_DECODING, k, 4) for k in tokens],
                      (PREFILL, 0, 0), *[(DECODING, k, 4) for k in tokens]]
    # the warm-up is timed apart from the measured run, and the measured numbers come from that run
    assert result.warmup_seconds > 0 and result.time_to_first_token_s > 0
    assert result.prompt_tokens_per_s == pytest.approx(9 / result.time_to_first_token_s)
    assert result.roofline_tokens_per_s == pytest.approx(1e10 / result.bytes_per_token)
