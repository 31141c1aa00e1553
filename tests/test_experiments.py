"""The experiment registry, `gemmalab experiments`, and the menu driven with keys as a user drives it."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot

from gemmalab.errors import ConfigError, InputError
from gemmalab.experiments import REPORT_FILE, get, registry
from gemmalab.experiments.registry import apply_overrides

# The tiny preset's byte-level vocabulary: a model that learned nothing scores about this perplexity.
UNIFORM_PERPLEXITY = 256


def test_the_registry_lists_train_tiny_with_what_a_user_needs():
    entries = registry()
    assert "train-tiny" in entries
    entry = entries["train-tiny"]
    assert entry.summary and entry.expected and entry.config_path.is_file()
    # the config shows its launch command at the top (the torchtune convention)
    assert "gemmalab experiments run train-tiny" in entry.config_text().split("\n\n")[0]
    assert set(entry.smoke) <= set(entry.settings())


def test_overrides_are_yaml_values_and_a_typo_is_refused():
    settings = {"steps": 10, "teacher": {"steps": 5, "preset": "tiny"}, "note": None}
    updated = apply_overrides(settings, ["steps=20", "teacher.preset=gemma-3-270m", "note=[1, 2]"])
    assert updated == {"steps": 20, "teacher": {"steps": 5, "preset": "gemma-3-270m"}, "note": [1, 2]}
    assert settings["teacher"]["preset"] == "tiny"  # the config itself is untouched
    with pytest.raises(ConfigError, match="stepz: no such setting here"):
        apply_overrides(settings, ["stepz=3"])
    with pytest.raises(ConfigError, match="steps is not a section"):
        apply_overrides(settings, ["steps.x=3"])
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides(settings, ["steps"])
    with pytest.raises(InputError, match="did you mean train-tiny"):
        get("train-tiy")


def test_train_tiny_smoke_run_learns_and_writes_its_report_and_plot(tmp_path):
    out = tmp_path / "run"
    result = run_cli("experiments", "run", "train-tiny", "--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["experiment"] == "train-tiny" and report["steps"] == 4
    # real effects of four steps: the loss fell, and the held-out perplexity is below a uniform guess
    assert report["final_loss"] < report["first_loss"]
    assert report["eval_perplexity"] < UNIFORM_PERPLEXITY
    assert math.isclose(report["eval_perplexity"], math.exp(report["eval_loss"]), rel_tol=1e-9)
    assert report["settings"]["steps"] == 4 and "steps=4" in report["overrides"]
    assert (out / report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval_perplexity" in result.stdout and str(out / REPORT_FILE) in result.stdout
    # running into the same folder again is refused, and the first report is kept
    before = snapshot(out)
    assert_clean_failure(
        run_cli("experiments", "run", "train-tiny", "--smoke", "--out", str(out)),
        "already holds",
        "choose another --out",
    )
    assert snapshot(out) == before


def test_distill_tiny_smoke_run_reports_the_gap_it_closes(tmp_path):
    from gemmalab.experiments.registry import run

    entry = get("distill-tiny")
    assert set(entry.smoke) <= {f"{section}.{key}" for section, values in entry.settings().items()
                                if isinstance(values, dict) for key in values} | set(entry.settings())
    smoke = [f"{k}={json.dumps(v)}" for k, v in entry.smoke.items()]
    report = run(entry, tmp_path / "run", overrides=smoke)
    assert json.loads((tmp_path / "run" / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    plain, kd, teacher = report["ppl_plain"], report["ppl_kd"], report["ppl_teacher"]
    # real effects at a few steps: the teacher (twice the steps) beats the plain student, everyone beats a
    # uniform guess, and gap_closed is the documented formula of the three perplexities
    assert teacher < plain < UNIFORM_PERPLEXITY and kd < UNIFORM_PERPLEXITY
    assert report["gap_closed"] == pytest.approx((plain - kd) / (plain - teacher), rel=1e-12)
    assert 0.0 <= report["top1_agreement_kd"] <= 1.0 and report["kl_kd"] > 0
    assert (tmp_path / "run" / report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_tiny_smoke_run_fine_tunes_both_ways_and_sizes_the_adapter(tmp_path):
    from gemmalab.experiments.registry import run

    entry = get("lora-tiny")
    report = run(entry, tmp_path / "run", overrides=[f"{k}={json.dumps(v)}" for k, v in entry.smoke.items()])
    # real effects of three steps: each fine-tuning lowers the held-out loss on the chat replies below the base's
    assert report["eval_loss_full"] < report["eval_loss_base"]
    assert report["eval_loss_lora"] < report["eval_loss_base"]
    # rank 8 on all seven linears of tiny's 6 blocks (hidden 64, 4 query / 2 kv heads of 16, MLP 128), by hand:
    # q and o 8*64 + 64*8, k and v 8*64 + 32*8, gate and up 8*64 + 128*8, down 8*128 + 64*8
    per_block = 2 * (512 + 512) + 2 * (512 + 256) + 2 * (512 + 1024) + (1024 + 512)
    assert report["adapter_parameters"] == 6 * per_block
    assert 4 * 6 * per_block < report["adapter_bytes"] < 4 * 6 * per_block + 65536  # float32, plus the header
    assert report["adapter_bytes"] < report["full_checkpoint_bytes"]
    assert (tmp_path / "run" / report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_tiny_smoke_run_scores_and_times_four_variants(tmp_path):
    from gemmalab.experiments.registry import run

    entry = get("quantize-tiny")
    report = run(entry, tmp_path / "run", overrides=[f"{k}={json.dumps(v)}" for k, v in entry.smoke.items()])
    fp32, q8, q4 = (report[f"perplexity_{name}"] for name in ("fp32", "q8", "q4"))
    # real effects: every variant beats a uniform guess, q4 moves the perplexity, and int8 moves it less than int4
    assert max(fp32, q8, q4, report["perplexity_bf16"]) < UNIFORM_PERPLEXITY
    assert q4 != fp32 and abs(q8 - fp32) < abs(q4 - fp32)
    assert report["perplexity_increase_q4"] == pytest.approx(q4 / fp32 - 1, rel=1e-12)
    assert [row["variant"] for row in report["table"]] == ["fp32", "bf16", "q8", "q4"]
    assert all(row["decode_tokens_per_s"] > 0 and row["generated_tokens"] > 0 for row in report["table"])
    assert (tmp_path / "run" / report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_features_smoke_run_reports_both_gaps_and_each_pair(tmp_path):
    from gemmalab.experiments.registry import run

    entry = get("distill-features")
    smoke = [f"{k}={json.dumps(v)}" for k, v in entry.smoke.items()]
    report = run(entry, tmp_path / "run", overrides=smoke)
    plain, teacher = report["ppl_plain"], report["ppl_teacher"]
    assert teacher < plain < UNIFORM_PERPLEXITY
    for name in ("logits", "features"):
        assert report[f"gap_closed_{name}"] == pytest.approx((plain - report[f"ppl_{name}"]) / (plain - teacher), rel=1e-12)
    # the mapping of the config, block by block, with each pair's figures for both distilled students
    mapping = [tuple(map(int, pair.split(":"))) for pair in report["mapping"].split(",")]
    for name in ("layers_logits", "layers_features"):
        rows = report[name]
        assert [(r["student_layer"], r["teacher_layer"]) for r in rows] == mapping
        assert all(r["attention_kl"] >= 0 for r in rows)
    # widths 48 and 64: a cosine needs the projection only the features student trains
    assert all(-1.0 <= r["hidden_cosine"] <= 1.0 for r in report["layers_features"])
    assert all(r["hidden_cosine"] is None for r in report["layers_logits"])
    # the features student's loss had its transfer terms, the logits student's none
    records = [json.loads(line) for line in (tmp_path / "run" / "logits-features" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/hidden_transfer_1" in records[0] and "loss/attention_transfer_5" in records[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "logits" / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("loss/hidden_transfer") for key in records[0])
    assert (tmp_path / "run" / report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_setting_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    assert_clean_failure(
        run_cli("experiments", "run", "train-tiny", "--set", "stepz=3", "--out", str(out)), "stepz", "known: "
    )
    assert not out.exists()
    assert_clean_failure(run_cli("experiments", "run", "nope"), "no experiment named 'nope'")


def test_list_json_names_every_entry():
    result = run_cli("experiments", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(registry())
    assert all(Path(r["config"]).is_file() and r["command"].endswith(r["name"]) for r in rows)


def test_the_menu_needs_a_terminal():
    assert_clean_failure(run_cli("experiments", "menu"), "needs a terminal", "gemmalab experiments run")


def test_the_menu_driven_by_keys_shows_the_config_runs_and_shows_the_results(tmp_path):
    from textual.widgets import Input, Static, TextArea

    from gemmalab.experiments.menu import ExperimentMenu

    smoke = [f"{k}={json.dumps(v)}" for k, v in get("train-tiny").smoke.items()]

    async def drive() -> tuple[str, str, str, dict | None]:
        app = ExperimentMenu(extra_sets=smoke, out_root=tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            names = list(app.entries)
            for _ in range(names.index("train-tiny")):
                await pilot.press("down")
            await pilot.pause()
            config_shown = app.query_one("#config", TextArea).text
            # a typo typed in the settings line: the run fails with the child's one-line reason
            await pilot.click("#sets")
            await pilot.press(*"stepz=3", "enter")
            await _until(pilot, lambda: app.process is None and app.last_error is not None)
            failed = str(app.query_one("#status", Static).render())
            app.query_one("#sets", Input).value = ""
            app.query_one("#entries").focus()
            await pilot.press("enter")
            await _until(pilot, lambda: app.process is None and app.last_report is not None)
            results = str(app.query_one("#results", Static).render())
            return config_shown, failed, results, app.last_report

    config_shown, failed, results, report = asyncio.run(drive())
    assert config_shown == get("train-tiny").config_text()
    assert "failed" in failed and "stepz" in failed
    assert report is not None and report["steps"] == 4
    assert "eval_perplexity" in results and f"{report['eval_perplexity']:.4g}" in results
    written = list(tmp_path.glob(f"train-tiny-*/{REPORT_FILE}"))
    assert len(written) == 1 and json.loads(written[0].read_text())["final_loss"] == report["final_loss"]


async def _until(pilot, condition, timeout: float = 300.0) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("the menu did not finish the run in time")
        await pilot.pause(0.2)
        waited += 0.2
