"""Quantized checkpoints in mlx-lm's format: written by ``gemmalab convert --quantize``, read by gemmalab.load on
every backend (each quantized linear the backend's ``quantized`` wrapper holding the file's numbers), and by
mlx-lm.

Oracles: mlx-lm itself (its ``convert -q`` of the same source writes the same bytes; ``mlx_lm.load`` of our files
gives gemmalab-mlx's logits; its own quantized output, per-module overrides included, loads in gemmalab with
its logits and greedy tokens), and the float64 numpy reference on the weights dequantized from the files
(gemmalab.quantize.dequantize, equal to mx.dequantize: tests/test_quantize.py), reading bits and group size
from the tensors' shapes as mlx-lm's loader does. A tiny random 6-layer checkpoint written by gemmalab (float32,
with a byte-level tokenizer so mlx-lm loads it), on sequences 2.5 sliding windows long.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot
from conftest import BACKENDS, SHAPES, hf_weights, make_hf_model, relative_error, token_ids
from safetensors.numpy import load_file, save_file

import gemmalab
from gemmalab import checkpoint, reference
from gemmalab import linears as core
from gemmalab.backend import get_backend
from gemmalab.errors import CheckpointError
from gemmalab.params import parameter_shapes
from gemmalab.quantize import dequantize, quantize
from gemmalab.tokenizer import Tokenizer

CONFIG = SHAPES["tiny"]  # 6 layers (LLLLLG), window 8, hidden 64: sqrt(64) is exact in bf16, as mlx-lm rounds it
UNTIED = SHAPES["untied-softcap"]
SETTINGS = {"q4": (4, 32), "q8": (8, 64)}
BF16 = np.dtype(ml_dtypes.bfloat16)


def needs_mlx_lm():
    pytest.importorskip("mlx.core")
    return pytest.importorskip("mlx_lm")


def write_source(folder: Path, config, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    weights = hf_weights(make_hf_model(config, seed=seed))
    checkpoint.save_checkpoint(folder, config.with_dtype("float32"), weights)
    Tokenizer.byte_level().save(folder)  # mlx_lm.load and mlx_lm.convert read a tokenizer
    return folder, weights


def convert(source: Path, out: Path, *options: str) -> Path:
    result = run_cli("convert", str(source), str(out), *options)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, float32 weights) of the tiny checkpoint every conversion starts from."""
    return write_source(tmp_path_factory.mktemp("source"), CONFIG, seed=5)


@pytest.fixture(scope="module")
def ours(source, tmp_path_factory):
    """q4 / q8 -> our float32 conversion (``gemmalab convert --quantize``, through the CLI)."""
    root = tmp_path_factory.mktemp("ours")
    return {name: convert(source[0], root / name, "--dtype", "float32", "--quantize", name, "--group-size", str(group))
            for name, (_, group) in SETTINGS.items()}


@pytest.fixture(scope="module")
def theirs(source, tmp_path_factory):
    """q4 / q8 / mixed -> mlx-lm's own float32 conversion of the same source (``mlx_lm.convert -q``); mixed
    has per-module entries in its config (down_proj in 8 bits, groups of 64; the rest 4 bits, groups of 32)."""
    needs_mlx_lm()
    from mlx_lm.convert import convert as mlx_convert

    root = tmp_path_factory.mktemp("theirs")
    out = {}
    for name, (bits, group) in SETTINGS.items():
        out[name] = root / name
        mlx_convert(str(source[0]), str(out[name]), quantize=True, q_bits=bits, q_group_size=group, dtype="float32")

    def mixed(path, module):
        return {"group_size": 64, "bits": 8, "mode": "affine"} if "down_proj" in path else True

    out["mixed"] = root / "mixed"
    mlx_convert(str(source[0]), str(out["mixed"]), quantize=True, q_bits=4, q_group_size=32, dtype="float32",
                quant_predicate=mixed)
    return out


def file_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def dequantized(folder: Path, config) -> dict[str, np.ndarray]:
    """The dense float32 weights a quantized folder stands for: bits and group size read from the tensors'
    shapes (mlx_lm.utils.infer_quant_config's rule), each module dequantized with the core's dequantize."""
    tensors, shapes = file_tensors(folder), parameter_shapes(config)
    out = {}
    for name, shape in shapes.items():
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in tensors:
            packed, scales = tensors[name], tensors[f"{stem}.scales"]
            group, bits = shape[1] // scales.shape[1], packed.shape[1] * 32 // shape[1]
            out[name] = dequantize(packed, scales, tensors[f"{stem}.biases"], bits, group).astype(np.float32)
        else:
            out[name] = tensors[name].astype(np.float32)
    return out


def walker(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.linears")


def quantized_class(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.quantized").QuantizedLinear


def numbers(backend: str, wrapped) -> tuple[np.ndarray, ...]:
    """(packed uint32, scales, biases) a float32 wrapper holds, in MLX's layout."""
    if backend == "torch":
        return wrapped.quantized()
    return tuple(np.asarray(a) for a in (wrapped.weight, wrapped.scales, wrapped.biases))


def assert_holds_the_file_s_numbers(backend: str, model, folder: Path, names: list[str]) -> None:
    """Exactly ``names`` are wrapped, each a QuantizedLinear holding the file's packed codes, scales, biases."""
    tensors = file_tensors(folder)
    wrapped = walker(backend).wrappers(model.native)
    assert list(wrapped) == names
    for name, layer in wrapped.items():
        assert isinstance(layer, quantized_class(backend)), name
        held = numbers(backend, layer)
        for part, value in zip(("weight", "scales", "biases"), held, strict=True):
            assert value.dtype == tensors[f"{name}.{part}"].dtype, (name, part)
            np.testing.assert_array_equal(value, tensors[f"{name}.{part}"], err_msg=f"{name}.{part}")


def mlx_lm_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    needs_mlx_lm()
    import mlx.core as mx
    import mlx_lm

    peer, _ = mlx_lm.load(str(folder))
    return np.array(peer(mx.array(ids)).astype(mx.float32))


# --- writing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_our_files_hold_the_core_quantizer_s_numbers_in_mlx_lm_s_layout(source, ours, name):
    folder, weights = source
    bits, group = SETTINGS[name]
    tensors = file_tensors(ours[name])
    quantized = checkpoint.quantizable(CONFIG)  # every block linear and the (tied) embedding, as mlx-lm does
    assert quantized[0] == "model.embed_tokens.weight" and len(quantized) == 1 + 7 * CONFIG.num_hidden_layers
    expected_keys = set(weights) | {n.removesuffix(".weight") + part for n in quantized for part in (".scales", ".biases")}
    assert set(tensors) == expected_keys
    for weight in quantized:
        stem = weight.removesuffix(".weight")
        for part, value in zip((".weight", ".scales", ".biases"), quantize(weights[weight], bits, group), strict=True):
            assert tensors[stem + part].dtype == value.dtype, stem + part  # uint32, float32, float32
            np.testing.assert_array_equal(tensors[stem + part], value, err_msg=stem + part)
    for weight in set(weights) - set(quantized):  # the norms: as they were
        np.testing.assert_array_equal(tensors[weight], weights[weight])
    config = json.loads((ours[name] / "config.json").read_text())
    entry = {"group_size": group, "bits": bits, "mode": "affine"}
    assert config["quantization"] == entry and config["quantization_config"] == entry
    assert (ours[name] / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_our_files_are_the_bytes_mlx_lm_s_convert_writes(ours, theirs, name):
    mine, peer = file_tensors(ours[name]), file_tensors(theirs[name])
    assert sorted(mine) == sorted(peer)
    for key, value in peer.items():
        assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
        assert mine[key].tobytes() == value.tobytes(), key
    ours_config, their_config = (json.loads((f / "config.json").read_text()) for f in (ours[name], theirs[name]))
    for key in ("quantization", "quantization_config"):
        assert ours_config[key] == their_config[key]


# --- mlx-lm reads ours -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_mlx_lm_loads_ours_with_gemmalab_mlx_s_logits(ours, name):
    if "mlx" not in BACKENDS:
        pytest.skip("needs the mlx backend")
    ids = token_ids(CONFIG)
    peer = mlx_lm_logits(ours[name], ids)
    mine = gemmalab.load(ours[name], backend="mlx", dtype="float32", device="cpu").logits(ids)
    assert relative_error(peer, mine) < 1e-4
    assert relative_error(peer, reference.forward(CONFIG, dequantized(ours[name], CONFIG), ids)) < 1e-4


# --- gemmalab reads ours, on every backend ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_gemmalab_loads_ours_on_every_backend_with_the_file_s_numbers(backend, ours, name, tmp_path):
    folder = ours[name]
    ids = token_ids(CONFIG)
    dense = dequantized(folder, CONFIG)
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    assert_holds_the_file_s_numbers(backend, model, folder, core.select(CONFIG))  # every block linear

    logits = model.logits(ids)
    assert relative_error(logits, reference.forward(CONFIG, dense, ids)) < 1e-4
    api = get_backend(backend)
    cache = api.new_cache(model.native, batch=ids.shape[0])  # the cached path (the jitted step on JAX) too
    assert relative_error(api.extend(model.native, cache, ids, logits="all"), logits) < 1e-5

    weights = model.weights()  # dense: the embedding dequantized at load, the linears fused
    assert set(weights) == set(dense)
    for key, value in dense.items():
        np.testing.assert_array_equal(weights[key], value, err_msg=key)
    saved = model.save(tmp_path / "dense")  # an ordinary dense checkpoint
    assert "quantization" not in json.loads((saved / "config.json").read_text())
    on_disk = checkpoint.read_weights(saved, CONFIG)
    for key, value in dense.items():
        np.testing.assert_array_equal(on_disk[key], value, err_msg=key)


def test_gemmalab_greedy_tokens_on_ours_follow_the_reference(backend, ours):
    folder = ours["q4"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    dense = dequantized(folder, CONFIG)
    prompt = [int(i) for i in token_ids(CONFIG)[0, :19]]  # longer than 2 windows of 8
    chain = list(prompt)
    for _ in range(5):
        chain.append(int(np.argmax(reference.forward(CONFIG, dense, np.array([chain]))[0, -1])))
    assert list(model.generate(prompt, max_tokens=5, stop=[]).tokens) == chain[len(prompt):]


def test_an_untied_head_is_quantized_and_loads_wrapped(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    folder, _ = write_source(root / "source", UNTIED, seed=9)
    out = convert(folder, root / "q8", "--dtype", "float32", "--quantize", "q8")  # groups of 64 by default
    tensors = file_tensors(out)
    assert tensors["lm_head.weight"].dtype == np.uint32 and tensors["lm_head.scales"].shape == (UNTIED.vocab_size, 1)
    assert tensors["model.embed_tokens.weight"].dtype == np.uint32  # mlx-lm quantizes the embedding too
    model = gemmalab.load(out, backend=backend, dtype="float32", device="cpu")
    assert_holds_the_file_s_numbers(backend, model, out, core.select(UNTIED))  # the blocks' linears and lm_head
    ids = token_ids(UNTIED)
    assert relative_error(model.logits(ids), reference.forward(UNTIED, dequantized(out, UNTIED), ids)) < 1e-4


def test_a_bfloat16_conversion_keeps_bfloat16_scales_and_dequantizes_exactly(backend, source, tmp_path_factory):
    folder, weights = source
    out = convert(folder, tmp_path_factory.mktemp("bf16") / "q4", "--quantize", "q4", "--group-size", "32")  # bf16
    model = gemmalab.load(out, backend=backend, device="cpu")  # the stored dtype: bfloat16
    assert model.dtype == "bfloat16"
    bf16 = {key: value.astype(BF16) for key, value in weights.items()}
    for weight in checkpoint.quantizable(CONFIG):  # bf16 scales and biases, dequantized with bf16's roundings
        bf16[weight] = dequantize(*quantize(bf16[weight], 4, 32), 4, 32)
    dense = model.weights()
    for key, value in bf16.items():
        assert dense[key].dtype == BF16, key
        np.testing.assert_array_equal(dense[key], value, err_msg=key)
    # bf16 activations throughout: held to twice the error of the dense bf16 model on the same weights (the
    # quantized kernels round in other places: 1.5x here on MLX and PyTorch, measured; 2e-2 for the dense one)
    ids = token_ids(CONFIG)
    expected = reference.forward(CONFIG, {k: v.astype(np.float32) for k, v in bf16.items()}, ids)
    plain = get_backend(backend).build(CONFIG, bf16, dtype="bfloat16", device="cpu")
    bound = relative_error(get_backend(backend).logits(plain, ids), expected)
    assert relative_error(model.logits(ids), expected) < 2 * bound


# --- gemmalab reads mlx-lm's own output, on every backend -------------------------------------------------
@pytest.fixture(scope="module")
def peer_outputs(theirs):
    """name -> (mlx-lm's logits on the test ids, its 5 greedy tokens after a 19-token prompt)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    ids = token_ids(CONFIG)
    prompt = [int(i) for i in ids[0, :19]]
    out = {}
    for name, folder in theirs.items():
        peer, _ = mlx_lm.load(str(folder))
        logits = np.array(peer(mx.array(ids)).astype(mx.float32))
        tokens = [int(token) for token, _ in generate_step(mx.array(prompt), peer, max_tokens=5)]
        out[name] = (logits, tokens)
    return out


@pytest.mark.parametrize("name", ["q4", "q8", "mixed"])
def test_mlx_lm_s_own_quantized_output_loads_on_every_backend(backend, theirs, peer_outputs, name):
    folder = theirs[name]
    logits, tokens = peer_outputs[name]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    assert_holds_the_file_s_numbers(backend, model, folder, core.select(CONFIG))
    if name == "mixed":  # mlx-lm's per-module entries: down_proj in 8 bits, groups of 64
        held = walker(backend).wrappers(model.native)
        assert {(n.rpartition(".")[2], w.bits, w.group_size) for n, w in held.items()} == {
            *((kind, 4, 32) for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
            ("down_proj", 8, 64),
        }
    ids = token_ids(CONFIG)
    assert relative_error(model.logits(ids), logits) < 1e-4
    assert relative_error(reference.forward(CONFIG, dequantized(folder, CONFIG), ids), logits) < 1e-4
    prompt = [int(i) for i in ids[0, :19]]
    assert list(model.generate(prompt, max_tokens=5, stop=[]).tokens) == tokens


# --- bad input: one line, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize("options, fragments", [
    (["--quantize", "q3"], ["--quantize must be q4 or q8, got 'q3'"]),
    (["--quantize", "q4", "--group-size", "48"], ["--group-size must be 32, 64 or 128, got 48"]),
    (["--quantize", "q8", "--group-size", "128"],
     ["cannot quantize in groups of 128", "model.embed_tokens.weight [261, 64]", "use group size 32 or 64"]),
    (["--group-size", "32"], ["--group-size", "with --quantize q4 or q8"]),
])
def test_bad_quantize_options_are_one_line_and_write_nothing(source, tmp_path, options, fragments):
    before = snapshot(source[0])
    result = run_cli("convert", str(source[0]), str(tmp_path / "out"), *options)
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists() and snapshot(source[0]) == before


@pytest.mark.parametrize("options", [[], ["--quantize", "q4"]])
def test_converting_a_quantized_source_is_one_line_and_writes_nothing(ours, tmp_path, options):
    result = run_cli("convert", str(ours["q4"]), str(tmp_path / "out"), *options)
    assert_clean_failure(result, "is already quantized", "4-bit, groups of 32", "convert the dense one")
    assert not (tmp_path / "out").exists()


# --- the strict reader -------------------------------------------------------------------------------------
def damaged(folder: Path, target: Path, tensors=None, config=None) -> Path:
    """A copy of ``folder`` with its tensors and config.json passed through the given edits."""
    shutil.copytree(folder, target)
    if tensors is not None:
        (file,) = target.glob("*.safetensors")
        save_file(tensors(load_file(file)), file, metadata={"format": "pt"})
    if config is not None:
        path = target / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    return target


def _edit(**changes):
    def apply(values: dict) -> dict:
        out = dict(values)
        for key, value in changes.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out
    return apply


DOWN = "model.layers.0.mlp.down_proj"
DAMAGE = {
    "no biases": (dict(tensors=_edit(**{f"{DOWN}.biases": None})), f"has no {DOWN}.biases beside it"),
    "scales shape": (dict(tensors=lambda t: {**t, f"{DOWN}.scales": t[f"{DOWN}.scales"][:, :2]}),
                     f"tensor {DOWN}.scales in model.safetensors is F32 [64, 2]"),
    "scales dtype": (dict(tensors=lambda t: {**t, f"{DOWN}.scales": t[f"{DOWN}.scales"].astype(np.float16)}),
                     "sharing one dtype"),
    "packed dtype": (dict(tensors=lambda t: {**t, f"{DOWN}.weight": t[f"{DOWN}.weight"].view(np.int32)}),
                     f"tensor {DOWN}.weight in model.safetensors is I32 [64, 16]"),
    "norm scales": (dict(tensors=lambda t: {**t, "model.norm.scales": t["model.norm.weight"][:2],
                                            "model.norm.biases": t["model.norm.weight"][:2]}),
                    "quantizes model.norm.weight, which is not a linear or the embedding"),
    "no entry": (dict(config=_edit(quantization=None, quantization_config=None)), 'has no "quantization" entry'),
    "group size": (dict(config=_edit(quantization={"group_size": 64, "bits": 4})),
                   "-bit groups of 64 of a"),
    "bits": (dict(config=_edit(quantization={"group_size": 32, "bits": 3, "mode": "affine"})),
             "quantization bits must be 4 or 8, got 3"),
    "mode": (dict(config=_edit(quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"})), "has mode 'mxfp4'"),
    "other method": (dict(config=_edit(quantization=None, quantization_config={"quant_method": "awq", "bits": 4})),
                     "quantized with 'awq', which gemmalab does not read"),
    "module left dense": (dict(config=_edit(quantization={"group_size": 32, "bits": 4, DOWN: False})),
                          f"says {DOWN} is not quantized"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_the_reader_checks_names_shapes_dtypes_and_the_entry_in_one_line(ours, tmp_path, case):
    edits, fragment = DAMAGE[case]
    folder = damaged(ours["q4"], tmp_path / "bad", **edits)
    with pytest.raises(CheckpointError) as info:
        gemmalab.load(folder, dtype="float32")  # the checkpoint is read and checked before a backend is chosen
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_dense_only_readers_refuse_a_quantized_checkpoint_in_one_line(ours):
    with pytest.raises(CheckpointError) as info:
        checkpoint.read_weights(ours["q4"], CONFIG)  # what convert's source, training and streaming read
    message = str(info.value)
    assert "is quantized (4-bit, groups of 32 (mlx-lm's format): 42 linears and the embedding)" in message
    assert "gemmalab.load reads it" in message and "\n" not in message
    weights = checkpoint.read_weights(ours["q4"], CONFIG, quantized=True)
    assert "model.embed_tokens.weight" in weights and "model.layers.0.mlp.down_proj.weight" not in weights
    assert list(weights.quantized) == core.select(CONFIG)
    assert weights.quantization() == {"bits": 4, "group_size": 32, "mode": "affine", "linears": 42, "embedding": True}


def test_info_shows_a_quantized_checkpoint(ours, theirs):
    result = run_cli("info", str(ours["q4"]), "--json")
    assert result.returncode == 0, result.stderr
    weights = json.loads(result.stdout)["weights"]
    assert weights["ok"] is True and weights["dtypes"] == ["float32", "uint32"]
    assert weights["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine", "linears": 42, "embedding": True}
    text = run_cli("info", str(theirs["mixed"]))
    assert text.returncode == 0, text.stderr
    assert "4/8-bit, groups of 32/64 (mlx-lm's format): 42 linears and the embedding" in text.stdout
    assert "names and shapes match config.json" in text.stdout

