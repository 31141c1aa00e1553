"""The rules every command keeps, tried as a new user would: one clear line for bad input (and nothing written),
runs that fail rather than succeed at nothing, long runs that report where nobody watches a terminal, Ctrl-C
that keeps a checkpoint, resumes that are what they say, settings a user can discover. Each through the CLI
(a fresh process: exit code, one line, no traceback) and, where there is one, the Python API."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot

import gemmalab
from gemmalab.errors import InputError, OutputError
from gemmalab.train import TrainConfig, checkpoints
from gemmalab.train.evaluation import perplexity
from gemmalab.train.loop import plan_run, saved_settings

TINY_RUN = ["--seq-len", "32", "--batch-size", "2", "--set", "tensorboard=false", "--set", "warmup_steps=0"]
DEFAULT_BACKEND = "torch" if "torch" in gemmalab.backends() else gemmalab.backends()[0]


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """A folder nobody can write, root included: chmod for ordinary users, the immutable attribute for root
    (who ignores permission bits). Skips where neither holds, rather than test nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.mkdir()
        except OSError:
            pass
        else:
            probe.rmdir()
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step tiny run on the default backend, checkpointed every 2 steps (do not change it in a test)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    # eval_batches 32 x batch 2 covers the whole held-out split (at most 64 windows): the run's own final
    # evaluation is then an oracle for `gemmalab eval` on that split
    done = run_cli("train", "--steps", "4", "--out", str(run), "--checkpoint-every", "2", "-q", "--log-every", "1",
                   "--backend", DEFAULT_BACKEND, *TINY_RUN, "--set", "eval_batches=32")
    assert done.returncode == 0, done.stderr
    return run


# -- tracebacks where one line is promised ---------------------------------------------------------------
def test_usage_errors_are_one_line_with_exit_code_2():
    assert_clean_failure(run_cli("eval", "tiny", "--bogus"), "No such option: --bogus", "gemmalab eval --help", code=2)
    assert_clean_failure(run_cli("eval", "tiny", "--seq-len", "abc"), "--seq-len", code=2)


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--seq-len", "-1"], ["--seq-len", "0"], ["--max-batches", "0"]])
def test_eval_refuses_bad_counts_in_one_line(finished_run, args):
    step = checkpoints.latest(finished_run)
    assert_clean_failure(run_cli("eval", str(step), *args), args[0].lstrip("-").replace("-", " ").split()[0])


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"seq_len": -1}, {"seq_len": 0}, {"max_batches": 0}])
def test_perplexity_api_refuses_bad_counts(kwargs):
    model = gemmalab.init("tiny", backend=DEFAULT_BACKEND)
    with pytest.raises(InputError):
        perplexity(model, None, **kwargs)


def test_train_into_a_read_only_folder_or_a_file_writes_nothing(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        assert_clean_failure(run_cli("train", "--steps", "2", "--out", str(ro / "run"), *TINY_RUN), "not writable", "--out")
        assert_clean_failure(run_cli("train", "--steps", "2", "--out", str(ro), *TINY_RUN), "not writable")
        assert snapshot(ro) == {}
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert_clean_failure(run_cli("train", "--steps", "2", "--out", str(blocker), *TINY_RUN), "is a file, not a folder")
    assert_clean_failure(run_cli("train", "--steps", "2", "--out", str(blocker / "run"), *TINY_RUN), "is a file")
    assert blocker.read_text() == "keep me"


def test_convert_and_save_into_a_read_only_folder(finished_run, tmp_path):
    step = checkpoints.latest(finished_run)
    with read_only_folder(tmp_path / "ro") as ro:
        assert_clean_failure(run_cli("convert", str(step), str(ro / "out")), "not writable", str(ro / "out"))
        model = gemmalab.load(step, backend=DEFAULT_BACKEND)
        with pytest.raises(OutputError, match="not writable") as caught:
            model.save(ro / "copy")
        assert isinstance(caught.value, OSError)  # code that catches OSError around a save keeps working
        assert snapshot(ro) == {}


def test_overwrite_hint_speaks_the_callers_language(finished_run, tmp_path):
    step = checkpoints.latest(finished_run)
    model = gemmalab.load(step, backend=DEFAULT_BACKEND)
    model.save(tmp_path / "copy")
    before = snapshot(tmp_path / "copy")
    with pytest.raises(gemmalab.GemmalabError, match="pass overwrite=True"):
        model.save(tmp_path / "copy")
    assert_clean_failure(run_cli("convert", str(step), str(tmp_path / "copy")), "pass --overwrite")
    assert snapshot(tmp_path / "copy") == before


def test_stop_strings_through_the_cli_and_the_api(backend):
    model = gemmalab.init("tiny", backend=backend, seed=0)
    prompt = "The sliding window"
    free = model.generate(prompt, max_tokens=24, stop=[])
    text = free.text
    # a stop string that first occurs past the start: a character that is not a replacement character
    index = next(i for i in range(2, len(text)) if text[i] != "\ufffd" and text.find(text[i]) == i)
    stop = text[index]
    stopped = model.generate(prompt, max_tokens=24, stop=[stop])
    assert stopped.text == text[:index] and stopped.finish_reasons == ["stop"]
    assert stopped.tokens == free.tokens[: len(stopped.tokens)] and len(stopped.tokens) < len(free.tokens)
    streamed = "".join(chunk.text for chunk in model.stream(prompt, max_tokens=24, stop=[stop]))
    assert streamed == text[:index]
    result = run_cli("generate", "tiny", "--prompt", prompt, "-n", "24", "--stop", stop, "--json", "-b", backend)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == text[:index]


def test_bad_stop_values_are_one_line():
    assert_clean_failure(run_cli("generate", "tiny", "-p", "hi", "--stop-ids", "abc"), "--stop-ids 'abc'")
    assert_clean_failure(run_cli("generate", "tiny-mqa", "--prompt-ids", "5,6", "--stop", "abc"), "--stop-ids")
    model = gemmalab.init("tiny-mqa", backend=DEFAULT_BACKEND)  # no tokenizer
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        model.generate([5, 6, 7], max_tokens=2, stop=["abc"])
    with pytest.raises(InputError, match="token ids .int. or stop strings"):
        gemmalab.init("tiny", backend=DEFAULT_BACKEND).generate("hi", max_tokens=2, stop=[1.5])


def test_generate_refuses_before_building_the_model():
    # a 27B preset would need over 100 GB to build: a refusal that comes back at all came before the build
    assert_clean_failure(run_cli("generate", "gemma-3-27b", "--prompt", "hello"), "no tokenizer", "--prompt-ids")
    assert_clean_failure(run_cli("generate", "gemma-3-27b", "--prompt-ids", "2,3", "--system", "x"), "--chat")


# -- runs that succeed at nothing ------------------------------------------------------------------------
def test_chat_data_without_replies_is_refused_and_nothing_is_written(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]})
                               for i in range(50)) + "\n")
    out = tmp_path / "run"
    result = run_cli("train", "--data", str(chats), "--steps", "2", "--out", str(out), *TINY_RUN)
    assert_clean_failure(result, "no tokens to train on", "assistant reply")
    assert not out.exists()


# -- long runs that say nothing --------------------------------------------------------------------------
def test_train_writes_plain_progress_lines_when_not_a_terminal(tmp_path):
    result = run_cli("train", "--steps", "4", "--log-every", "2", "--out", str(tmp_path / "run"), *TINY_RUN)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all(" loss " in line and " lr " in line and "tok/s" in line and " eta " in line for line in lines)
    assert "\x1b[" not in result.stdout  # no terminal control codes in a log file


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_ctrl_c_keeps_a_checkpoint_and_the_resumed_run_is_the_same(tmp_path):
    common = ["--steps", "10", "--log-every", "1", "-q", "--backend", DEFAULT_BACKEND, *TINY_RUN]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_cli("train", *common, "--out", str(whole)).returncode == 0
    process = subprocess.Popen([sys.executable, "-m", "gemmalab", "train", *common, "--out", str(stopped)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (stopped / "metrics.jsonl").exists() and max(_losses(stopped), default=0) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = checkpoints.latest(stopped)
    assert last is not None
    step = checkpoints.read_state(last)["step"]
    assert 3 <= step < 10 and max(_losses(stopped)) == step  # the step in progress finished, and was kept
    assert f"interrupted at step {step} of 10" in err and f"gemmalab train --out {stopped} --resume" in err
    again = run_cli("train", "--out", str(stopped), "--resume", "-q")
    assert again.returncode == 0, again.stderr
    assert _losses(stopped) == _losses(whole)


# -- resume that is not what it says ---------------------------------------------------------------------
def test_resume_without_a_run_is_refused(tmp_path):
    assert_clean_failure(run_cli("train", "--out", str(tmp_path / "typo"), "--resume"), "no run to resume", "typo")
    assert not (tmp_path / "typo").exists()
    with pytest.raises(gemmalab.GemmalabError, match="no run to resume"):
        gemmalab.train.train(TrainConfig(out=str(tmp_path / "typo"), resume=True), progress=False)


def test_changing_steps_on_resume_needs_extend_and_follows_the_documented_rule(tmp_path):
    run = tmp_path / "run"
    lr = 1e-3
    first = run_cli("train", "--steps", "6", "--out", str(run), "--lr", str(lr), "--log-every", "1", "-q",
                    "--backend", DEFAULT_BACKEND, *TINY_RUN, "--set", "warmup_steps=2")
    assert first.returncode == 0, first.stderr
    before = snapshot(run)
    assert_clean_failure(run_cli("train", "--out", str(run), "--resume", "--steps", "10"), "--steps 10", "--extend")
    assert_clean_failure(run_cli("train", "--out", str(run), "--resume", "--set", "seed=5"), "seed", "new run")
    assert_clean_failure(run_cli("train", "--out", str(run), "--resume"), "already at step 6", "--extend")
    assert snapshot(run) == before
    extended = run_cli("train", "--out", str(run), "--resume", "--steps", "10", "--extend", "-q")
    assert extended.returncode == 0, extended.stderr
    rates = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    # Hand derivation of the rule (README, "Checkpoints and resuming"): the first 6 updates keep their
    # cosine with warmup 2: update 0 at lr/2, update 1 at lr, then cos decay to 0 at update 5. The extension
    # is a new cosine cycle over updates 6..9: 4 steps, warmup 2 >= 4 // 2, so a tenth of 4 = 0 warmup.
    assert rates[1] == pytest.approx(lr / 2) and rates[2] == pytest.approx(lr) and rates[6] == pytest.approx(0.0)
    for k in range(4):  # update 6 + k is the k-th of the new cycle: lr * (1 + cos(pi * k / 3)) / 2
        assert rates[7 + k] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * k / 3)), abs=1e-12)
    again = run_cli("train", "--out", str(run), "--resume", "--steps", "12", "--extend", "-q")  # and once more
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(not {"torch", "jax"} <= set(gemmalab.backends()), reason="needs torch and jax")
def test_resume_on_another_backend_goes_on_and_the_writer_stays_the_default(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_cli("train", "--steps", "2", "--out", str(run), "--backend", "torch", "-q", *TINY_RUN).returncode == 0
    moved = run_cli("train", "--out", str(run), "--resume", "--steps", "3", "--extend", "--backend", "jax", "-q",
                    env={"GEMMALAB_BACKEND": ""})
    assert moved.returncode == 0, moved.stderr
    assert "written by the torch backend: going on with jax" in moved.stdout
    assert [checkpoints.read_state(p)["backend"] for p in checkpoints.complete_checkpoints(run)] == ["torch", "jax"]
    # Which backend the next resumption would take (planning only, as `gemmalab train --resume` plans it):
    # with no choice, the one that wrote the newest checkpoint; else the choice.
    def planned(backend: str | None = None, env: str | None = None) -> str:
        if env is None:
            monkeypatch.delenv("GEMMALAB_BACKEND", raising=False)
        else:
            monkeypatch.setenv("GEMMALAB_BACKEND", env)
        flags = {"out": str(run), "resume": True, "extend": True, "steps": 4, "backend": backend}
        config = TrainConfig.from_sources(flags=flags, base=saved_settings(run))
        return plan_run(run, config, echo=lambda _: None).backend

    assert planned() == "jax"
    assert planned(env="torch") == "torch" and planned("torch", env="jax") == "torch"
    if sys.platform != "darwin":  # auto is torch on a machine without Apple silicon or a TPU
        assert planned("auto") == "torch"


def test_resume_from_an_optimizer_state_that_does_not_fit_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    assert run_cli("train", "--steps", "4", "--checkpoint-every", "2", "--out", str(run), "--backend", DEFAULT_BACKEND,
                   "-q", *TINY_RUN).returncode == 0
    shutil.rmtree(checkpoints.latest(run))  # a run killed after its checkpoint of step 2
    path = checkpoints.latest(run) / checkpoints.OPTIMIZER_FILE
    state = load_file(str(path))
    state["exp_avg/model.norm.weight"] = state["exp_avg/model.norm.weight"][:3]
    save_file(state, str(path))
    before = snapshot(run)
    result = run_cli("train", "--out", str(run), "--resume", "-q")
    assert_clean_failure(result, str(path), "model.norm.weight holds exp_avg float32 [3]", "needs exp_avg float32 [64]")
    assert snapshot(run) == before


# -- settings a user can find ----------------------------------------------------------------------------
def test_every_setting_is_listed_with_its_default():
    result = run_cli("train", "--list-settings", columns=250)
    assert result.returncode == 0, result.stderr
    for name, _, default, _ in TrainConfig.settings():
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if "│" in line]
        row = next((c for c in cells if c and c[0] == name), None)
        assert row is not None, name
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        assert row[2] == shown, (name, row)
    assert "(default: 1000)" in run_cli("train", "--help", columns=250).stdout  # --steps shows its default


def test_none_for_optional_settings_and_dtype_for_precision(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--steps", "1", "--out", str(run), "-q", "--set", "max_grad_norm=none",
                     "--dtype", "bf16", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    saved = checkpoints.read_state(checkpoints.latest(run))["config"]
    assert saved["max_grad_norm"] is None and saved["precision"] == "bf16"
    assert_clean_failure(run_cli("train", "--set", "lrr=1"), "lrr", "did you mean lr", "--list-settings")


def test_eval_of_a_run_scores_its_held_out_split(finished_run):
    step = checkpoints.latest(finished_run)
    held = json.loads(run_cli("eval", str(step), "--json", "-b", DEFAULT_BACKEND).stdout)
    # the run's own evaluation of its final checkpoint, on the held-out windows it reported
    final = [r for r in map(json.loads, (finished_run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert held["loss"] == pytest.approx(final[-1]["eval_loss"], rel=1e-5)
    assert "held-out" in held["scored"]
    everything = json.loads(run_cli("eval", str(step), "--json", "--split", "all", "--max-batches", "100", "--batch-size", "2",
                                    "-b", DEFAULT_BACKEND).stdout)
    assert everything["windows"] == 200 and held["windows"] <= 64 and "all of" in everything["scored"]


def test_sequences_past_the_model_positions_are_refused(tmp_path, finished_run):
    limit = gemmalab.Gemma3Config.preset("tiny").max_position_embeddings
    assert_clean_failure(run_cli("train", "--steps", "1", "--seq-len", str(limit + 1), "--out", str(tmp_path / "r")),
                         f"--seq-len {limit}")
    assert not (tmp_path / "r").exists()
    assert_clean_failure(run_cli("eval", str(checkpoints.latest(finished_run)), "--seq-len", str(limit + 1)),
                         f"{limit} positions")
    ids = ",".join(["7"] * limit)
    assert_clean_failure(run_cli("generate", "tiny", "--prompt-ids", ids, "-n", "2"), f"at most {limit} positions")


def test_generation_past_the_last_position_is_cut_with_a_warning(backend):
    import dataclasses

    config = dataclasses.replace(gemmalab.Gemma3Config.preset("tiny"), max_position_embeddings=40)
    model = gemmalab.init(config, backend=backend)
    with pytest.warns(UserWarning, match="generating at most 5"):
        result = model.generate(list(range(10, 45)), max_tokens=10, stop=[])
    assert len(result.tokens) == 5 and result.finish_reasons == ["length"]


def test_prompt_completion_jsonl_trains_from_the_cli(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}? ", "completion": f"Answer {i}."}) for i in range(60)))
    result = run_cli("train", "--data", str(data), "--steps", "2", "--out", str(tmp_path / "run"), "-q", *TINY_RUN)
    assert result.returncode == 0, result.stderr


# -- the same rules through the Python API, and for every command to come ---------------------------------
def test_the_api_refuses_what_the_cli_refuses(tmp_path):
    from gemmalab.train import train

    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(OutputError, match="not writable"):
            train(TrainConfig(out=str(ro / "run"), steps=1), progress=False)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join([json.dumps({"messages": [{"role": "user", "content": "q" * 40}]})] * 20))
    with pytest.raises(InputError, match="no tokens to train on"):
        train(TrainConfig(out=str(tmp_path / "chat"), data=str(chats), steps=1, seq_len=32), progress=False)
    assert not (tmp_path / "chat").exists()
    with pytest.raises(gemmalab.GemmalabError, match="max_grad_norm must be positive"):
        TrainConfig(max_grad_norm=0.0)


def test_every_command_registers_through_the_shared_failure_policy():
    from gemmalab.cli import app

    for info in app.registered_commands:
        assert hasattr(info.callback, "__wrapped__"), f"{info.callback.__name__}: register it with cli.app.command()"


def test_ctrl_c_in_any_command_is_one_line_and_exit_130():
    # Python's Ctrl-C handler put back in the child: a test run launched in the background by a non-interactive
    # shell (`make test &`) has SIGINT ignored, the child inherits that, and Python then installs no handler
    # (a preexec_fn would do it too, but forking a multithreaded parent can deadlock)
    command = ["generate", "tiny", "--prompt-ids", "5", "-n", "4000", "-b", DEFAULT_BACKEND]
    process = subprocess.Popen([sys.executable, "-c", "import runpy, signal, sys; "
                                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                                f"sys.argv = ['gemmalab', *{command!r}]; runpy.run_module('gemmalab', run_name='__main__')"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(8)  # tokens are streaming: the command is running
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert err.decode().strip().splitlines() == ["error: interrupted (Ctrl-C)"]


def test_an_unknown_preset_or_a_missing_checkpoint_fails_before_any_work(tmp_path):
    assert_clean_failure(run_cli("train", "--preset", "gemma-9", "--out", str(tmp_path / "r")), "'gemma-9'", "tiny")
    assert not (tmp_path / "r").exists()
    # bench finds the checkpoint before its bandwidth measurement: one line, not progress lines then one
    assert_clean_failure(run_cli("bench", str(tmp_path / "absent")), "not a folder with a config.json")
