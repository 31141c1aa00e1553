"""Wrappable linears: the core's list and selection (gemmalab.linears), each backend's walker
(gemmalab_<backend>.linears) and its OutputScale wrapper (gemmalab_<backend>.wrappers).

Oracles: the linear weights of gemmalab.params and transformers' nn.Linear modules of the same checkpoint
(the list); the float64 numpy reference run on weights this test scales itself (the wrapped model); the
numpy merge rule (weights() and fuse); transformers loading the saved checkpoint; torch autograd and a
closed form (JAX gradients through a wrapped leaf). Tiny random HF checkpoints of 6 and 7 layers, on
sequences 2.5 sliding windows long.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from conftest import (
    SHAPES,
    hf_weights,
    make_hf_model,
    relative_error,
    save_hf,
    token_ids,
    torch,
    transformers,
)

import gemmalab
from gemmalab import linears as core
from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import InputError
from gemmalab.params import parameter_shapes

FP32_TOLERANCE = 1e-5
SHAPE_NAMES = ["tiny", "tiny-mqa", "untied-softcap"]  # tied GQA, tied MQA (7 layers), untied + soft-cap


def walker(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.linears")


def output_scale(backend: str):
    return importlib.import_module(f"gemmalab_{backend}.wrappers").OutputScale


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per shape: (config, transformers model, float32 weights, ids, checkpoint folder)."""
    out = {}
    for name in SHAPE_NAMES:
        config = SHAPES[name]
        hf = make_hf_model(config, seed=7 + len(name))
        out[name] = (config, hf, hf_weights(hf), token_ids(config), save_hf(hf, tmp_path_factory.mktemp(name)))
    return out


def random_scales(config, names, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    specs = core.linears(config)
    return {n: rng.uniform(0.5, 1.5, specs[n].out_features).astype(np.float32) for n in names}


def wrap_with_scales(backend, native, scales) -> None:
    lin, cls = walker(backend), output_scale(backend)
    for name, scale in scales.items():
        lin.wrap(native, [name], lambda base, s=scale: cls.from_base(base, scale=s))


def host(array) -> np.ndarray:
    """A copy of a backend array (a torch parameter, an MLX or JAX array) in numpy."""
    return array.detach().cpu().numpy().copy() if hasattr(array, "detach") else np.asarray(array).copy()


def scaled(weights, scales) -> dict[str, np.ndarray]:
    out = dict(weights)
    for name, scale in scales.items():
        out[name + ".weight"] = core.output_scale(weights[name + ".weight"], scale)
    return out


# --- the core: which linears exist, selecting them ----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_core_list_is_the_linear_weights_of_params_and_the_linears_of_transformers(shape, cases):
    config, hf, *_ = cases[shape]
    specs = core.linears(config)
    tied = config.tie_word_embeddings
    # params.py: every matrix, the embedding counted as a linear only when it is the tied head
    matrices = [n.removesuffix(".weight") for n, s in parameter_shapes(config).items() if len(s) == 2]
    assert list(specs) == [n for n in matrices if tied or n != core.EMBEDDING]
    # transformers: its nn.Linear modules; when tied, its lm_head is the embedding matrix
    theirs = {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    if tied:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        theirs["model.embed_tokens"] = theirs.pop("lm_head")
    assert set(specs) == set(theirs)
    for name, spec in specs.items():
        assert (spec.in_features, spec.out_features) == (theirs[name].in_features, theirs[name].out_features)
        assert spec.tied == (name == core.EMBEDDING)
        assert spec.weight == name + ".weight" and spec.kind == name.rpartition(".")[2]
        assert spec.layer == (int(name.split(".")[2]) if ".layers." in name else None)


def test_select_by_ending_layers_and_predicate():
    config = SHAPES["untied-softcap"]
    layers = config.num_hidden_layers
    qv = core.select(config, ["v_proj", "q_proj"])
    assert qv == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"]  # checkpoint order
    assert core.select(config, "mlp.up_proj", layers=[0, -1]) == [
        "model.layers.0.mlp.up_proj", f"model.layers.{layers - 1}.mlp.up_proj"]
    assert core.select(config, "lm_head") == ["lm_head"]
    assert core.select(config, "model.layers.2.self_attn.o_proj") == ["model.layers.2.self_attn.o_proj"]
    everything = core.select(config)
    assert everything == list(core.linears(config)) and len(everything) == 7 * layers + 1
    assert "lm_head" not in core.select(config, layers=range(layers))  # the head is in no block
    wide = core.select(config, where=lambda s: s.out_features > config.hidden_size)
    assert set(wide) == {n for n, s in core.linears(config).items() if s.out_features > config.hidden_size}
    # tied: everything but the head, which is never selected
    tied = SHAPES["tiny"]
    assert core.select(tied) == [n for n in core.linears(tied) if n != core.EMBEDDING]


@pytest.mark.parametrize("call, message", [
    (lambda c: core.select(c, ["q_prj"]), "'q_prj' matches no linear of this model: name one of q_proj"),
    (lambda c: core.select(c, ["lm_head"]), "'lm_head' matches no linear"),  # tied: there is no lm_head
    (lambda c: core.select(c, ["embed_tokens"]), "model.embed_tokens is the tied output head"),
    (lambda c: core.select(c, ["q_proj"], layers=[6]), r"layer 6 is not a block index in \[0, 6\)"),
    (lambda c: core.select(c, ["q_proj"], layers=[True]), "layer True is not a block index"),
    (lambda c: core.select(c, where=lambda s: False), "the selection matches no linear"),
    (lambda c: core.select(c, [""]), "linear names must be non-empty strings"),
    (lambda c: core.check_wrappable(c, ["q_proj"]), "'q_proj' is not a linear of this model: give full names"),
    (lambda c: core.check_wrappable(c, ["model.embed_tokens"]), "tied output head.*tie_word_embeddings=False"),
    (lambda c: core.check_wrappable(c, []), "no linear to wrap"),
    (lambda c: core.output_scale_init(np.ones(3), 4), "a real vector of 4 values"),
])
def test_core_errors_name_the_problem(call, message):
    with pytest.raises(InputError, match=message):
        call(SHAPES["tiny"])


def test_a_linear_named_twice_is_refused():
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(InputError, match=f"{name} is named twice"):
        core.check_wrappable(SHAPES["tiny"], [name, name])


# --- every backend: the walker, OutputScale, canonical dense weights ---------------------------------------
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_walker_lists_the_core_linears(backend, shape, cases):
    config, *_ = cases[shape]
    native = get_backend(backend).build(config, None, dtype="float32")  # shape-only is enough for names
    assert list(walker(backend).linears(native)) == list(core.linears(config))
    assert walker(backend).wrappers(native) == {}


@pytest.mark.parametrize("shape", ["tiny", "untied-softcap"])
def test_output_scale_at_ones_computes_the_unwrapped_model(backend, shape, cases):
    config, _, weights, ids, folder = cases[shape]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    plain = model.logits(ids)
    assert relative_error(plain, reference.forward(config, weights, ids)) < FP32_TOLERANCE
    lin = walker(backend)
    names = core.select(config)  # every linear that can be wrapped, the untied head included
    made = lin.wrap(model.native, names, output_scale(backend).from_base)
    assert list(made) == names and list(lin.wrappers(model.native)) == names
    np.testing.assert_array_equal(model.logits(ids), plain)  # multiplying by 1.0 is exact
    params = lin.named_parameters(model.native)
    for name in names:  # the base weight stays reachable, under a name of its own
        assert core.base_weight(name) in params and f"{name}.scale" in params and f"{name}.weight" not in params
        np.testing.assert_array_equal(np.asarray(params[core.base_weight(name)]), weights[name + ".weight"])


@pytest.mark.parametrize("shape", ["tiny", "untied-softcap"])
def test_scaled_model_equals_the_reference_on_scaled_weights_then_saves_and_fuses(backend, shape, cases, tmp_path):
    config, _, weights, ids, folder = cases[shape]
    api = get_backend(backend)
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    endings = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    names = core.select(config, endings + ([] if config.tie_word_embeddings else ["lm_head"]))
    scales = random_scales(config, names)
    wrap_with_scales(backend, model.native, scales)
    expected_weights = scaled(weights, scales)

    logits = model.logits(ids)
    assert relative_error(logits, reference.forward(config, expected_weights, ids)) < FP32_TOLERANCE
    # the cached path (jitted step on JAX) computes through the wrappers too
    cache = api.new_cache(model.native, batch=ids.shape[0])
    assert relative_error(api.extend(model.native, cache, ids, logits="all"), logits) < FP32_TOLERANCE

    # weights(): exactly the canonical keys, in order, each wrapped linear fused by the numpy merge rule
    dense = model.weights()
    assert list(dense) == list(parameter_shapes(config))
    for name, value in expected_weights.items():
        np.testing.assert_allclose(dense[name], value, rtol=1e-7, atol=0, err_msg=name)
    extra = sum(s.size for s in scales.values())
    assert model.num_parameters() == config.num_parameters() + extra
    shapes = api.parameter_shapes(model.native)
    assert sum(int(np.prod(s)) for s in shapes.values()) == model.num_parameters()
    assert all(shapes[f"{n}.scale"] == (core.linears(config)[n].out_features,) for n in names)

    # save: the canonical dense checkpoint, which transformers loads and runs to the same logits
    from safetensors import safe_open

    out = model.save(tmp_path / "saved")
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert set(f.keys()) == set(parameter_shapes(config))
    hf = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    assert relative_error(theirs, logits) < FP32_TOLERANCE

    # fuse: plain dense linears again, the same function, the same weights, the config's count
    assert model.fuse() == names
    assert walker(backend).wrappers(model.native) == {}
    assert relative_error(model.logits(ids), logits) < FP32_TOLERANCE
    after = model.weights()
    assert list(after) == list(dense)
    for name in after:
        np.testing.assert_array_equal(after[name], dense[name], err_msg=name)
    assert model.num_parameters() == config.num_parameters()
    assert set(api.parameter_shapes(model.native)) == set(parameter_shapes(config))


def test_model_api_wraps_by_ending_and_refuses_clearly(backend, cases):
    config, _, weights, ids, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    lin = walker(backend)
    plain = model.logits(ids)
    names = model.wrap("output_scale", ["q_proj", "v_proj"], scale=None)
    assert names == core.select(config, ["q_proj", "v_proj"])

    q0, k0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    with pytest.raises(InputError, match=f"{q0} is already wrapped \\(OutputScale\\): fuse\\(model\\) first"):
        lin.wrap(model.native, [k0, q0], output_scale(backend).from_base)
    assert k0 not in lin.wrappers(model.native)  # all or nothing: k_proj was not wrapped either
    with pytest.raises(InputError, match="model.embed_tokens is the tied output head"):
        lin.wrap(model.native, ["model.embed_tokens"], output_scale(backend).from_base)
    with pytest.raises(InputError, match="'model.layers.0.q_proj' is not a linear of this model"):
        lin.wrap(model.native, ["model.layers.0.q_proj"], output_scale(backend).from_base)
    with pytest.raises(InputError, match="make_wrapper gave a"):
        lin.wrap(model.native, [k0], lambda base: base)
    with pytest.raises(InputError, match="unknown wrapper 'prefix_tuning': choose one of output_scale"):
        model.wrap("prefix_tuning", ["k_proj"])
    with pytest.raises(InputError, match="Model.add_adapter"):
        model.wrap("lora", ["k_proj"])
    with pytest.raises(InputError, match="a real vector of 64 values"):
        model.wrap("output_scale", "model.layers.1.self_attn.o_proj", scale=np.ones(3))
    assert list(lin.wrappers(model.native)) == names  # none of the refusals changed anything
    np.testing.assert_array_equal(model.logits(ids), plain)
    assert model.fuse() == names and model.fuse() == []


def test_shape_only_models_wrap_and_fuse_without_allocating(backend):
    config = gemmalab.PRESETS["gemma-3-270m"]
    api = get_backend(backend)
    native = api.build(config, None, dtype="bfloat16")
    names = api.wrap(native, core.select(config, ["q_proj", "v_proj"]), "output_scale")
    extra = sum(core.linears(config)[n].out_features for n in names)
    assert api.num_parameters(native) == config.num_parameters() + extra
    assert api.fuse(native) == names
    assert api.num_parameters(native) == config.num_parameters()


# --- JAX: gradients through a wrapped leaf ---------------------------------------------------------------
def test_jax_grad_through_a_wrapped_leaf_equals_the_closed_form():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from gemmalab_jax.model import flatten, linear, rebuild
    from gemmalab_jax.wrappers import OutputScale

    rng = np.random.default_rng(0)
    w, x, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((5, 3), (2, 4, 3), (2, 4, 5)))
    s = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    leaf = OutputScale.from_base({"weight": jnp.asarray(w)}, scale=s)
    tree = {"proj": leaf}

    def loss(tree):
        return jnp.sum(linear(tree["proj"], jnp.asarray(x)) * g)

    with jax.default_matmul_precision("highest"):
        grads = flatten(jax.jit(jax.grad(loss))(tree))
        value = float(jax.jit(loss)(tree))
    xw = np.einsum("bti,oi->bto", x.astype(np.float64), w)  # x @ W.T
    assert value == pytest.approx(float(np.sum(s * xw * g)), rel=1e-5)
    assert set(grads) == {"proj.base.weight", "proj.scale"}
    np.testing.assert_allclose(grads["proj.scale"], np.einsum("bto,bto->o", g, xw), rtol=1e-5)
    np.testing.assert_allclose(grads["proj.base.weight"], np.einsum("bto,bti->oi", g * s, x), rtol=1e-5)
    # a flat mapping goes back into the tree with its wrapper (names alone cannot rebuild one)
    again = rebuild(jax.tree_util.tree_structure(tree), flatten(tree))
    assert isinstance(again["proj"], OutputScale)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(tree)


def test_jax_model_gradient_of_wrapper_scales_equals_torch_autograd(cases):
    if not {"jax", "torch"} <= set(gemmalab.backends()):
        pytest.skip("needs the jax and torch backends")
    import jax
    import jax.numpy as jnp
    from gemmalab_jax.model import flatten, forward

    config, _, weights, ids, _ = cases["untied-softcap"]
    ids = ids[:, : 2 * config.sliding_window + 3]
    names = ["model.layers.1.self_attn.o_proj", "model.layers.4.mlp.up_proj", "lm_head"]
    scales = random_scales(config, names, seed=5)
    probe = np.random.default_rng(6).standard_normal((*ids.shape, config.vocab_size)).astype(np.float32)

    # torch: the scales (only) require gradients
    tmodel = get_backend("torch").build(config, weights, dtype="float32", device="cpu")
    wrap_with_scales("torch", tmodel, scales)
    params = walker("torch").named_parameters(tmodel)
    for name in names:
        params[f"{name}.scale"].requires_grad_(True)
    (tmodel(torch.as_tensor(ids)).logits * torch.as_tensor(probe)).sum().backward()
    expected = {n: params[f"{n}.scale"].grad.numpy() for n in names}

    jmodel = get_backend("jax").build(config, weights, dtype="float32", device="cpu")
    wrap_with_scales("jax", jmodel, scales)
    rope = jmodel.rope(np.arange(ids.shape[1])[None])

    def loss(p):
        return jnp.sum(forward(p, config, jnp.asarray(ids, jnp.int32), rope=rope).logits * probe)

    with jax.default_matmul_precision("highest"):
        grads = flatten(jax.jit(jax.grad(loss))(jmodel.params))
    for name in names:
        assert relative_error(grads[f"{name}.scale"], expected[name]) < 1e-4, name


@pytest.mark.parametrize("shape", ["tiny", "untied-softcap"])
def test_trainer_trains_only_the_scales_then_fuse_keeps_the_function_and_transformers_loads_it(
    backend, shape, cases, tmp_path
):
    # The trainer names, freezes and scales wrapper parameters like any other: only the scales train here
    # (the untied head's too), their first gradient is the reference's, the frozen base weights stay put.
    from gemmalab.train.spec import OptimizerSpec, TrainSpec

    config, _, weights, ids, folder = cases[shape]
    api = get_backend(backend)
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    names = core.select(config, ["q_proj", "down_proj"] + ([] if config.tie_word_embeddings else ["lm_head"]))
    model.wrap("output_scale", names)
    trainer = api.trainer(model.native, TrainSpec(optimizer=OptimizerSpec(weight_decay=0.0), max_grad_norm=None,
                                                  loss_chunk_tokens=16))
    scale_names = [f"{n}.scale" for n in names]
    trainer.set_lr_scales({n: 0.0 for n in api.parameter_shapes(model.native) if n not in scale_names})
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss_weights = np.ones(inputs.shape, np.float32)

    losses = [trainer.accumulate(inputs, targets, loss_weights)]
    grads = trainer.gradients()
    assert set(grads) == set(scale_names)
    # d(loss)/d(scales) along a random direction, against central differences of the float64 reference on
    # weights this test scales itself (the loss sum of plain cross-entropy, by hand)
    def reference_loss(scales):
        logits = reference.forward(config, scaled(weights, scales), inputs)
        log_p = logits - logits.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        return float(-np.take_along_axis(log_p, targets[..., None], -1).sum())

    rng = np.random.default_rng(0)
    direction = {n: rng.normal(size=core.linears(config)[n].out_features) for n in names}
    h = 1e-6
    numeric = (reference_loss({n: 1 + h * d for n, d in direction.items()})
               - reference_loss({n: 1 - h * d for n, d in direction.items()})) / (2 * h)
    analytic = sum(float(grads[f"{n}.scale"] @ d) for n, d in direction.items())
    assert analytic == pytest.approx(numeric, rel=1e-3)

    trainer.apply(3e-2, float(loss_weights.sum()))
    for _ in range(4):
        losses.append(trainer.accumulate(inputs, targets, loss_weights))
        trainer.apply(3e-2, float(loss_weights.sum()))
    assert losses[-1] < losses[0] * 0.99  # the scales alone lower the loss
    held = walker(backend).named_parameters(model.native)
    for name in names:  # frozen: bit for bit the loaded weights
        np.testing.assert_array_equal(host(held[core.base_weight(name)]), weights[name + ".weight"])
    trained = {n: host(held[f"{n}.scale"]).astype(np.float32) for n in names}
    assert all(np.abs(s - 1).max() > 1e-3 for s in trained.values())

    logits = model.logits(ids)
    assert relative_error(logits, reference.forward(config, scaled(weights, trained), ids)) < FP32_TOLERANCE
    model.fuse()
    assert relative_error(model.logits(ids), logits) < FP32_TOLERANCE
    out = model.save(tmp_path / "trained")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    assert relative_error(theirs, logits) < FP32_TOLERANCE
