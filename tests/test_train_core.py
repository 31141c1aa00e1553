"""The training engine's control logic, no backend needed: schedules, layer scales, data, configuration,
checkpoint files and tracking. Expected values are written out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gemmalab.config import Gemma3Config
from gemmalab.errors import CheckpointError, ConfigError, InputError
from gemmalab.tokenizer import BYTE_LEVEL_VOCAB_SIZE, Tokenizer
from gemmalab.train import checkpoints
from gemmalab.train.config import TrainConfig
from gemmalab.train.data import DataStream, Document, load_documents, pack, tokenize
from gemmalab.train.layers import lr_scales
from gemmalab.train.loop import warmup_for
from gemmalab.train.schedules import Schedule
from gemmalab.train.spec import (
    OptimizerSpec,
    check_optimizer_state,
    expected_state_names,
    optimizer_state_by_parameter,
)
from gemmalab.train.tracking import Tracker, truncate_metrics


# -- schedules -----------------------------------------------------------------------------------------
def test_warmup_then_cosine_by_hand():
    s = Schedule("cosine", lr=1.0, total=6, warmup=2, min_lr=0.0)
    # warmup: 1/2, 2/2; then cosine over 4 updates, progress 0, 1/3, 2/3, 1
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3)), 0.0]
    assert [s(i) for i in range(6)] == pytest.approx(expected, abs=1e-12)


def test_linear_and_constant_by_hand():
    linear = Schedule("linear", lr=2.0, total=5, warmup=0, min_lr=1.0)
    assert [linear(i) for i in range(5)] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    constant = Schedule("constant", lr=3.0, total=4, warmup=1)
    assert [constant(i) for i in range(4)] == [3.0, 3.0, 3.0, 3.0]


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="unknown schedule"):
        Schedule("step", lr=1.0, total=3)


def test_default_warmup_is_capped_for_short_runs():
    assert warmup_for(TrainConfig(steps=60)) == (6, pytest.approx(warmup_for(TrainConfig(steps=60))[1]))
    assert warmup_for(TrainConfig(steps=60))[1] is not None
    assert warmup_for(TrainConfig(steps=5000)) == (1000, None)


# -- layer-wise learning rates and progressive unfreezing -----------------------------------------------
def test_layer_decay_by_hand():
    config = Gemma3Config.preset("tiny")  # 6 blocks
    scales = lr_scales(config, 0, layer_decay=0.5)
    assert scales["model.layers.5.mlp.up_proj.weight"] == 1.0
    assert scales["model.layers.0.self_attn.q_proj.weight"] == 0.5**5
    assert scales["model.embed_tokens.weight"] == 0.5**6
    assert scales["model.norm.weight"] == 1.0


def test_progressive_unfreezing_by_hand():
    config = Gemma3Config.preset("tiny")
    trainable = [
        sorted({int(n.split(".")[2]) for n, s in lr_scales(config, step, unfreeze_every=10, unfreeze_blocks=2).items()
                if s > 0 and n.startswith("model.layers.")})
        for step in (0, 9, 10, 20, 35)
    ]
    assert trainable == [[4, 5], [4, 5], [2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert lr_scales(config, 10, unfreeze_every=10, unfreeze_blocks=2)["model.embed_tokens.weight"] == 0.0
    assert lr_scales(config, 20, unfreeze_every=10, unfreeze_blocks=2)["model.embed_tokens.weight"] == 1.0
    assert lr_scales(config, 0, unfreeze_every=10, unfreeze_blocks=2)["model.norm.weight"] == 1.0


# -- data ------------------------------------------------------------------------------------------------
def test_byte_level_tokenizer_round_trip():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == BYTE_LEVEL_VOCAB_SIZE == Gemma3Config.preset("tiny").vocab_size
    text = "héllo\n<not special> ∑"
    ids = tok.encode(text)
    assert ids[0] == 2 and ids[1:] == [b + 5 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.encode("<start_of_turn>x<end_of_turn>", add_bos=False) == [3, ord("x") + 5, 4]


def test_chat_loss_falls_on_replies_only():
    tok = Tokenizer.byte_level()
    doc = Document(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                             {"role": "assistant", "content": "ok"}])
    ids, trained = tokenize(doc, tok)
    assert tok.decode(ids, skip_special=False) == (
        "<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
        "<start_of_turn>user\nok?<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>\n<eos>"
    )
    assert tok.decode(ids[trained], skip_special=False) == "yo<end_of_turn>ok<end_of_turn>"


def test_text_documents_pack_into_windows(tmp_path):
    tok = Tokenizer.byte_level()
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij")  # <bos> + 10 bytes + <eos> = 12 tokens
    windows, trained = pack(load_documents(path), tok, seq_len=3)  # windows of 4: three of them
    assert windows.shape == (3, 4)
    expected = [2] + [b + 5 for b in b"abcdefghij"] + [1]
    assert windows.reshape(-1).tolist() == expected
    assert trained.reshape(-1).tolist() == [False] + [True] * 11


def test_jsonl_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "one"}\n\n{"messages": [{"role": "user", "content": "q"}, '
                                            '{"role": "assistant", "content": "a"}]}\n')
    (tmp_path / "d" / "b.txt").write_text("two")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\xff")
    docs = load_documents(tmp_path / "d")
    assert [d.text for d in docs] == ["one", None, "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 has no \"text\" string"):
        load_documents(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="does not exist"):
        load_documents(tmp_path / "missing.txt")


def test_embedded_corpus_needs_no_download():
    docs = load_documents(None)
    assert len(docs) > 50 and sum(len(d.text) for d in docs) > 300_000


def test_stream_is_deterministic_disjoint_and_resumable():
    windows = np.arange(100 * 5).reshape(100, 5).astype(np.int32)
    trained = np.ones_like(windows, dtype=bool)
    a = DataStream(windows, trained, seed=3, eval_fraction=0.1)
    held_out = {tuple(w) for w in a.eval_windows.tolist()}
    assert len(held_out) == 10 and not held_out & {tuple(w) for w in a.train_windows.tolist()}
    first = [a.next_batch(7).inputs for _ in range(20)]  # 140 windows: wraps into epoch 1
    assert a.epoch == 1
    b = DataStream(windows, trained, seed=3, eval_fraction=0.1)
    for _ in range(11):
        b.next_batch(7)
    c = DataStream(windows, trained, seed=3, eval_fraction=0.1)
    c.restore(b.state())
    rest = [c.next_batch(7).inputs for _ in range(9)]
    assert all(np.array_equal(x, y) for x, y in zip(first[11:], rest, strict=True))
    epoch0 = np.concatenate(first)[:90]
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, a.train_windows[:, :-1].tolist()))


def test_a_data_limited_stream_keeps_the_held_out_split_and_cycles_its_few_windows():
    windows = np.arange(100 * 5).reshape(100, 5).astype(np.int32)
    trained = np.ones_like(windows, dtype=bool)
    full = DataStream(windows, trained, seed=3, eval_fraction=0.1)
    few = DataStream(windows, trained, seed=3, eval_fraction=0.1, max_train_windows=6)
    assert np.array_equal(few.eval_windows, full.eval_windows)  # every perplexity is on the same windows
    kept = {tuple(w) for w in few.train_windows.tolist()}
    assert len(kept) == 6 and kept <= {tuple(w) for w in full.train_windows.tolist()}
    served = {tuple(w) for _ in range(10) for w in few.next_batch(6).inputs.tolist()}
    assert served == {w[:-1] for w in kept} and few.epoch == 9  # ten passes over the same six windows
    more = DataStream(windows, trained, seed=3, eval_fraction=0.1, max_train_windows=1000)
    assert len(more.train_windows) == 90  # a limit above what there is keeps everything
    with pytest.raises(ConfigError, match="max_train_windows must be at least 1"):
        TrainConfig.from_sources(None, ["max_train_windows=0"])


# -- configuration ----------------------------------------------------------------------------------------
def test_yaml_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 10\nlr: 3e-4\noptimizer: adafactor\n")
    config = TrainConfig.from_sources(path, ["lr=1e-3", "max_grad_norm=null"], {"steps": 20, "seed": None})
    assert (config.steps, config.lr, config.optimizer, config.max_grad_norm) == (20, 1e-3, "adafactor", None)


@pytest.mark.parametrize(("item", "message"), [("lrr=1", "unknown setting"), ("steps=x", "steps must be int"),
                                               ("optimizer=sgd", "not one of adamw"), ("lr", "not key=value")])
def test_bad_settings_name_the_problem(item, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_sources(None, [item])


# -- checkpoints and tracking ----------------------------------------------------------------------------
def test_checkpoints_are_whole_and_pruned(tmp_path):
    config = Gemma3Config.preset("tiny")
    from gemmalab.params import init_weights

    weights = init_weights(config, seed=0)
    for step in (1, 2, 3):
        checkpoints.save(tmp_path, step, config=config, weights=weights, optimizer_state={"m": np.full(3, step, np.float32)},
                         state={"data": {"epoch": 0, "position": step}}, tokenizer=Tokenizer.byte_level(), keep_last=2)
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # a folder without trainer_state.json is incomplete
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    last = checkpoints.latest(tmp_path)
    assert checkpoints.read_state(last)["step"] == 3
    assert checkpoints.read_optimizer_state(last)["m"].tolist() == [3.0, 3.0, 3.0]
    import gemmalab

    reloaded = gemmalab.load(last, backend=None) if gemmalab.backends() else None
    if reloaded is not None:
        assert reloaded.tokenizer.vocab_size == 261
        assert np.array_equal(reloaded.weights()["model.norm.weight"], weights["model.norm.weight"])


def test_metrics_jsonl_is_truncated_to_the_resumed_step(tmp_path):
    tracker = Tracker(tmp_path, resume_step=None, tensorboard=True, aim=False)
    for step in (1, 2, 3):
        tracker.log({"step": step, "loss": 1.0 / step})
    tracker.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')  # a kill in the middle of a line
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_optimizer_state_groups_by_parameter_and_refuses_another_models():
    m, step = np.zeros((2, 3), np.float32), np.array([4])
    state = {"exp_avg/model.norm.weight": m, "step/model.norm.weight": step, "step/lm_head.weight": step}
    grouped = optimizer_state_by_parameter(state, ["model.norm.weight", "lm_head.weight", "unused"])
    assert set(grouped) == {"model.norm.weight", "lm_head.weight"}
    assert set(grouped["model.norm.weight"]) == {"exp_avg", "step"}
    assert grouped["model.norm.weight"]["exp_avg"] is m
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        optimizer_state_by_parameter(state, ["model.norm.weight"])


def test_canonical_optimizer_state_names_by_hand():
    adamw, adafactor = OptimizerSpec(name="adamw"), OptimizerSpec(name="adafactor")
    momentum = OptimizerSpec(name="adafactor", beta1=0.9)
    assert expected_state_names(adamw, (5, 3)) == {"step": (1,), "exp_avg": (5, 3), "exp_avg_sq": (5, 3)}
    assert expected_state_names(adafactor, (5, 3)) == {"step": (1,), "exp_avg_sq_row": (5,), "exp_avg_sq_col": (3,)}
    assert expected_state_names(adafactor, (2, 5, 3)) == {"step": (1,), "exp_avg_sq_row": (2, 5),
                                                          "exp_avg_sq_col": (2, 3)}
    assert expected_state_names(adafactor, [4]) == {"step": (1,), "exp_avg_sq": (4,)}
    assert expected_state_names(momentum, (4,)) == {"step": (1,), "exp_avg_sq": (4,), "exp_avg": (4,)}
    assert set(expected_state_names(momentum, (5, 3))) == {"step", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"}


def test_check_optimizer_state_groups_normalises_the_step_and_refuses_what_does_not_fit():
    adamw = OptimizerSpec(name="adamw")
    shapes = {"w": (2, 3), "b": (3,), "frozen": (3,)}
    m = np.ones((2, 3), np.float32)
    # torch, and checkpoints written before the names were canonical, hold the step as float32
    state = {"step/w": np.array([7.0], np.float32), "exp_avg/w": m, "exp_avg_sq/w": m}
    checked = check_optimizer_state(state, adamw, shapes)
    assert set(checked) == {"w"}  # parameters never updated have no entry, and need none
    assert checked["w"]["step"].dtype == np.int64 and checked["w"]["step"].tolist() == [7]
    assert checked["w"]["exp_avg"] is m
    needs = "where adamw needs exp_avg float32 [2, 3], exp_avg_sq float32 [2, 3], step int64 [1] for its shape [2, 3]"
    bad = {
        "wrong shape": ({**state, "exp_avg/w": np.ones(6, np.float32)}, "w holds exp_avg float32 [6], "),
        "missing": ({k: v for k, v in state.items() if k != "exp_avg_sq/w"},
                    "w holds exp_avg float32 [2, 3], step float32 [1], " + needs),
        "unknown state": ({**state, "exp_avg_sq_row/w": np.ones(2, np.float32)}, "exp_avg_sq_row float32 [2]"),
        "not float32": ({**state, "exp_avg/w": m.astype(np.float16)}, "exp_avg float16 [2, 3]"),
        "step not whole": ({**state, "step/w": np.array([1.5])}, "w has step [1.5], not a whole number of updates"),
        "step 0": ({**state, "step/w": np.array([0])}, "w has step [0]"),
        "0-d step": ({**state, "step/w": np.array(3)}, "step int64 []"),
        "unknown parameter": ({**state, "step/nope": np.array([1])}, "'step/nope', for a parameter this model does not"),
    }
    for case, (broken, message) in bad.items():
        with pytest.raises(CheckpointError) as refused:
            check_optimizer_state(broken, adamw, shapes)
        assert message in str(refused.value) and "\n" not in str(refused.value), case
    with pytest.raises(CheckpointError, match="where adafactor needs exp_avg_sq_col float32 \\[3\\], exp_avg_sq_row"):
        check_optimizer_state(state, OptimizerSpec(name="adafactor"), shapes)


# -- prompt/completion records and extended schedules ----------------------------------------------------
def test_prompt_completion_records_train_on_the_completion_only(tmp_path):
    from gemmalab.tokenizer import Tokenizer
    from gemmalab.train.data import load_documents, tokenize

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "completion": "cd"}) + "\n" + json.dumps({
        "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "r"}],
        "completion": [{"role": "assistant", "content": "y"}]}) + "\n")
    plain, chat = load_documents(path)
    tokenizer = Tokenizer.byte_level()
    ids, trained = tokenize(plain, tokenizer)
    # by hand: byte b is id b + 5, <bos> 2, <eos> 1; the loss predicts "c", "d" and <eos> only
    assert ids.tolist() == [2, ord("a") + 5, ord("b") + 5, ord("c") + 5, ord("d") + 5, 1]
    assert trained.tolist() == [False, False, False, True, True, True]
    ids, trained = tokenize(chat, tokenizer)
    text = tokenizer.decode(ids[trained].tolist(), skip_special=False)
    assert text == "y<end_of_turn>"  # the prompt's own reply "x" is context, not a target


def test_extended_schedule_keeps_the_old_cycle_and_restarts_by_the_same_warmup_rule():
    from gemmalab.train.schedules import Cycles

    cycles = Cycles("linear", 1.0, (0, 4), warmup_steps=2, min_lr=0.0).extended(24)
    # first cycle: 4 steps, warmup 2 >= 4 // 2 -> a tenth of 4 = 0: linear from 1 to 0 over updates 0..3
    assert [cycles(s) for s in range(4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # second cycle: 20 steps, warmup 2 < 10 kept: 0.5, 1.0, then linear down to 0 at update 23
    assert cycles(4) == pytest.approx(0.5) and cycles(5) == pytest.approx(1.0) and cycles(23) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="must go past"):
        cycles.extended(10)
