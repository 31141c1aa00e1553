"""LoRA and DoRA: the settings (gemmalab.lora), the wrappers on every backend, their gradients and a LoRA run.

Oracles: PEFT on transformers' Gemma3ForCausalLM (logits and torch-autograd gradients of the same adapter,
its tensors moved across by the key names written out below, not by gemmalab's format code); the float64
numpy reference on weights merged by hand in this file (W + s B A; DoRA's m / ||W + s B A|| rows); PEFT's
Kaiming-uniform bound derived by hand. Tiny random checkpoints of 6 layers on sequences longer than the window.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
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

import gemmalab
from gemmalab import lora, reference
from gemmalab.backend import get_backend
from gemmalab.errors import ConfigError, InputError
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import TrainSpec

peft = pytest.importorskip("peft")

CONFIG = SHAPES["tiny"]
TARGETS = ("q_proj", "v_proj", "down_proj")


# -- the settings ---------------------------------------------------------------------------------------------
def test_the_lora_text_form_reads_lists_ranges_and_flags():
    settings = lora.LoraConfig.parse("rank=16,alpha=32,targets=q_proj,v_proj,layers=2:6,dropout=0.05,dora=true")
    assert settings == lora.LoraConfig(rank=16, alpha=32.0, targets=("q_proj", "v_proj"), layers=(2, 6),
                                       dropout=0.05, dora=True)
    assert settings.scale == 2.0 and settings.kind == "dora"
    assert lora.LoraConfig(rank=16, alpha=32, rslora=True).scale == 32 / 4  # alpha / sqrt(rank)
    assert lora.LoraConfig.parse(settings.describe()) == settings
    assert lora.LoraConfig.from_dict({"rank": 4, "targets": "q_proj,o_proj", "layers": [1, 3]}) == \
        lora.LoraConfig(rank=4, targets=("q_proj", "o_proj"), layers=(1, 3))
    assert settings.linears(CONFIG) == [f"model.layers.{i}.self_attn.{k}" for i in range(2, 6) for k in ("q_proj", "v_proj")]


@pytest.mark.parametrize("text, message", [
    ("rank=0", "rank must be a positive integer"),
    ("rank=4,alpha=-1", "alpha must be a positive number"),
    ("rank=4,beta=2", "unknown lora setting 'beta'"),
    ("rank=4,q_proj", "'q_proj' is not key=value"),
    ("rank=4,layers=3", "layers must be first:stop"),
    ("rank=4,dropout=1", r"dropout must be in \[0, 1\)"),
    ("rank=4,dora=maybe", "dora must be true or false"),
])
def test_bad_lora_settings_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        lora.LoraConfig.parse(text)


def test_a_layer_range_past_the_model_and_an_unknown_target_are_refused():
    with pytest.raises(ConfigError, match="reach past this model's 6 blocks"):
        lora.LoraConfig(layers=(4, 9)).linears(CONFIG)
    with pytest.raises(InputError, match="'qkv_proj' matches no linear"):
        lora.LoraConfig(targets=("qkv_proj",)).linears(CONFIG)


def test_a_starts_as_peft_starts_it_and_b_at_zero():
    # PEFT: nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5)); torch's rule: bound = gain * sqrt(3 / fan_in),
    # gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), so bound = 1 / sqrt(fan_in) with fan_in = in_features.
    bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / 64)
    a = lora.init_a("model.layers.0.self_attn.q_proj", 64, 512, seed=0)
    assert a.shape == (512, 64) and a.dtype == np.float32
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.01 * bound  # uniform: std = bound / sqrt(3)
    fresh = lora.fresh_adapter(lora.LoraConfig(rank=4), CONFIG, seed=0)
    assert all(not p["lora_B"].any() for p in fresh.tensors.values())
    again = lora.fresh_adapter(lora.LoraConfig(rank=4), CONFIG, seed=0)
    other = lora.fresh_adapter(lora.LoraConfig(rank=4), CONFIG, seed=1)
    name = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(fresh.tensors[name]["lora_A"], again.tensors[name]["lora_A"])
    assert not np.array_equal(fresh.tensors[name]["lora_A"], other.tensors[name]["lora_A"])


# -- the wrappers against PEFT ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=3)
    return hf, hf_weights(hf), save_hf(hf, tmp_path_factory.mktemp("lora-base"))


def peft_model(hf_base, *, dora: bool, rslora: bool = False, layers=None, seed: int = 0):
    """A PEFT model over a copy of the base, its B (and DoRA magnitude) set to random values."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0, use_dora=dora,
                             use_rslora=rslora, layers_to_transform=layers, init_lora_weights=True)
    return randomized_peft(hf_base, config, seed).eval()


def tensors_of(peft_model_) -> dict[str, dict[str, np.ndarray]]:
    """The adapter's tensors by linear, from PEFT's module names (base_model.model.<linear>.lora_A.default ...)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, param in peft_model_.named_parameters():
        for ours, theirs in (("lora_A", ".lora_A.default.weight"), ("lora_B", ".lora_B.default.weight"),
                             ("magnitude", ".lora_magnitude_vector.default.weight")):
            if name.endswith(theirs):
                linear = name.removeprefix("base_model.model.").removesuffix(theirs)
                out.setdefault(linear, {})[ours] = param.detach().numpy().copy()
    return out


def merged_by_hand(weights, tensors, scale, dora):
    out = dict(weights)
    for linear, parts in tensors.items():
        w = weights[linear + ".weight"].astype(np.float64)
        adapted = w + scale * parts["lora_B"].astype(np.float64) @ parts["lora_A"].astype(np.float64)
        if dora:
            adapted = (parts["magnitude"] / np.linalg.norm(adapted, axis=1))[:, None] * adapted
        out[linear + ".weight"] = adapted
    return out


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora-layers"])
def test_an_adapter_gives_peft_s_logits_and_fuses_into_the_merged_weights(backend, base, kind):
    hf, weights, folder = base
    dora, rslora, layers = kind == "dora", kind == "rslora-layers", [1, 4] if kind == "rslora-layers" else None
    theirs = peft_model(hf, dora=dora, rslora=rslora, layers=layers)
    settings = lora.LoraConfig(rank=4, alpha=8, targets=TARGETS, dora=dora, rslora=rslora,
                               layers=(1, 5) if layers else None)
    tensors = tensors_of(theirs)
    assert sorted(tensors) == sorted(settings.linears(CONFIG) if not layers else
                                     [n for n in settings.linears(CONFIG) if int(n.split(".")[2]) in layers])
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    model.add_adapter(lora.Adapter(settings, tensors))
    ids = token_ids(CONFIG)
    expected = hf_logits(theirs, ids)
    assert relative_error(model.logits(ids), expected) < 1e-4
    by_hand = merged_by_hand(weights, tensors, settings.scale, dora)
    assert relative_error(reference.forward(CONFIG, by_hand, ids), expected) < 1e-4  # the oracles agree
    dense = model.weights()
    for name in tensors:
        assert relative_error(dense[name + ".weight"], by_hand[name + ".weight"]) < 1e-6
    back = model.adapter()
    assert back.config == settings
    for name, parts in tensors.items():
        for part, value in parts.items():
            assert np.array_equal(back.tensors[name][part], value)
    assert model.fuse() == list(tensors) and model.lora is None
    assert relative_error(model.logits(ids), expected) < 1e-4


def test_a_second_adapter_and_a_misfit_adapter_are_refused(backend, base):
    hf, weights, folder = base
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    settings = lora.LoraConfig(rank=4, targets=("q_proj",))
    adapter = lora.fresh_adapter(settings, CONFIG, seed=0)
    name = "model.layers.0.self_attn.q_proj"
    wrong = lora.Adapter(settings, {**adapter.tensors, name: {"lora_A": np.zeros((4, 63), np.float32),
                                                            "lora_B": np.zeros((64, 4), np.float32)}})
    with pytest.raises(InputError, match=r"q_proj.lora_A is \(4, 63\), but this model .* needs \(4, 64\)"):
        model.add_adapter(wrong)
    assert model.lora is None and not model.parameter_shapes().get(name + ".lora_A")  # nothing was wrapped
    model.add_adapter(adapter)
    with pytest.raises(InputError, match="already has an adapter"):
        model.add_adapter(adapter)
    with pytest.raises(InputError, match="Model.add_adapter"):
        model.wrap("lora", ["k_proj"])


# -- gradients against torch autograd through PEFT -------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_adapter_gradients_equal_peft_s_and_the_base_gets_none(backend, base, dora):
    hf, weights, folder = base
    theirs = peft_model(hf, dora=dora, seed=5)
    settings = lora.LoraConfig(rank=4, alpha=8, targets=TARGETS, dora=dora)
    tensors = tensors_of(theirs)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 21))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss_weights = np.ones(inputs.shape, np.float32)

    # PEFT: the summed cross-entropy, by torch autograd (the DoRA norm detached, as PEFT does)
    theirs.train()
    logits = theirs(torch.as_tensor(inputs)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.as_tensor(targets).reshape(-1), reduction="sum")
    loss.backward()
    expected = {}
    for name, param in theirs.named_parameters():
        for ours, suffix in (("lora_A", ".lora_A.default.weight"), ("lora_B", ".lora_B.default.weight"),
                             ("magnitude", ".lora_magnitude_vector.default.weight")):
            if name.endswith(suffix):
                expected[name.removeprefix("base_model.model.").removesuffix(suffix) + "." + ours] = param.grad.numpy()

    b = get_backend(backend)
    native = b.build(CONFIG, weights, dtype="float32")
    names = lora.wrap_adapter(b, native, CONFIG, lora.Adapter(settings, tensors))
    trainer = b.trainer(native, TrainSpec(loss=LossSpec(head=(CrossEntropy(),))))
    scales = dict.fromkeys(b.parameter_shapes(native), 0.0)
    scales.update(dict.fromkeys(lora.adapter_parameter_names(settings, names), 1.0))
    trainer.set_lr_scales(scales)
    total = trainer.accumulate(inputs, targets, loss_weights)
    assert abs(total - float(loss.detach())) < 1e-4 * abs(float(loss.detach()))
    grads = trainer.gradients()
    assert sorted(grads) == sorted(expected)  # the adapter's parameters only: the frozen base has no gradient
    for name, value in expected.items():
        assert relative_error(grads[name], value) < 1e-4, name


def test_jax_refuses_adapter_dropout_in_training(base):
    if "jax" not in gemmalab.backends():
        pytest.skip("jax is not installed")
    hf, weights, folder = base
    b = get_backend("jax")
    native = b.build(CONFIG, weights, dtype="float32")
    lora.wrap_adapter(b, native, CONFIG, lora.fresh_adapter(lora.LoraConfig(rank=2, dropout=0.1), CONFIG, 0))
    with pytest.raises(InputError, match="adapter dropout is not implemented on the JAX backend"):
        b.trainer(native, TrainSpec(loss=LossSpec(head=(CrossEntropy(),))))


@pytest.mark.parametrize("backend_name", [b for b in ("torch", "mlx") if b in gemmalab.backends()])
def test_dropout_acts_in_training_steps_only(base, backend_name):
    """With dropout 0.5, two training passes on the same batch differ, while logits (inference) stay the
    undropped adapter's (equal to PEFT's in eval mode)."""
    hf, weights, folder = base
    theirs = peft_model(hf, dora=False, seed=2)
    settings = lora.LoraConfig(rank=4, alpha=8, targets=TARGETS, dropout=0.5)
    model = gemmalab.load(folder, backend=backend_name, dtype="float32")
    model.add_adapter(lora.Adapter(settings, tensors_of(theirs)))
    ids = token_ids(CONFIG)
    assert relative_error(model.logits(ids), hf_logits(theirs, ids)) < 1e-4
    b = get_backend(backend_name)
    trainer = b.trainer(model.native, TrainSpec(loss=LossSpec(head=(CrossEntropy(),))))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    first = trainer.accumulate(inputs, targets, np.ones(inputs.shape, np.float32))
    second = trainer.accumulate(inputs, targets, np.ones(inputs.shape, np.float32))
    assert first != second
    assert relative_error(model.logits(ids), hf_logits(theirs, ids)) < 1e-4


# -- a LoRA run: the adapter alone is trained, saved and resumed ------------------------------------------------
@pytest.fixture(scope="module")
def trainable_base(tmp_path_factory):
    """A base checkpoint with the byte-level tokenizer (what `gemmalab train --model` needs)."""
    folder = tmp_path_factory.mktemp("lora-trainable") / "base"
    gemmalab.init("tiny", backend="torch", seed=1).save(folder)
    return folder


def lora_run(base_folder, out, backend, steps, **extra):
    from gemmalab.train import TrainConfig, train

    config = TrainConfig.from_dict({"model": str(base_folder), "lora": "rank=4,alpha=8,targets=q_proj,v_proj,o_proj",
                                    "backend": backend, "steps": steps, "batch_size": 2, "seq_len": 24, "lr": 1e-2,
                                    "warmup_steps": 0, "out": str(out), "checkpoint_every": 2, "keep_checkpoints": 0,
                                    "eval_batches": 1, "tensorboard": False, "aim": False, **extra})
    return train(config, progress=False, echo=lambda _: None)


def test_a_lora_run_saves_the_adapter_alone_which_peft_loads_and_resumes_exactly(backend, trainable_base, tmp_path):
    from safetensors.numpy import load_file

    from gemmalab.train.checkpoints import OPTIMIZER_FILE

    result = lora_run(trainable_base, tmp_path / "run", backend, steps=4)
    final = result.checkpoint
    assert not list(final.glob("model*.safetensors")) and (final / "adapter_config.json").is_file()
    state = load_file(str(final / OPTIMIZER_FILE))
    assert state and all(".lora_A" in k or ".lora_B" in k for k in state)  # the base has no optimizer state

    # PEFT reads the run's checkpoint over transformers' copy of the base: the logits gemmalab gives
    hf = transformers_model(trainable_base)
    theirs = peft.PeftModel.from_pretrained(hf, str(final)).eval()
    ids = token_ids(CONFIG)
    ours = gemmalab.load(trainable_base, backend=backend, dtype="float32")
    from gemmalab.adapters import read_adapter

    ours.add_adapter(read_adapter(final))
    trained = hf_logits(theirs, ids)
    assert relative_error(ours.logits(ids), trained) < 1e-4
    assert relative_error(hf_logits(transformers_model(trainable_base), ids), trained) > 1e-3  # it did train

    # killed after step 2: resuming gives the straight run's adapter
    import shutil

    shutil.rmtree(final)
    resumed = lora_run(trainable_base, tmp_path / "run", backend, steps=4, resume=True)
    again = load_file(str(resumed.checkpoint / "adapter_model.safetensors"))
    fresh = lora_run(trainable_base, tmp_path / "straight", backend, steps=4)
    straight = load_file(str(fresh.checkpoint / "adapter_model.safetensors"))
    assert sorted(again) == sorted(straight)
    for key, value in straight.items():
        assert np.allclose(again[key], value, rtol=1e-5, atol=1e-7), key


def transformers_model(folder):
    import transformers

    return transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_lora_needs_a_trained_model_and_resume_keeps_its_settings(trainable_base, tmp_path):
    from gemmalab.errors import CheckpointError, TrainingError
    from gemmalab.train import TrainConfig

    with pytest.raises(ConfigError, match="lora adapts a trained model: give --model"):
        TrainConfig.from_dict({"lora": "rank=4"})
    lora_run(trainable_base, tmp_path / "run", "torch" if "torch" in gemmalab.backends() else None, steps=2)
    with pytest.raises((TrainingError, CheckpointError), match="--resume cannot change lora"):
        lora_run(trainable_base, tmp_path / "run", None, steps=2, resume=True,
                 lora="rank=8,alpha=8,targets=q_proj,v_proj,o_proj")


def test_load_and_generate_take_an_adapter(backend, trainable_base, tmp_path):
    import json

    from cli_helpers import assert_clean_failure, run_cli

    final = lora_run(trainable_base, tmp_path / "run", backend, steps=2).checkpoint
    hf = transformers_model(trainable_base)
    theirs = peft.PeftModel.from_pretrained(hf, str(final)).eval()
    model = gemmalab.load(trainable_base, backend=backend, dtype="float32", adapter=final)
    assert model.lora is not None and model.lora.rank == 4
    ids = token_ids(CONFIG)
    assert relative_error(model.logits(ids), hf_logits(theirs, ids)) < 1e-4

    # greedy tokens by hand from PEFT's logits, then through `gemmalab generate --adapter`
    prompt = [5, 17, 33]
    chain = list(prompt)
    for _ in range(6):
        chain.append(int(hf_logits(theirs, np.array([chain]))[0, -1].argmax()))
    shown = run_cli("generate", str(trainable_base), "--adapter", str(final), "--prompt-ids", "5,17,33", "-n", "6",
                    "--json", "-b", backend)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["tokens"] == chain[3:]
    assert_clean_failure(run_cli("generate", "tiny", "--adapter", str(final), "--prompt-ids", "5", "-b", backend),
                         "an adapter adapts a trained model")


def test_distillation_trains_a_lora_student(backend, trainable_base, tmp_path):
    from gemmalab.distill import DistillConfig, distill

    teacher = tmp_path / "teacher"
    gemmalab.init("tiny", backend="torch", seed=2).save(teacher)
    config = DistillConfig.from_dict({"teacher": str(teacher), "model": str(trainable_base), "lora": "rank=2,alpha=4",
                                      "backend": backend, "steps": 2, "batch_size": 2, "seq_len": 24,
                                      "warmup_steps": 0, "lr": 1e-2, "eval_batches": 1, "out": str(tmp_path / "run"),
                                      "tensorboard": False, "aim": False})
    result = distill(config, progress=False, echo=lambda _: None)
    final = result.train.checkpoint
    assert (final / "adapter_config.json").is_file() and not list(final.glob("model*.safetensors"))
    model = gemmalab.load(trainable_base, backend=backend, dtype="float32", adapter=final)
    assert model.adapted == tuple(lora.LoraConfig(rank=2).linears(CONFIG))
    with pytest.raises(ConfigError, match="lora adapts a trained model: give --student"):
        DistillConfig.from_dict({"teacher": str(teacher), "lora": "rank=2"})


# -- QLoRA: the adapter over a quantized frozen base ------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_gives_peft_s_logits_and_gradients_over_the_dequantized_base(backend, base, bits):
    """The oracle: PEFT's LoRA over a transformers model whose block linears hold the dequantized numbers
    (gemmalab.quantize, itself equal to mx.quantize: tests/test_quantize.py)."""
    from gemmalab.quantize import dequantize, quantize
    from gemmalab.train.adapter_run import quantize_base

    hf, weights, folder = base
    group = 32
    dequantized = dict(weights)
    for name in lora.LoraConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj")).linears(CONFIG):
        dequantized[name + ".weight"] = dequantize(*quantize(weights[name + ".weight"], bits, group), bits, group)
    import copy

    dense = copy.deepcopy(hf)
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if name in dequantized:
                param.copy_(torch.from_numpy(dequantized[name]))
    theirs = peft_model(dense, dora=False, seed=7)
    settings = lora.LoraConfig(rank=4, alpha=8, targets=TARGETS)
    tensors = tensors_of(theirs)

    b = get_backend(backend)
    native = b.build(CONFIG, weights, dtype="float32")
    quantize_base(b, native, CONFIG, bits, group)
    names = lora.wrap_adapter(b, native, CONFIG, lora.Adapter(settings, tensors))
    ids = token_ids(CONFIG)
    assert relative_error(b.logits(native, ids), hf_logits(theirs, ids)) < 1e-4

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    theirs.train()
    logits = theirs(torch.as_tensor(inputs)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1),
                                      reduction="sum").backward()
    expected = {name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_A")
                .replace(".lora_B.default.weight", ".lora_B"): p.grad.numpy()
                for name, p in theirs.named_parameters() if p.grad is not None}
    trainer = b.trainer(native, TrainSpec(loss=LossSpec(head=(CrossEntropy(),))))
    scales = dict.fromkeys(b.parameter_shapes(native), 0.0)
    scales.update(dict.fromkeys(lora.adapter_parameter_names(settings, names), 1.0))
    trainer.set_lr_scales(scales)
    trainer.accumulate(inputs, targets, np.ones(inputs.shape, np.float32))
    grads = trainer.gradients()
    assert sorted(grads) == sorted(expected)
    for name, value in expected.items():
        assert relative_error(grads[name], value) < 1e-4, name


def test_a_qlora_run_trains_and_resumes_exactly(backend, trainable_base, tmp_path):
    import shutil

    from safetensors.numpy import load_file

    quantized = {"quantize": "q4", "quantize_group_size": 32}
    result = lora_run(trainable_base, tmp_path / "run", backend, steps=4, **quantized)
    straight = load_file(str(result.checkpoint / "adapter_model.safetensors"))
    assert any(np.abs(v).max() > 0 for k, v in straight.items() if "lora_B" in k)  # it trained
    shutil.rmtree(result.checkpoint)
    resumed = lora_run(trainable_base, tmp_path / "run", backend, steps=4, resume=True, **quantized)
    again = load_file(str(resumed.checkpoint / "adapter_model.safetensors"))
    for key, value in straight.items():
        assert np.allclose(again[key], value, rtol=1e-5, atol=1e-7), key
    with pytest.raises(ConfigError, match="quantize freezes the model: train an adapter over it with --lora"):
        from gemmalab.train import TrainConfig

        TrainConfig.from_dict({"model": str(trainable_base), "quantize": "q4"})


def test_a_trained_adapter_exported_for_mlx_lm_gives_gemmalab_s_logits_there(trainable_base, tmp_path):
    """The run's checkpoint -> `gemmalab lora export --format mlx` -> mlx_lm.load(base, adapter_path=...): the
    logits gemmalab-mlx gives with the same adapter (mlx-lm is the peer; the base was written by gemmalab, whose
    config.json mlx-lm reads right)."""
    if "mlx" not in gemmalab.backends():
        pytest.skip("mlx is not installed")
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from cli_helpers import run_cli

    final = lora_run(trainable_base, tmp_path / "run", "torch" if "torch" in gemmalab.backends() else "mlx",
                     steps=2).checkpoint
    exported = tmp_path / "mlx-adapter"
    shown = run_cli("lora", "export", str(final), str(exported), "--format", "mlx", "--base", str(trainable_base))
    assert shown.returncode == 0, shown.stderr
    theirs, _ = mlx_lm.load(str(trainable_base), adapter_path=str(exported))
    ids = token_ids(CONFIG)
    peer = np.array(theirs(mx.array(ids)).astype(mx.float32))
    ours = gemmalab.load(trainable_base, backend="mlx", dtype="float32", adapter=final).logits(ids)
    assert relative_error(ours, peer) < 1e-4
    assert relative_error(gemmalab.load(trainable_base, backend="mlx", dtype="float32").logits(ids), peer) > 1e-3


def test_an_adapter_on_a_quantized_checkpoint_stacks_on_its_quantized_linears(backend, trainable_base, tmp_path):
    """QLoRA inference: gemmalab.load(Q4_FOLDER, adapter=...) wraps each quantized linear (the file's codes) with
    the adapter. Oracle: the numpy reference on the original weights quantized and dequantized by hand (the
    numpy quantizer, equal to mx.quantize), then merged by hand with the adapter."""
    from cli_helpers import run_cli

    from gemmalab.adapters import read_adapter
    from gemmalab.quantize import dequantize, quantize

    final = lora_run(trainable_base, tmp_path / "run", backend, steps=2).checkpoint
    quantized = tmp_path / "q4"
    shown = run_cli("convert", str(trainable_base), str(quantized), "--dtype", "float32", "--quantize", "q4",
                    "--group-size", "32")
    assert shown.returncode == 0, shown.stderr
    model = gemmalab.load(quantized, backend=backend, dtype="float32", adapter=final)
    assert model.lora is not None
    original = gemmalab.load(trainable_base, backend="torch" if "torch" in gemmalab.backends() else backend,
                             dtype="float32").weights()
    by_hand = {name: (dequantize(*quantize(value, 4, 32), 4, 32) if name.endswith("_proj.weight") or
                      name == "model.embed_tokens.weight" else value) for name, value in original.items()}
    adapter = read_adapter(final)
    by_hand = merged_by_hand(by_hand, adapter.tensors, adapter.config.scale, dora=False)
    ids = token_ids(CONFIG)
    assert relative_error(model.logits(ids), reference.forward(CONFIG, by_hand, ids)) < 1e-4
