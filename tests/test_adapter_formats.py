"""Adapter files (gemmalab.adapters, `gemmalab lora export|merge`): PEFT's and mlx-lm's formats, read and written.

Oracles: PEFT itself (adapters it saved with save_pretrained, and PeftModel.from_pretrained's logits for the
folders written here), mlx-lm itself (adapters made by its linear_to_lora_layers and saved as its trainer saves
them, and mlx_lm.load(..., adapter_path=)'s logits for the folders written here), and the float64 numpy
reference on the merged weights. Tiny random checkpoints of 6 blocks written by transformers, a few tokens.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot
from conftest import (
    SHAPES,
    hf_logits,
    hf_weights,
    make_hf_model,
    randomized_peft,
    relative_error,
    save_hf,
    token_ids,
    torch,
)
from safetensors.numpy import load_file, save_file

from gemmalab import adapters, checkpoint, lora, reference
from gemmalab.errors import InputError
from gemmalab.tokenizer import Tokenizer

peft = pytest.importorskip("peft")

CONFIG = SHAPES["tiny"]  # 6 blocks, tied head
UNTIED = SHAPES["untied-softcap"]  # 6 blocks, an lm_head of its own
TARGETS = ("q_proj", "v_proj", "down_proj")
IDS = token_ids(CONFIG, batch=2, seq=20)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(transformers model, its float32 weights, its checkpoint folder with a tokenizer) of the tiny shape."""
    hf = make_hf_model(CONFIG, seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp("base"))
    Tokenizer.byte_level().save(folder)  # mlx_lm.load reads a tokenizer; merge copies it
    return hf, hf_weights(hf), folder


@pytest.fixture(scope="module")
def mlx_base(base, tmp_path_factory) -> Path:
    """The same base for mlx-lm, its config.json written by gemmalab: mlx-lm 0.32 reads rope_theta,
    rope_local_base_freq and rope_scaling, not the rope_parameters transformers 5 writes, so from transformers'
    own folder it would drop the global layers' linear RoPE scaling (x8 here) and compute another model."""
    _, weights, _ = base
    folder = checkpoint.save_checkpoint(tmp_path_factory.mktemp("mlx-base"), CONFIG.with_dtype("float32"), weights)
    Tokenizer.byte_level().save(folder)
    return folder


@pytest.fixture(scope="module")
def untied():
    hf = make_hf_model(UNTIED, seed=4)
    return hf, hf_weights(hf)


def peft_saved(hf_base, folder: Path, *, seed: int = 0, **settings) -> Path:
    """An adapter made and saved by PEFT over a copy of ``hf_base``: its B (and DoRA magnitude) random."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, **settings})
    model = randomized_peft(hf_base, config, seed)
    model.save_pretrained(folder)
    return folder


def peft_loaded(hf_base, folder: Path):
    """PeftModel.from_pretrained over a copy of ``hf_base``, refusing any warning about keys it did not load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), str(folder)).eval()
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not keys, keys
    return model


def peft_linears(model) -> set[str]:
    """The linears a PeftModel wraps, by their names in the module tree (not by gemmalab's format code)."""
    return {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            for n, _ in model.named_parameters() if n.endswith(".lora_A.default.weight")}


def random_adapter(settings: lora.LoraConfig, config, weights, seed: int = 0) -> lora.Adapter:
    """A gemmalab adapter with every tensor nonzero: A drawn, B random, DoRA's magnitude perturbed."""
    adapter = lora.fresh_adapter(settings, config, seed, weights)
    rng = np.random.default_rng(seed + 100)
    tensors = {}
    for name, parts in adapter.tensors.items():
        parts = {**parts, "lora_B": rng.normal(0, 0.2, parts["lora_B"].shape).astype(np.float32)}
        if settings.dora:
            parts["magnitude"] = (parts["magnitude"] * rng.uniform(0.7, 1.3, parts["magnitude"].shape)).astype(np.float32)
        tensors[name] = parts
    return lora.with_tensors(adapter, tensors)


def merged_logits(config, weights, adapter, ids=IDS) -> np.ndarray:
    return reference.forward(config, adapter.merged(weights), ids)


def assert_same_tensors(ours: lora.Adapter, theirs: lora.Adapter) -> None:
    assert list(ours.tensors) == list(theirs.tensors)
    for name, parts in theirs.tensors.items():
        assert set(ours.tensors[name]) == set(parts), name
        for part, value in parts.items():
            assert np.array_equal(ours.tensors[name][part], value), (name, part)


# -- PEFT ----------------------------------------------------------------------------------------------------
PEFT_CASES = {
    "lora": ({"target_modules": list(TARGETS)}, (TARGETS, None)),
    "dora": ({"target_modules": list(TARGETS), "use_dora": True}, (TARGETS, None)),
    "rslora-layers": ({"target_modules": ["q_proj", "mlp.up_proj"], "use_rslora": True, "r": 8, "lora_alpha": 6,
                       "layers_to_transform": [2, 3, 4]}, (("mlp.up_proj", "q_proj"), (2, 5))),
    "dora-scattered-layers": ({"target_modules": ["k_proj", "o_proj"], "use_dora": True, "lora_dropout": 0.1,
                               "layers_to_transform": [1, 4]}, None),  # not a range: the linears by name
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_an_adapter_peft_saved_reads_back_to_peft_s_logits(base, tmp_path, case):
    hf, weights, _ = base
    settings, expected_form = PEFT_CASES[case]
    folder = peft_saved(hf, tmp_path / case, **settings)
    ours = adapters.read_peft(folder)
    theirs = peft_loaded(hf, folder)

    config = ours.config
    assert (config.rank, config.alpha) == (settings.get("r", 4), settings.get("lora_alpha", 8))
    assert (config.dora, config.rslora) == (settings.get("use_dora", False), settings.get("use_rslora", False))
    assert config.dropout == settings.get("lora_dropout", 0.0)
    if expected_form is not None:
        assert (tuple(sorted(config.targets)), config.layers) == (tuple(sorted(expected_form[0])), expected_form[1])
    assert set(config.linears(CONFIG)) == set(ours.tensors) == peft_linears(theirs)
    ours.check(CONFIG)
    assert relative_error(merged_logits(CONFIG, weights, ours), hf_logits(theirs, IDS)) < 1e-4


WRITE_CASES = {
    "lora": (CONFIG, lora.LoraConfig(rank=4, alpha=8, targets=TARGETS)),
    "dora-rslora": (CONFIG, lora.LoraConfig(rank=4, alpha=3, targets=("k_proj", "mlp.gate_proj"), dora=True,
                                            rslora=True)),
    "layers": (CONFIG, lora.LoraConfig(rank=2, alpha=4, targets=("v_proj", "o_proj"), layers=(3, 6))),
    # a full name that the layer range leaves out: PEFT would take it anyway, so the paths are written
    "full-name-and-layers": (CONFIG, lora.LoraConfig(rank=4, targets=("q_proj", "model.layers.0.mlp.up_proj"),
                                                     layers=(2, 5))),
    "head": (UNTIED, lora.LoraConfig(rank=4, alpha=4, targets=("v_proj", "lm_head"), dora=True)),
    # PEFT would adapt an lm_head it is named by whatever the layers: the paths are written
    "head-and-layers": (UNTIED, lora.LoraConfig(rank=4, alpha=4, targets=("q_proj", "lm_head"), layers=(1, 3))),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_a_written_peft_adapter_loads_in_peft_with_the_merged_logits(base, untied, tmp_path, case):
    config, settings = WRITE_CASES[case]
    hf, weights = base[:2] if config is CONFIG else untied
    adapter = random_adapter(settings, config, weights)
    folder = adapters.write_peft(adapter, tmp_path / "adapter", base_model_name_or_path="tiny-base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((folder / "adapter_config.json").read_text())
    exact_paths = case.endswith("and-layers")
    assert written["target_modules"] == (sorted(adapter.tensors, key=list(adapter.tensors).index)
                                         if exact_paths else list(settings.targets))
    assert written["layers_to_transform"] == (list(range(*settings.layers)) if settings.layers and not exact_paths
                                              else None)
    theirs = peft_loaded(hf, folder)
    assert peft_linears(theirs) == set(adapter.tensors)
    assert relative_error(hf_logits(theirs, IDS), merged_logits(config, weights, adapter)) < 1e-4
    back = adapters.read_peft(folder)
    assert_same_tensors(back, adapter)
    assert back.config.scale == settings.scale and set(back.config.linears(config)) == set(adapter.tensors)


# -- mlx-lm --------------------------------------------------------------------------------------------------
def mlx_logits(model, ids=IDS) -> np.ndarray:
    mx = pytest.importorskip("mlx.core")
    return np.array(model(mx.array(ids)).astype(mx.float32))


MLX_CASES = {
    "lora": lora.LoraConfig(rank=4, alpha=8, targets=TARGETS),
    "dora": lora.LoraConfig(rank=4, alpha=6, targets=("q_proj", "mlp.up_proj"), dora=True),
    # blocks 2:4 of 6 and different linears per block: mlx-lm wraps more (the last 4 blocks, the union of
    # the paths), and those the file lacks compute what the base does
    "scattered": lora.LoraConfig(rank=4, alpha=4, targets=("k_proj", "model.layers.3.mlp.down_proj"), layers=(2, 4),
                                 rslora=True, dora=True),
}


@pytest.mark.parametrize("case", list(MLX_CASES))
def test_a_written_mlx_adapter_loads_in_mlx_lm_with_the_merged_logits(base, mlx_base, tmp_path, case):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten

    _, weights, _ = base
    settings = MLX_CASES[case]
    adapter = random_adapter(settings, CONFIG, weights, seed=7)
    if settings.layers is not None:  # the top block is the base's to say
        with pytest.raises(InputError, match="give the base model"):
            adapters.write_mlx(adapter, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    folder = adapters.write_mlx(adapter, tmp_path / "adapter", model=CONFIG)
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["fine_tune_type"] == ("dora" if settings.dora else "lora")
    assert written["lora_parameters"]["scale"] == settings.scale
    lowest = min(int(n.split(".")[2]) for n in adapter.tensors)
    assert written["num_layers"] == CONFIG.num_hidden_layers - lowest

    model, _ = mlx_lm.load(str(mlx_base), adapter_path=str(folder))
    assert relative_error(mlx_logits(model), merged_logits(CONFIG, weights, adapter)) < 1e-4
    extra = {name.removesuffix(".lora_b") for name, value in tree_flatten(model.parameters())
             if name.endswith(".lora_b")} - set(adapter.tensors)
    assert bool(extra) == (case == "scattered")  # wrapped beyond the adapter only where the config cannot say it
    for name, value in tree_flatten(model.parameters()):
        if name.removesuffix(".lora_b") in extra:
            assert not np.array(value).any(), name  # strict=False left them at their zero start
    assert_same_tensors(adapters.read_mlx(folder), adapter)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_mlx_lm_saved_reads_back_to_mlx_lm_s_logits(base, mlx_base, tmp_path, dora):
    mlx_lm = pytest.importorskip("mlx_lm")
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    _, weights, _ = base
    model, _ = mlx_lm.load(str(mlx_base))
    model.freeze()
    parameters = {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 3, parameters, use_dora=dora)  # the last 3 blocks, as mlx_lm.lora does
    rng = np.random.default_rng(1)
    changed = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith(".lora_b"):
            changed.append((name, mx.array(rng.normal(0, 0.2, value.shape).astype(np.float32))))
        if name.endswith(".m"):
            changed.append((name, value * mx.array(rng.uniform(0.7, 1.3, value.shape).astype(np.float32))))
    model.load_weights(changed, strict=False)
    model.eval()
    folder = tmp_path / "mlx-adapter"
    folder.mkdir()
    # what mlx_lm.lora's train_model and trainer write: its arguments, and the trainable parameters
    save_config({"model": str(mlx_base), "fine_tune_type": "dora" if dora else "lora", "num_layers": 3,
                 "lora_parameters": parameters, "batch_size": 4, "iters": 10, "learning_rate": 1e-5,
                 "adapter_path": str(folder), "seed": 0}, folder / "adapter_config.json")
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))

    ours = adapters.read_adapter(folder)
    assert (ours.config.rank, ours.config.scale, ours.config.rslora, ours.config.dora) == (4, 2.5, False, dora)
    assert ours.config.alpha == 10.0 and ours.config.layers == (3, 6)
    assert set(ours.config.linears(CONFIG)) == set(ours.tensors) == {
        f"model.layers.{b}.{p}" for b in (3, 4, 5) for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert relative_error(merged_logits(CONFIG, weights, ours), mlx_logits(model)) < 1e-4


def test_peft_to_mlx_to_peft_keeps_the_tensors_exactly(base, tmp_path):
    hf, weights, _ = base
    folder = peft_saved(hf, tmp_path / "peft", target_modules=list(TARGETS), use_dora=True, use_rslora=True,
                        layers_to_transform=[2, 3, 4, 5])
    first = adapters.read_adapter(folder)
    mlx_folder = adapters.write_adapter(first, tmp_path / "mlx", "mlx", model=CONFIG)
    middle = adapters.read_adapter(mlx_folder)
    assert_same_tensors(middle, first)
    assert middle.config.scale == first.config.scale and middle.config.layers == first.config.layers == (2, 6)
    again = adapters.read_adapter(adapters.write_adapter(middle, tmp_path / "peft-again", "peft"))
    assert_same_tensors(again, first)
    raw_first, raw_again = load_file(folder / "adapter_model.safetensors"), load_file(
        tmp_path / "peft-again" / "adapter_model.safetensors")
    assert raw_first.keys() == raw_again.keys()
    assert all(np.array_equal(raw_first[k], raw_again[k]) for k in raw_first)
    theirs, back = peft_loaded(hf, folder), peft_loaded(hf, tmp_path / "peft-again")
    assert np.array_equal(hf_logits(theirs, IDS), hf_logits(back, IDS))


# -- merge ---------------------------------------------------------------------------------------------------
def test_merge_keeps_the_base_s_dtype_config_and_tokenizer(base, tmp_path):
    _, weights, _ = base
    bf16 = checkpoint.save_checkpoint(tmp_path / "bf16", CONFIG.with_dtype("bfloat16"), weights)
    Tokenizer.byte_level().save(bf16)
    adapter = random_adapter(lora.LoraConfig(rank=4, targets=("o_proj", "up_proj"), dora=True), CONFIG, weights)
    out = adapters.merge_checkpoint(bf16, adapter, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text()) == json.loads((bf16 / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (bf16 / "tokenizer.json").read_bytes()
    stored = checkpoint.read_weights(bf16, checkpoint.load_config(bf16))
    merged = checkpoint.read_weights(out, checkpoint.load_config(out))
    by_hand = adapter.merged({name: np.asarray(stored[name], np.float32) for name in stored})
    for name in stored:
        assert merged[name].dtype == stored[name].dtype, name
        expected = by_hand[name].astype(stored[name].dtype)
        assert np.array_equal(merged[name], expected), name
    with pytest.raises(InputError, match="is the base checkpoint itself"):
        adapters.merge_checkpoint(bf16, adapter, bf16, overwrite=True)


def test_the_merge_command_writes_a_checkpoint_with_peft_s_merged_logits(base, tmp_path):
    hf, _, base_folder = base
    folder = peft_saved(hf, tmp_path / "peft", target_modules=["q_proj", "gate_proj"], use_dora=True,
                        layers_to_transform=[0, 1, 2])
    out = tmp_path / "merged"
    result = run_cli("lora", "merge", str(base_folder), str(folder), str(out), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["out"] == str(out) and record["linears"] == 6 and record["kind"] == "dora"
    config = checkpoint.load_config(out)
    ours = reference.forward(config, checkpoint.read_weights(out, config), IDS)
    theirs = peft_loaded(hf, folder).merge_and_unload()
    assert relative_error(ours, hf_logits(theirs, IDS)) < 1e-4
    before = snapshot(out)
    assert_clean_failure(run_cli("lora", "merge", str(base_folder), str(folder), str(out)), "--overwrite")
    assert snapshot(out) == before


def test_the_export_command_converts_and_refuses_in_one_line(base, tmp_path):
    hf, weights, base_folder = base
    folder = peft_saved(hf, tmp_path / "peft", target_modules=["v_proj"], layers_to_transform=[4, 5])
    out = tmp_path / "mlx"
    assert_clean_failure(run_cli("lora", "export", str(folder), str(out), "--format", "mlx"), "--base")
    assert not out.exists()
    result = run_cli("lora", "export", str(folder), str(out), "--format", "mlx", "--base", str(base_folder))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert_same_tensors(adapters.read_mlx(out), adapters.read_peft(folder))
    back = tmp_path / "peft-back"
    result = run_cli("lora", "export", str(out), str(back), "-f", "peft", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "peft"
    assert_same_tensors(adapters.read_peft(back), adapters.read_peft(folder))
    assert_clean_failure(run_cli("lora", "export", str(base_folder), str(tmp_path / "x"), "--format", "peft"),
                         "is not an adapter", "`gemmalab lora` reads")
    assert_clean_failure(run_cli("lora", "export", str(folder), str(tmp_path / "x"), "--format", "gguf"),
                         "unknown adapter format 'gguf'")
    imported = run_cli_python("import sys, gemmalab.cli.lora; print([m for m in ('torch', 'mlx', 'jax', 'peft') "
                              "if m in sys.modules])")
    assert imported == "[]"


def run_cli_python(code: str) -> str:
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def peft_folder(base, tmp_path) -> Path:
    """A small valid PEFT folder (DoRA on q_proj) to spoil."""
    _, weights, _ = base
    settings = lora.LoraConfig(rank=4, targets=("q_proj",), layers=(0, 2), dora=True)
    return adapters.write_peft(random_adapter(settings, CONFIG, weights), tmp_path / "good-peft")


@pytest.fixture
def mlx_folder(base, tmp_path) -> Path:
    _, weights, _ = base
    settings = lora.LoraConfig(rank=4, targets=("q_proj",), layers=(4, 6))
    return adapters.write_mlx(random_adapter(settings, CONFIG, weights), tmp_path / "good-mlx", model=CONFIG)


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            values.pop(key)
        else:
            values[key] = value
    path.write_text(json.dumps(values))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def one_line(call, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
PEFT_CONFIG_SPOILS = {
    "bias": ({"bias": "all"}, "bias is 'all'"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "fan_in_fan_out is true"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 8}}, "rank_pattern gives 'q_proj' r 8"),
    "alpha_pattern": ({"alpha_pattern": {"q_proj": 3}}, "alpha_pattern gives 'q_proj' lora_alpha 3"),
    "pissa": ({"init_lora_weights": "pissa"}, "convert the adapter to plain LoRA"),
    "ia3": ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    "qalora": ({"use_qalora": True}, "use_qalora is True, a PEFT option gemmalab does not read"),
    "not-dora": ({"use_dora": False}, "has a DoRA magnitude"),
    "rank": ({"r": 8}, "which is not rank 8"),
}


@pytest.mark.parametrize("spoil", list(PEFT_CONFIG_SPOILS))
def test_peft_options_gemmalab_cannot_honour_are_one_line(peft_folder, spoil):
    changes, fragment = PEFT_CONFIG_SPOILS[spoil]
    edit_json(peft_folder / "adapter_config.json", **changes)
    one_line(lambda: adapters.read_adapter(peft_folder), fragment)


PEFT_TENSOR_SPOILS = {
    "unknown key": (lambda t: t.update({f"{Q0}.lora_B.bias": np.zeros(64, np.float32)}), "lora_B.bias is no PEFT"),
    "missing B": (lambda t: t.pop(f"{Q0}.lora_B.weight"), "has lora_A but no lora_B"),
    "missing magnitude": (lambda t: t.pop(f"{Q0}.lora_magnitude_vector"), "lacks DoRA's magnitude"),
    "embedding": (lambda t: t.update({"base_model.model.model.embed_tokens.lora_A.weight": np.zeros((4, 261),
                                                                                                   np.float32)}),
                  "no linear gemmalab adapts"),
    "vision": (lambda t: t.update({"base_model.model.model.vision_tower.x.lora_A.weight": np.zeros((4, 3),
                                                                                                  np.float32)}),
               "vision tower"),
}


@pytest.mark.parametrize("spoil", list(PEFT_TENSOR_SPOILS))
def test_peft_tensors_gemmalab_cannot_read_are_one_line(peft_folder, spoil):
    change, fragment = PEFT_TENSOR_SPOILS[spoil]
    edit_tensors(peft_folder / "adapter_model.safetensors", change)
    one_line(lambda: adapters.read_peft(peft_folder), fragment)


def test_mlx_configs_and_tensors_gemmalab_cannot_read_are_one_line(mlx_folder):
    config, weights = mlx_folder / "adapter_config.json", mlx_folder / "adapters.safetensors"
    original, tensors = config.read_text(), weights.read_bytes()
    spoils = [
        (lambda: edit_json(config, fine_tune_type="full"), "fuse them into a checkpoint"),
        (lambda: edit_json(config, lora_parameters={"rank": 4, "alpha": 8, "dropout": 0.0}), "'alpha'"),
        (lambda: edit_json(config, lora_parameters={"rank": 4, "dropout": 0.0}), "lacks 'scale'"),
        (lambda: edit_json(config, num_layers="all"), "num_layers must be an integer"),
        (lambda: edit_tensors(weights, lambda t: t.update({"model.layers.4.self_attn.q_proj.linear.weight":
                                                           np.zeros((64, 64), np.float32)})), "is no mlx-lm"),
        (lambda: edit_tensors(weights, lambda t: t.pop("model.layers.5.self_attn.q_proj.lora_a")),
         "has lora_b but no lora_a"),
    ]
    for spoil, fragment in spoils:
        spoil()
        one_line(lambda: adapters.read_adapter(mlx_folder), fragment)
        config.write_text(original)
        weights.write_bytes(tensors)
    assert adapters.read_adapter(mlx_folder).tensors  # restored: it reads again


def test_what_is_not_an_adapter_or_does_not_fit_is_one_line(base, peft_folder, tmp_path):
    _, weights, base_folder = base
    one_line(lambda: adapters.read_adapter(base_folder), "is not an adapter", "adapter_model.safetensors")
    one_line(lambda: adapters.read_adapter(tmp_path / "nothing"), "does not exist")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    one_line(lambda: adapters.read_adapter(pickled), "pickle", "safe_serialization=True")
    # shapes that are not the base's: A made for a wider model
    edit_tensors(peft_folder / "adapter_model.safetensors",
                 lambda t: t.update({f"{Q0}.lora_A.weight": np.zeros((4, 80), np.float32)}))
    misfit = adapters.read_peft(peft_folder)
    one_line(lambda: adapters.merge_checkpoint(base_folder, misfit, tmp_path / "out"),
             "does not fit", "lora_A is (4, 80)", "needs (4, 64)")
    assert not (tmp_path / "out").exists()
    one_line(lambda: adapters.write_mlx(misfit, tmp_path / "mlx", model=CONFIG), "lora_A is (4, 80)")


def test_writes_never_clobber_what_is_not_the_same_adapter(base, tmp_path):
    _, weights, base_folder = base
    adapter = random_adapter(lora.LoraConfig(rank=2, targets=("q_proj",)), CONFIG, weights)
    before = snapshot(base_folder)
    one_line(lambda: adapters.write_peft(adapter, base_folder, overwrite=True), "holds no PEFT adapter")
    assert snapshot(base_folder) == before
    folder = adapters.write_peft(adapter, tmp_path / "a")
    one_line(lambda: adapters.write_peft(adapter, folder), "already holds a PEFT adapter", "overwrite=True")
    one_line(lambda: adapters.write_mlx(adapter, folder, overwrite=True), "holds no mlx-lm adapter")
    (folder / "README.md").write_text("PEFT's model card stays")
    other = random_adapter(lora.LoraConfig(rank=2, targets=("q_proj",)), CONFIG, weights, seed=5)
    adapters.write_peft(other, folder, overwrite=True)
    assert_same_tensors(adapters.read_peft(folder), other)
    assert (folder / "README.md").read_text() == "PEFT's model card stays"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert adapters.write_mlx(adapter, empty) == empty and adapters.detect_format(empty) == "mlx"


def test_a_bfloat16_adapter_reads_as_its_exact_float32_values(base, tmp_path):
    """PEFT saves an adapter trained in bf16 as bf16, which safetensors' numpy reader cannot hold."""
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    hf, _, _ = base
    folder = peft_saved(hf, tmp_path / "peft", target_modules=["o_proj"], use_dora=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in torch_load(folder / "adapter_model.safetensors").items()}
    torch_save(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    ours = adapters.read_peft(folder)
    for key, value in tensors.items():
        linear, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        part = {"A.weight": "lora_A", "B.weight": "lora_B", "magnitude_vector": "magnitude"}[part]
        got = ours.tensors[linear][part]
        assert got.dtype == np.float32 and np.array_equal(got, value.float().numpy()), key
