"""Blockwise affine int4 / int8 quantization: the core's numpy quantizer (gemmalab.quantize) and each
backend's QuantizedLinear (gemmalab_<backend>.quantized).

Oracles: ``mx.quantize`` / ``mx.dequantize`` (bit for bit, on random and adversarial groups at every bits x
group size, float32, bfloat16 and float16); the float64 numpy reference run on the dequantized weights (the
quantized model's logits, cached path and greedy tokens); the numpy dequantization (``fuse`` and weights(),
exactly). Tiny random HF checkpoints of 6 layers, on sequences 2.5 sliding windows long.
"""

from __future__ import annotations

import importlib

import ml_dtypes
import numpy as np
import pytest
from conftest import SHAPES, hf_weights, make_hf_model, relative_error, save_hf, token_ids

import gemmalab
from gemmalab import linears as core
from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import InputError
from gemmalab.quantize import dequantize, pack, quantize, unpack

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
OPTIONS = [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)]


def adversarial(group: int, rng) -> np.ndarray:
    """Rows of groups that have bitten quantizers: constant (positive, negative, zero, -0.0, below MLX's
    1e-7 step floor), one-hot, symmetric max = -min, tiny (float32 subnormals) and huge values, all one sign,
    codes falling on exact half steps, a linear ramp."""
    base = rng.standard_normal(group)
    one_hot = np.zeros(group)
    one_hot[3] = 1.0
    symmetric = base.copy()
    symmetric[:2] = [2.0, -2.0]
    rows = [
        np.full(group, 3.0), np.full(group, -3.0), np.zeros(group), np.full(group, -0.0), np.full(group, 4e-8),
        np.full(group, 6e-8), one_hot, -one_hot, symmetric, base * 1e-8, base * 1e-39, base * 1e-44, base * 1e30,
        np.abs(base), -np.abs(base), np.round(base * 4) / 4, np.linspace(-7.5, 7.5, group), np.linspace(0, 15, group),
        np.linspace(-1, 1, group),
    ]
    return np.stack(rows).astype(np.float32)


def weights_to_test(dtype: str, group: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cast = DTYPES[dtype]
    special = adversarial(group, rng)
    if cast == np.float16:  # float16 cannot hold 1e30: keep the rows it represents (finite)
        special = special[(np.abs(special) <= np.finfo(np.float16).max).all(1)]
    special = np.tile(special, (1, 2))  # two groups a row: the second a copy of the first
    mixed = rng.standard_normal((40, 2 * group)) * rng.choice([1e-3, 0.02, 1.0, 50.0], size=(40, 1))
    mixed[::5, group:] = mixed[::5, group - 1 : group]  # some rows end in a constant group
    return np.concatenate([special, mixed.astype(np.float32)]).astype(cast)


# --- the core quantizer against MLX, bit for bit ----------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits, group", OPTIONS)
def test_quantize_and_dequantize_equal_mlx_bit_for_bit(bits, group, dtype):
    mx = pytest.importorskip("mlx.core")
    weight = weights_to_test(dtype, group, seed=bits * group)
    packed, scales, biases = quantize(weight, bits, group)
    assert packed.dtype == np.uint32 and packed.shape == (weight.shape[0], weight.shape[1] * bits // 32)
    assert scales.dtype == biases.dtype == weight.dtype and scales.shape == (weight.shape[0], weight.shape[1] // group)

    mx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype]
    theirs = mx.quantize(mx.array(weight.astype(np.float32)).astype(mx_dtype), group, bits)
    mp, ms, mb = (np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 else np.array(a) for a in theirs)
    np.testing.assert_array_equal(packed, mp)
    np.testing.assert_array_equal(scales.astype(np.float32), ms)  # (exact: both in the weight's dtype)
    np.testing.assert_array_equal(biases.astype(np.float32), mb)

    ours = dequantize(packed, scales, biases, bits, group)
    assert ours.dtype == weight.dtype and ours.shape == weight.shape
    mine = mx.dequantize(mx.array(packed), *(mx.array(a.astype(np.float32)).astype(mx_dtype) for a in (scales, biases)),
                         group_size=group, bits=bits)
    np.testing.assert_array_equal(ours.astype(np.float32), np.array(mine.astype(mx.float32)))


@pytest.mark.parametrize("bits, group", OPTIONS)
def test_codes_pack_in_mlx_order_and_the_larger_edge_is_exact(bits, group):
    weight = weights_to_test("float32", group, seed=1)
    packed, scales, biases = quantize(weight, bits, group)
    codes = unpack(packed, bits)
    assert codes.max() < 2**bits and np.array_equal(pack(codes, bits), packed)
    # code j of a word sits at bits [j * bits, (j + 1) * bits): the first code in the lowest bits
    assert np.array_equal(codes[:, 0], packed[:, 0] & (2**bits - 1))
    assert np.array_equal(codes[:, 1], (packed[:, 0] >> bits) & (2**bits - 1))
    deq = dequantize(packed, scales, biases, bits, group)
    groups, deq_groups = weight.reshape(-1, group).astype(np.float64), deq.reshape(-1, group)
    steps = np.abs(scales.reshape(-1, 1).astype(np.float64))
    err = np.abs(groups - deq_groups)
    # rounding: within half a step, except at the far end, where the step fitted to the exact edge
    # (s = edge / q0) can fall short of the range by up to about one step (then the top code clips)
    inside = codes.reshape(-1, group) < 2**bits - 1
    assert (err[inside] <= (steps * 0.5 * (1 + 1e-5) + 1e-45).repeat(group, 1)[inside]).all()
    assert (err <= steps * 1.1 + 1e-45).all()
    edge = np.where(np.abs(groups.min(1)) > np.abs(groups.max(1)), groups.min(1), groups.max(1))
    moved = np.abs(edge) >= steps[:, 0] / 2  # the edge is its own code (b = edge) unless within half a step of 0
    assert np.array_equal(biases.reshape(-1)[moved], edge[moved])


@pytest.mark.parametrize("call, message", [
    (lambda w: quantize(w, 3, 32), "quantization bits must be 4 or 8, got 3"),
    (lambda w: quantize(w, True, 32), "quantization bits must be 4 or 8, got True"),
    (lambda w: quantize(w, 4, 16), "quantization group size must be 32, 64 or 128, got 16"),
    (lambda w: quantize(w[:, :48], 4, 32), r"a weight \[4, 48\] cannot be quantized in groups of 32: .* no group size"),
    (lambda w: quantize(w, 4, 128), r"a weight \[4, 64\] cannot be quantized in groups of 128: .*use group size 32 or 64"),
    (lambda w: quantize(w[0], 4, 32), r"only a matrix \[out, in\] can be quantized, got shape \(64,\)"),
    (lambda w: quantize(w.astype(np.float64), 4, 32), "must be float32, bfloat16 or float16, got float64"),
    (lambda w: quantize(np.where(w > 1, np.inf, w).astype(np.float32), 4, 32), "must be finite"),
    (lambda w: quantize(np.array([[3e38, -3e38] * 16] * 2, np.float32), 4, 32), "spans more than float32's range"),
    (lambda w: dequantize(*quantize(w, 4, 32)[:2], quantize(w, 4, 32)[2][:, :1], 4, 32), "scales and biases of a"),
    (lambda w: dequantize(*quantize(w, 4, 32), 8, 32), "check bits and group_size"),
])
def test_bad_options_are_one_line_errors(call, message):
    weight = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(InputError, match=message) as info:
        call(weight)
    assert "\n" not in str(info.value)


# --- every backend: the quantized linear -------------------------------------------------------------------
def quantized_class(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.quantized").QuantizedLinear


def walker(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.linears")


def host(array) -> np.ndarray:
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def numbers(backend: str, wrapped) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32, scales, biases) a wrapper holds, in MLX's layout (float32 models)."""
    if backend == "torch":
        return wrapped.quantized()
    return host(wrapped.weight), host(wrapped.scales), host(wrapped.biases)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per shape: (config, float32 weights, ids, checkpoint folder)."""
    out = {}
    for name in ("tiny", "untied-softcap"):
        config = SHAPES[name]
        hf = make_hf_model(config, seed=11 + len(name))
        out[name] = (config, hf_weights(hf), token_ids(config), save_hf(hf, tmp_path_factory.mktemp(name)))
    return out


def quantized_weights(config, weights, names, bits, group) -> dict[str, np.ndarray]:
    out = dict(weights)
    for name in names:
        out[name + ".weight"] = dequantize(*quantize(weights[name + ".weight"], bits, group), bits, group)
    return out


def wrap(backend, native, names, bits, group):
    cls = quantized_class(backend)
    return walker(backend).wrap(native, names, lambda base: cls.from_base(base, bits=bits, group_size=group))


@pytest.mark.parametrize("shape, bits, group", [("tiny", 4, 32), ("untied-softcap", 8, 64), ("tiny", 8, 32),
                                                ("untied-softcap", 4, 64)])
def test_quantized_model_equals_the_reference_on_dequantized_weights(backend, shape, bits, group, cases):
    config, weights, ids, folder = cases[shape]
    api = get_backend(backend)
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    names = core.select(config)  # every block linear, and the untied head (vocab 261: not a multiple of 16)
    made = wrap(backend, model.native, names, bits, group)
    assert list(walker(backend).wrappers(model.native)) == names
    expected = quantized_weights(config, weights, names, bits, group)
    for name, wrapped in made.items():  # the same quantized numbers as the core's quantizer
        for ours, core_value in zip(numbers(backend, wrapped), quantize(weights[name + ".weight"], bits, group), strict=True):
            np.testing.assert_array_equal(ours, core_value, err_msg=name)
        assert (wrapped.in_features, wrapped.out_features) == weights[name + ".weight"].shape[::-1]

    logits = model.logits(ids)
    assert relative_error(logits, reference.forward(config, expected, ids)) < 1e-4
    cache = api.new_cache(model.native, batch=ids.shape[0])  # the cached path (jitted step on JAX) too
    assert relative_error(api.extend(model.native, cache, ids, logits="all"), logits) < 1e-5

    dense = model.weights()  # fuse: exactly the numpy dequantization
    for name in names:
        np.testing.assert_array_equal(dense[name + ".weight"], expected[name + ".weight"], err_msg=name)
    assert model.fuse() == names and walker(backend).wrappers(model.native) == {}
    assert relative_error(model.logits(ids), logits) < 1e-5


def test_greedy_generation_through_quantized_linears_follows_the_reference(backend, cases):
    config, weights, ids, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    names = core.select(config)
    wrap(backend, model.native, names, 4, 32)
    expected = quantized_weights(config, weights, names, 4, 32)
    prompt = [int(i) for i in ids[0, :19]]  # longer than 2 windows of 8
    tokens = model.generate(prompt, max_tokens=5, stop=[]).tokens
    chain = list(prompt)
    for _ in range(5):
        chain.append(int(np.argmax(reference.forward(config, expected, np.array([chain]))[0, -1])))
    assert list(tokens) == chain[len(prompt):]


def test_bfloat16_fuse_is_exact_and_logits_are_close(backend, cases):
    config, weights, ids, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="bfloat16", device="cpu")
    names = core.select(config, ["q_proj", "o_proj", "up_proj", "down_proj"])
    wrap(backend, model.native, names, 4, 32)
    bf16 = {n: w.astype(BF16) for n, w in weights.items()}
    dense = model.weights()
    for name in names:  # bf16 scales and biases; dequantized with bf16's two roundings, like mx.dequantize
        bf16[name + ".weight"] = dequantize(*quantize(bf16[name + ".weight"], 4, 32), 4, 32)
        assert dense[name + ".weight"].dtype == BF16
        np.testing.assert_array_equal(dense[name + ".weight"], bf16[name + ".weight"], err_msg=name)
    # bf16 activations throughout: the plain bf16 model is 1.5e-2 from its reference here, each backend's
    # quantized kernel accumulates in float32 (MLX's CPU kernel is called in float32 for that)
    expected = reference.forward(config, {n: w.astype(np.float32) for n, w in bf16.items()}, ids)
    assert relative_error(model.logits(ids), expected) < 3e-2


def test_bad_options_refuse_and_wrap_nothing(backend, cases):
    config, _, ids, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    names = core.select(config, ["q_proj", "down_proj"])  # in: 64 and 128
    for options, message in [
        ((3, 32), "quantization bits must be 4 or 8, got 3"),
        ((4, 48), "quantization group size must be 32, 64 or 128, got 48"),
        ((4, 128), r"a weight \[64, 64\] cannot be quantized in groups of 128"),  # q_proj; down_proj would fit
    ]:
        with pytest.raises(InputError, match=message) as info:
            wrap(backend, model.native, names, *options)
        assert "\n" not in str(info.value)
    assert walker(backend).wrappers(model.native) == {}  # all or nothing


def test_quantized_numbers_are_frozen_and_gradients_reach_the_input(backend):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    g = rng.standard_normal((2, 3, 48)).astype(np.float32)
    deq = dequantize(*quantize(w, 4, 32), 4, 32).astype(np.float64)
    expected = np.einsum("bto,oi->bti", g, deq)  # d(sum(g * (x @ W.T)))/dx
    cls = quantized_class(backend)
    if backend == "mlx":
        import mlx.core as mx
        import mlx.nn as nn

        base = nn.Linear(64, 48, bias=False)
        base.weight = mx.array(w)
        layer = cls.from_base(base, bits=4, group_size=32)
        assert dict(layer.trainable_parameters()) == {} and set(dict(layer.parameters())) == {"weight", "scales", "biases"}
        grad = mx.grad(lambda v: mx.sum(layer(v) * mx.array(g)))(mx.array(x))
    elif backend == "torch":
        import torch

        base = torch.nn.Linear(64, 48, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(w))
        layer = cls.from_base(base, bits=4, group_size=32, kernel="int4pack")  # float32: "auto" dequantizes
        assert list(layer.parameters()) == [] and {"weight", "scales", "biases"} <= dict(layer.named_buffers()).keys()
        assert layer.kernel == "int4pack_cpu" and cls.from_base(base, bits=4, group_size=32).kernel == "dequantize"
        xt = torch.from_numpy(x).requires_grad_(True)
        (layer(xt) * torch.from_numpy(g)).sum().backward()
        grad = xt.grad
    else:
        import jax
        import jax.numpy as jnp

        layer = cls.from_base({"weight": jnp.asarray(w)}, bits=4, group_size=32)
        grad = jax.grad(lambda v: jnp.sum(layer(v) * g))(jnp.asarray(x))
        # no gradient into the scales and biases (the packed integers have none to give)
        sgrad = jax.grad(lambda s: jnp.sum(cls(weight=layer.weight, scales=s, biases=layer.biases, bits=4,
                                                group_size=32)(jnp.asarray(x)) * g))(layer.scales)
        assert not np.asarray(sgrad).any()
    assert relative_error(host(grad), expected) < 1e-5


def test_torch_int4_kernel_on_float32_and_the_kernel_choice(cases):
    # float32 runs torch's int4 CPU kernel only when asked (a scalar loop there); it computes the same
    # function as the dequantized weights, and bfloat16 takes it by default
    if "torch" not in gemmalab.backends():
        pytest.skip("needs the torch backend")
    config, weights, ids, folder = cases["untied-softcap"]  # the untied head: 261 rows, padded to 320
    model = gemmalab.load(folder, backend="torch", dtype="float32", device="cpu")
    names = core.select(config)
    cls = quantized_class("torch")
    made = walker("torch").wrap(model.native, names, lambda b: cls.from_base(b, bits=4, group_size=64, kernel="int4pack"))
    assert {w.kernel for w in made.values()} == {"int4pack_cpu"} and made["lm_head"].weight.shape == (320, 32)
    expected = quantized_weights(config, weights, names, 4, 64)
    assert relative_error(model.logits(ids), reference.forward(config, expected, ids)) < 1e-5
    for name, wrapped in made.items():
        np.testing.assert_array_equal(wrapped.fuse().numpy(), expected[name + ".weight"], err_msg=name)
    bf16 = get_backend("torch").build(config, weights, dtype="bfloat16", device="cpu")
    assert {w.kernel for w in wrap("torch", bf16, names[:3], 4, 32).values()} == {"int4pack_cpu"}
    assert {w.kernel for w in wrap("torch", bf16, names[3:6], 8, 32).values()} == {"dequantize"}
    for kernel, message in [("int4pack", "torch's int4 kernel takes 4-bit weights on CPU"), ("fast", "unknown quantized kernel")]:
        with pytest.raises(InputError, match=message):
            walker("torch").wrap(bf16, names[6:7], lambda b, k=kernel: cls.from_base(b, bits=8, group_size=32, kernel=k))


@pytest.mark.parametrize("backend_name", ["torch", "jax"])
def test_shape_only_models_wrap_without_quantizing(backend_name):
    if backend_name not in gemmalab.backends():
        pytest.skip(f"needs the {backend_name} backend")
    config = gemmalab.PRESETS["gemma-3-270m"]
    api = get_backend(backend_name)
    native = api.build(config, None, dtype="bfloat16")
    names = core.select(config, ["q_proj", "down_proj"])
    made = wrap(backend_name, native, names, 4, 64)
    for name, wrapped in made.items():
        spec = core.linears(config)[name]
        assert (wrapped.in_features, wrapped.out_features) == (spec.in_features, spec.out_features)
    assert set(walker(backend_name).dense_weights(native)) == set(gemmalab.params.parameter_shapes(config))
