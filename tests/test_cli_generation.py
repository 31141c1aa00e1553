"""`gemmalab generate`, run as a user runs them (fresh process), on every backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gemmalab

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def cli(*args: str) -> subprocess.CompletedProcess:
    # a wide terminal, so rich does not abbreviate table headers the tests read
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_hf, tmp_path_factory) -> Path:
    """The tiny checkpoint plus a word-level tokenizer.json covering its whole 512-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, _, folder = tiny_hf
    out = Path(shutil.copytree(folder, tmp_path_factory.mktemp("chat") / "model"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), 512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    return out


def test_generate_json_matches_the_api(backend):
    result = cli("generate", "tiny", "--prompt-ids", "5,6,7,8,9,10,11,12,13,14", "-n", "6", "--json",
                 "--backend", backend, "--dtype", "float32", "--stop-ids", "1")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = gemmalab.init("tiny", backend=backend, seed=0).generate(list(range(5, 15)), max_tokens=6, stop=[1])
    assert out["tokens"] == expected.tokens
    assert out["stats"]["prompt_tokens"] == 10 and out["stats"]["generated_tokens"] == len(expected.tokens)


def test_generate_streams_text(backend, chat_checkpoint):
    model = gemmalab.load(chat_checkpoint, backend=backend, dtype="float32", device="cpu")
    expected = model.generate("w10 w11 w12 w13 w14 w15 w16 w17 w18 w19", max_tokens=8)
    result = cli("generate", str(chat_checkpoint), "--prompt", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19",
                 "-n", "8", "--backend", backend, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    # the stop token is not printed; everything else is, as it was decoded
    stop = model.generation_eos or model.config.eos_token_ids
    shown = [t for t in expected.tokens if t not in stop]
    assert result.stdout.strip().replace(" ", "") == model.tokenizer.decode(shown).replace(" ", "")
    assert "tok/s" in result.stderr


def test_generate_chat_uses_the_turn_format(backend, chat_checkpoint):
    model = gemmalab.load(chat_checkpoint, backend=backend, dtype="float32", device="cpu")
    ids = model.tokenizer.apply_chat([{"role": "user", "content": "w20 w21"}])
    assert ids[:2] == [2, 4] and ids.count(4) == 2  # <bos><start_of_turn>user ... <start_of_turn>model
    expected = model.generate(ids, max_tokens=5)
    result = cli("generate", str(chat_checkpoint), "--prompt", "w20 w21", "--chat", "-n", "5", "--json",
                 "--backend", backend, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == expected.tokens


def test_generate_without_tokenizer_says_what_to_do():
    result = cli("generate", "tiny-mqa", "--prompt", "hello", "-n", "2")  # `tiny` has the byte-level tokenizer
    assert result.returncode == 1 and "--prompt-ids" in result.stderr and result.stderr.count("\n") == 1


def test_tiny_preset_generates_text_with_its_byte_level_tokenizer():
    result = cli("generate", "tiny", "--prompt", "hello", "-n", "4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["tokens"]) == 4 and all(0 <= t < 261 for t in out["tokens"])
