"""One vocabulary (DESIGN.md sections 7 and 8): the backend packages expose the same modules, classes,
functions and argument names, in the same order, with the same return types.

The shared names are written once, here; every installed backend is checked against them, so a backend
that renames, drops or reorders one of them fails this file. Where a concept exists on one backend only
(MLX's ``Rotary``, PyTorch's ``fold_mask``, JAX's parameter-tree functions) it is not listed. The JAX model
is a pytree of arrays, not an object: where PyTorch and MLX have a class, JAX has the function named in
``CLASS_FUNCTIONS``, and its entry points take ``(params, config)`` first and JAX's own options last.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import numpy as np
import pytest

import gemmalab
from gemmalab.backend import Backend
from gemmalab.errors import InputError
from gemmalab.train.spec import BackendTrainer

# --- the one list ------------------------------------------------------------------------------------------
# Names every backend's module defines (and lists in __all__), by module ("" = the package itself).
SHARED = {
    "": ["BACKEND", "Gemma3Output", "KVCache"],
    "model": ["DTYPES", "dtype_name", "causal_mask", "Gemma3Output", "select_positions", "soft_cap"],
    "cache": ["KVCache", "LayerCache"],
    "training": ["Batch", "Trainer", "aux_term", "batch_arrays", "chunked_loss_sum", "head_term", "hidden_state"],
    "linears": ["Wrapper", "dense_weights", "fuse", "linears", "named_parameters", "wrap", "wrappers"],
    "wrappers": ["WRAPPERS", "OutputScale"],
}
# PyTorch and MLX classes, and the JAX function in their place.
CLASS_FUNCTIONS = {
    "RMSNorm": "rms_norm",
    "Attention": "attention",
    "MLP": "mlp",
    "DecoderLayer": "decoder_layer",
    "Gemma3TextModel": "text_model",
    "Gemma3ForCausalLM": "forward",
}
# The rotary-embedding section's entry, which differs by mechanism (MLX uses mx.fast.rope in a module).
ROTARY = {"torch": "apply_rope", "mlx": "Rotary", "jax": "apply_rope"}
# The order of the model files' sections (header docstring first): dtype helpers, RMSNorm, rotary, masks,
# attention, MLP, decoder block, text model (its output first), causal LM and its head.
MODEL_ORDER = [
    "dtype_name", "RMSNorm", "<rotary>", "causal_mask", "Attention", "MLP", "DecoderLayer", "Gemma3Output",
    "Gemma3TextModel", "soft_cap", "select_positions", "Gemma3ForCausalLM",
]
OUTPUT_FIELDS = ("logits", "last_hidden_state", "hidden_states", "attentions", "queries_keys")
FORWARD = ["ids", "positions", "mask", "logits_at", "cache", "output_hidden_states", "output_attentions",
           "output_queries_keys"]
TEXT_MODEL = ["ids", "positions", "mask", "cache", "output_hidden_states", "output_attentions", "output_queries_keys"]
JAX_FIRST = ["params", "config"]  # the model, for JAX's functions
JAX_OPTIONS = ["rope", "hint", "remat"]  # JAX's own options, after the shared arguments
CACHE_UPDATE = ["k", "v"]


def module(backend: str, name: str):
    return importlib.import_module(f"gemmalab_{backend}" + (f".{name}" if name else ""))


def names(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def keyword_only(function, shared: list[str]) -> bool:
    params = inspect.signature(function).parameters
    return all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in shared[1:])


def model_entry(backend: str, class_name: str, method: str = "forward"):
    """The function a class name stands for on ``backend``: the method of the class (``forward`` on torch,
    ``__call__`` on MLX), or the JAX function in its place."""
    model = module(backend, "model")
    if backend == "jax":
        return getattr(model, CLASS_FUNCTIONS[class_name])
    return getattr(getattr(model, class_name), "forward" if backend == "torch" else "__call__")


# --- names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SHARED))
def test_each_module_defines_and_exports_the_shared_names(backend, kind):
    mod = module(backend, kind)
    missing = [name for name in SHARED[kind] if not hasattr(mod, name)]
    assert not missing, f"gemmalab_{backend}.{kind} lacks {missing}"
    exported = getattr(mod, "__all__", None)
    if exported is not None:
        assert not set(SHARED[kind]) - set(exported), f"gemmalab_{backend}.{kind}.__all__ lacks names"
        assert all(hasattr(mod, name) for name in exported), f"gemmalab_{backend}.{kind}.__all__ names a ghost"


def test_model_has_the_classes_or_their_functions(backend):
    model = module(backend, "model")
    wanted = CLASS_FUNCTIONS.values() if backend == "jax" else CLASS_FUNCTIONS
    missing = [name for name in wanted if not hasattr(model, name)]
    assert not missing, f"gemmalab_{backend}.model lacks {missing}"
    assert not set(wanted) - set(model.__all__), f"gemmalab_{backend}.model.__all__ lacks some of {list(wanted)}"
    if backend != "jax":
        for name in ("output_weight", "logits_from_hidden"):
            assert callable(getattr(model.Gemma3ForCausalLM, name, None)), name
    else:
        assert names(model.output_weight) == ["params"]
        assert names(model.logits_from_hidden) == ["params", "config", "hidden", "hint"]


def test_model_file_sections_come_in_the_same_order(backend):
    model = module(backend, "model")
    line = {}
    for name in MODEL_ORDER:
        actual = ROTARY[backend] if name == "<rotary>" else name
        if backend == "jax":
            actual = CLASS_FUNCTIONS.get(actual, actual)
        line[name] = inspect.getsourcelines(getattr(model, actual))[1]
    assert sorted(MODEL_ORDER, key=line.get) == MODEL_ORDER


def test_one_output_type_with_the_same_fields_in_the_same_order(backend):
    output = module(backend, "model").Gemma3Output
    fields = output._fields if backend == "jax" else tuple(f.name for f in dataclasses.fields(output))
    assert fields == OUTPUT_FIELDS
    if backend == "jax":
        assert issubclass(output, tuple)  # a NamedTuple: a pytree jitted functions can return


# --- signatures --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("class_name", "expected"), [("Gemma3ForCausalLM", FORWARD), ("Gemma3TextModel", TEXT_MODEL)])
def test_forward_entry_points_take_the_same_arguments(backend, class_name, expected):
    function = model_entry(backend, class_name)
    got = names(function)
    if backend == "jax":
        assert got[:2] == JAX_FIRST
        assert got[2:] == expected + JAX_OPTIONS
    else:
        assert got == expected
    assert keyword_only(function, [p for p in got if p in expected])


def test_layer_caches_update_the_same_way(backend):
    cache = module(backend, "cache")
    classes = [cache.LayerCache] + ([cache.PlannedLayerCache] if backend == "jax" else [])
    for cls in classes:
        assert names(cls.update) == CACHE_UPDATE, cls


def test_backend_methods_take_the_protocols_argument_names(backend):
    """Every Backend method, with the protocol's parameter names in its order; extra options (JAX's mesh)
    come after them, keyword-only, with defaults."""
    native = gemmalab.backend.get_backend(backend)
    assert isinstance(native, Backend)
    for name, protocol in inspect.getmembers(Backend, inspect.isfunction):
        if name.startswith("_"):
            continue
        expected, got = names(protocol), names(getattr(native, name))
        assert got[: len(expected)] == expected, (backend, name, got)
        extra = [inspect.signature(getattr(native, name)).parameters[p] for p in got[len(expected) :]]
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra), (backend, name)


def test_trainers_take_the_protocols_argument_names(backend):
    trainer = module(backend, "training").Trainer
    for name, protocol in inspect.getmembers(BackendTrainer, inspect.isfunction):
        if not name.startswith("_"):
            assert names(getattr(trainer, name)) == names(protocol), (backend, name)


# --- the same behaviour behind the same names --------------------------------------------------------------
_TINY: dict[str, gemmalab.Model] = {}


def tiny_model(backend: str) -> gemmalab.Model:
    if backend not in _TINY:
        _TINY[backend] = gemmalab.init("tiny", backend=backend, dtype="float32", seed=3)
    return _TINY[backend]


def native_forward(backend: str, model, ids: np.ndarray, **kwargs):
    """The native model's forward on numpy ids, array arguments converted to the backend's arrays; the
    Gemma3Output with numpy arrays (None kept)."""
    if backend == "torch":
        import torch

        def convert(x):
            return torch.as_tensor(x) if isinstance(x, np.ndarray) else x

        with torch.no_grad():
            out = model.native(torch.as_tensor(ids), **{k: convert(v) for k, v in kwargs.items()})
        to_numpy = lambda a: None if a is None else a.float().numpy()  # noqa: E731
    elif backend == "mlx":
        import mlx.core as mx

        def convert(x):
            return mx.array(x) if isinstance(x, np.ndarray) else x

        out = model.native(mx.array(ids.astype(np.int32)), **{k: convert(v) for k, v in kwargs.items()})
        to_numpy = lambda a: None if a is None else np.array(a.astype(mx.float32))  # noqa: E731
    else:
        import jax.numpy as jnp
        from gemmalab_jax.model import forward

        def convert(x):
            return jnp.asarray(x) if isinstance(x, np.ndarray) else x

        kwargs = {k: convert(v) for k, v in kwargs.items()}
        out = forward(model.native.params, model.config, jnp.asarray(ids, jnp.int32), **kwargs)
        to_numpy = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
    listed = lambda xs: None if xs is None else [to_numpy(x) for x in xs]  # noqa: E731
    return type(out)(to_numpy(out.logits), to_numpy(out.last_hidden_state), listed(out.hidden_states),
                     listed(out.attentions))


def test_logits_at_selects_the_same_positions_on_every_backend(backend):
    model = tiny_model(backend)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 9))
    full = native_forward(backend, model, ids).logits  # [2, 9, vocab]
    rows = np.array([[8, 1], [0, 4]])
    cases = [  # (logits_at, the logits it selects); slices are not hashable before Python 3.12
        (-1, full[:, -1:]), (3, full[:, 3:4]), (-9, full[:, :1]), (0, full[:, :1]),
        (slice(-3, None), full[:, -3:]), (slice(2, 5), full[:, 2:5]), (slice(None, None, 2), full[:, ::2]),
        ("1-D", full[:, [0, 7, 3]]), ("2-D", np.stack([full[0, [8, 1]], full[1, [0, 4]]])),
    ]
    for at, expected in cases:
        arg = np.array([0, 7, 3]) if at == "1-D" else rows if at == "2-D" else at
        got = native_forward(backend, model, ids, logits_at=arg).logits
        assert got.shape == expected.shape, at
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(full).max(), err_msg=str(at))
    for outside in (9, -10):
        with pytest.raises(InputError, match="logits_at"):
            native_forward(backend, model, ids, logits_at=outside)
    if backend == "mlx":
        # MLX's fast path: the last block computed only the positions from the first kept one (its
        # last_hidden_state shows which), for an int and a step-1 slice; every position otherwise.
        kept = [(-1, 1), (3, 6), (slice(-3, None), 3), (slice(2, 5), 7), (0, 9), (slice(None, None, 2), 9)]
        for at, n in kept:
            assert native_forward(backend, model, ids, logits_at=at).last_hidden_state.shape[1] == n, at


def test_captures_come_back_in_the_same_form_on_every_backend(backend):
    model = tiny_model(backend)
    layers = model.config.num_hidden_layers
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, 7))
    plain = native_forward(backend, model, ids)
    assert plain.hidden_states is None and plain.attentions is None
    out = native_forward(backend, model, ids, output_hidden_states=True, output_attentions=[1], logits_at=-1)
    assert out.logits.shape == (1, 1, model.config.vocab_size)
    assert out.last_hidden_state.shape == (1, 7, model.config.hidden_size)  # a capture computes every position
    assert len(out.hidden_states) == layers + 1
    assert len(out.attentions) == layers
    assert [a is None for a in out.attentions] == [i != 1 for i in range(layers)]
    assert out.attentions[1].shape == (1, model.config.num_attention_heads, 7, 7)
    np.testing.assert_allclose(out.logits, plain.logits[:, -1:], rtol=1e-5, atol=1e-6)


def test_a_cached_step_captures_attention_as_an_uncached_pass_does(backend):
    """output_attentions works with a KV cache too (JAX's model takes the host cache outside a jit, as the
    PyTorch and MLX models take theirs): a decoding step's probabilities over the keys equal the last row of
    the uncached pass's."""
    model = tiny_model(backend)
    config = model.config
    full = config.layer_types.index("full_attention")
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=(1, 7))  # inside the window of 8
    expected = native_forward(backend, model, ids, output_attentions=True).attentions
    cache = gemmalab.backend.get_backend(backend).new_cache(model.native, batch=1)
    native_forward(backend, model, ids[:, :-1], cache=cache)
    step = native_forward(backend, model, ids[:, -1:], cache=cache, output_attentions=True).attentions
    for layer in (0, full):  # the ring has not wrapped: keys are in position order on every layer
        np.testing.assert_allclose(step[layer], expected[layer][:, :, -1:], rtol=1e-5, atol=1e-6, err_msg=str(layer))
