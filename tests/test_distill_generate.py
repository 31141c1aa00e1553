"""Sequence-level distillation data (gemmalab.distill.generate, `gemmalab distill generate`) on every backend:
the records hold the teacher's greedy continuations, worked out here by the float64 numpy reference one token
at a time; a killed run resumes to the same file; other settings or prompts are refused; and the student's
trainer reads the file with the loss on the completions only."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli, sigkill_when
from conftest import BACKENDS, SHAPES

from gemmalab import checkpoint, reference
from gemmalab.distill.generate import COT_TEMPLATE, generate_data
from gemmalab.errors import ConfigError, InputError
from gemmalab.params import init_weights
from gemmalab.tokenizer import Tokenizer
from gemmalab.train.data import load_documents, tokenize

CONFIG = SHAPES["tiny"]
PROMPTS = ["12+7=", "Gemma 3 has", "a", "The teacher says", "x"]
CLI_BACKEND = "torch" if "torch" in BACKENDS else (BACKENDS[0] if BACKENDS else None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, dict]:
    """(checkpoint folder, float32 weights) of the tiny preset with std 0.3 weights (clear argmax margins), and
    the byte-level tokenizer beside them."""
    weights = init_weights(CONFIG, seed=3, std=0.3)  # seed 3: chat replies with letters, not only newlines
    folder = checkpoint.save_checkpoint(tmp_path_factory.mktemp("teacher"), CONFIG.with_dtype("float32"), weights)
    Tokenizer.byte_level().save(folder)
    return folder, weights


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def reference_greedy(weights: dict, text: str, max_tokens: int, *, chat: bool = False) -> str:
    """The teacher's greedy continuation by full float64 forward passes of the reference, stopping at eos (and,
    in a chat, at <end_of_turn>); the prompt as plain text, or as a user turn in Gemma's chat format."""
    tokenizer = Tokenizer.byte_level()
    ids = tokenizer.apply_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    stops = {*CONFIG.eos_token_ids, *([tokenizer.end_of_turn_id] if chat else [])}
    new: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(reference.forward(CONFIG, weights, np.array([ids + new]))[0, -1]))
        if token in stops:
            break
        new.append(token)
    return tokenizer.decode(new)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(teacher_folder: Path, prompts: Path, out: Path, **options) -> Path:
    settings = {"max_tokens": 5, "batch_size": 2, "backend": CLI_BACKEND, "progress": False, "echo": lambda line: None,
                **options}
    return generate_data(teacher_folder, prompts, out, **settings)


def test_records_hold_the_teachers_greedy_responses(backend, teacher, prompts, tmp_path):
    folder, weights = teacher
    out = run(folder, prompts, tmp_path / "data.jsonl", backend=backend, template="Q: {prompt}\nA:")
    got = records(out)
    assert [r["index"] for r in got] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in got] == [f"Q: {p}\nA:" for p in PROMPTS]
    assert [r["completion"] for r in got] == [reference_greedy(weights, f"Q: {p}\nA:", 5) for p in PROMPTS]
    assert [r["source"] for r in got] == [{"id": f"p{i}"} for i in range(len(PROMPTS))]
    assert got[0]["settings"]["template"] == "Q: {prompt}\nA:" and got[0]["settings"]["max_tokens"] == 5


def test_chat_records_are_message_lists_trained_on_the_reply(backend, teacher, prompts, tmp_path):
    folder, weights = teacher
    out = run(folder, prompts, tmp_path / "chat.jsonl", backend=backend, chat=True, max_tokens=8)
    got = records(out)
    assert [r["prompt"] for r in got] == [[{"role": "user", "content": p}] for p in PROMPTS]
    assert [r["completion"] for r in got] == [[{"role": "assistant", "content": reference_greedy(weights, p, 8, chat=True)}]
                                              for p in PROMPTS]
    tokenizer = Tokenizer.byte_level()
    for document, record in zip(load_documents(out), got, strict=True):
        _, trained = tokenize(document, tokenizer)
        # trained: the reply's bytes and its closing <end_of_turn>, nothing of the user's turn
        assert int(trained.sum()) == len(record["completion"][0]["content"].strip().encode()) + 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_killed_run_resumes_to_the_same_file(teacher, prompts, tmp_path, temperature):
    folder, _ = teacher
    whole = run(folder, prompts, tmp_path / "whole.jsonl", temperature=temperature, seed=3).read_bytes()
    lines = whole.splitlines(keepends=True)
    # a kill inside the second batch's write: its first record whole, the second cut in the middle
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    assert run(folder, prompts, cut, temperature=temperature, seed=3).read_bytes() == whole


def test_other_settings_or_prompts_are_refused_and_the_file_is_kept(teacher, prompts, tmp_path):
    folder, _ = teacher
    out = run(folder, prompts, tmp_path / "data.jsonl")
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="other settings"):
        run(folder, prompts, out, max_tokens=7)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "something else"}) + "\n")
    with pytest.raises(ConfigError, match="other prompts"):
        run(folder, other, out)
    assert out.read_bytes() == before
    # someone else's file as --out (here the prompts themselves, without a final newline) is left as it is
    mistaken = tmp_path / "mine.jsonl"
    mistaken.write_bytes(prompts.read_bytes().rstrip(b"\n"))
    kept = mistaken.read_bytes()
    with pytest.raises(InputError, match="not a record of gemmalab distill generate"):
        run(folder, prompts, mistaken)
    assert mistaken.read_bytes() == kept


@pytest.mark.parametrize(("text", "message"), [
    ("not json\n", "prompts.jsonl:1 is not valid JSON"),
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', 'prompts.jsonl:2 has no "prompt" string'),
    ("\n", "holds no prompts"),
])
def test_bad_prompt_files_say_which_line(teacher, tmp_path, text, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        run(teacher[0], path, tmp_path / "data.jsonl")
    assert not (tmp_path / "data.jsonl").exists()


def test_a_template_needs_its_placeholder(teacher, prompts, tmp_path):
    with pytest.raises(ConfigError, match="has no {prompt}"):
        run(teacher[0], prompts, tmp_path / "data.jsonl", template="no placeholder")


def test_the_student_trains_on_the_completions_only(teacher, prompts, tmp_path):
    out = run(teacher[0], prompts, tmp_path / "data.jsonl", template=COT_TEMPLATE)
    tokenizer = Tokenizer.byte_level()
    documents = load_documents(out)
    assert [(d.prompt, d.completion) for d in documents] == [(r["prompt"], r["completion"]) for r in records(out)]
    for document in documents:
        # byte-level: <bos> and the prompt's UTF-8 bytes untrained, the completion's bytes and <eos> trained
        _, trained = tokenize(document, tokenizer)
        prompt_bytes, completion_bytes = len(document.prompt.encode()), len(document.completion.encode())
        assert trained.tolist() == [False] * (1 + prompt_bytes) + [True] * (completion_bytes + 1)


@pytest.mark.skipif(CLI_BACKEND is None, reason="no backend installed")
def test_the_cli_writes_cot_records_and_refuses_bad_input_in_one_line(teacher, prompts, tmp_path):
    out = tmp_path / "cot.jsonl"
    result = run_cli("distill", "generate", "--teacher", str(teacher[0]), "--prompts", str(prompts), "--out", str(out),
                     "--cot", "--max-tokens", "3", "--backend", CLI_BACKEND, "-q")
    assert result.returncode == 0, result.stderr
    assert f"({len(PROMPTS)} records)" in result.stdout
    assert [r["prompt"] for r in records(out)] == [COT_TEMPLATE.replace("{prompt}", p) for p in PROMPTS]
    assert_clean_failure(run_cli("distill", "generate", "--teacher", str(teacher[0]), "--prompts",
                                 str(tmp_path / "missing.jsonl"), "--out", str(out)), "no prompts file")


KILLED_RUN = textwrap.dedent("""
    # `gemmalab ARGS`, except that the run stops for good once its second batch is on disk, so the test can
    # SIGKILL it there.
    import os, sys, time
    from gemmalab.distill import generate
    synced = []
    def fsync_or_hang(fd):
        os.fsync(fd)
        synced.append(fd)
        if len(synced) == 2:
            open(sys.argv[-1] + ".two-batches", "w").close()
            time.sleep(600)
    generate.os = type("os", (), {"fsync": staticmethod(fsync_or_hang)})
    from gemmalab.cli import main
    main(sys.argv[1:-1])
""")


@pytest.mark.skipif(CLI_BACKEND is None, reason="no backend installed")
def test_a_sigkilled_cli_run_resumes_to_the_uninterrupted_file(teacher, prompts, tmp_path):
    args = ["distill", "generate", "--teacher", str(teacher[0]), "--prompts", str(prompts), "--max-tokens", "4",
            "--batch-size", "2", "--temperature", "1.0", "--seed", "5", "--backend", CLI_BACKEND, "-q"]
    whole = tmp_path / "whole.jsonl"
    assert run_cli(*args, "--out", str(whole)).returncode == 0
    out, flag = tmp_path / "killed.jsonl", tmp_path / "flag"
    driver = tmp_path / "killed_run.py"
    driver.write_text(KILLED_RUN)
    sigkill_when([sys.executable, str(driver), *args, "--out", str(out), str(flag)],
                 lambda: Path(str(flag) + ".two-batches").exists(), "its second batch")
    assert [r["index"] for r in records(out)] == [0, 1, 2, 3]  # two batches of two, then the kill
    result = run_cli(*args, "--out", str(out))  # the same command: it goes on from prompt 4
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == whole.read_bytes()
