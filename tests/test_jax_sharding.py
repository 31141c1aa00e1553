"""The JAX backend sharded over a ("data", "model") device mesh: the same numbers as on one device, and each
device holding its share of the parameters.

The sharded part runs in a subprocess, because the 8 CPU devices it needs exist only when
XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before jax is imported (and this test process may
have imported jax already). The child computes and prints JSON; the assertions are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

FP32_TOLERANCE = 1e-5

CHILD = textwrap.dedent(
    r'''
    import dataclasses, json, tempfile
    import numpy as np
    import jax
    import gemmalab
    from gemmalab.api import Model
    from gemmalab.backend import get_backend
    from gemmalab.config import PRESETS
    from gemmalab.errors import BackendError
    from gemmalab.params import init_weights, is_norm
    from gemmalab_jax.model import flatten
    from gemmalab_jax.sharding import bytes_per_device

    assert len(jax.devices()) == 8, jax.devices()
    be = get_backend("jax")
    out = {}

    def weights_for(config, seed=0):
        """Random weights with random norms (zero norms would hide a wrongly sharded norm)."""
        rng = np.random.default_rng(seed)
        w = init_weights(config, seed=seed, std=0.1)
        norm = {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) for k, v in w.items() if is_norm(k)}
        return {**w, **norm}

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))

    def compare(name, config, mesh, batches=(2,), generate=True):
        w = weights_for(config)
        single = be.build(config, w, dtype="float32", device="cpu")
        sharded = be.build(config, w, dtype="float32", device="cpu", mesh=mesh)
        result = {"fallbacks": sharded.plan.fallbacks, "logits": {}}
        rng = np.random.default_rng(1)
        for batch in batches:  # a batch that does not divide "data" is replicated over it
            ids = rng.integers(0, config.vocab_size, size=(batch, 2 * config.sliding_window + 3))
            result["logits"][batch] = rel(be.logits(sharded, ids), be.logits(single, ids))
        if generate:
            # The core's loop over the KV cache: a left-padded batch, prompts past the window (the ring
            # wraps); greedy, then seeded sampling (random models repeat themselves greedily).
            prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (12, 9)]
            for kind, options in (("greedy", {}), ("sampled", {"temperature": 1.0, "seed": 7})):
                models = [Model(config, "jax", "float32", native) for native in (single, sharded)]
                result[kind] = [m.generate(prompts, max_tokens=4, stop=[], **options).tokens for m in models]
        out[name] = result
        return sharded

    # 1. Every count divides the mesh: 8 heads, 4 kv heads, mlp 128, vocab 512 (not tiny's byte-level 261),
    #    hidden 64 on data=2 x model=4.
    tiny512 = dataclasses.replace(PRESETS["tiny"], vocab_size=512)
    config = dataclasses.replace(tiny512, num_attention_heads=8, num_key_value_heads=4, name="tp4")
    model = compare("divisible", config, {"data": 2, "model": 4}, batches=(2, 3))
    flat = flatten(model.params)
    out["shard_shapes"] = {
        name: list(flat[name].addressable_shards[0].data.shape)
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                     "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.0.input_layernorm.weight")
    }
    out["devices_per_shard"] = len(flat["model.layers.0.mlp.gate_proj.weight"].addressable_shards)
    out["bytes_per_device"] = sorted(bytes_per_device(model.params).values())
    out["total_bytes"] = config.num_parameters() * 4
    out["norm_bytes"] = sum(v.size * 4 for k, v in be.weights(model).items() if is_norm(k))
    cache = be.new_cache(model, batch=2)
    out["cache_spec"] = [str(a) for a in cache.buffers[5][0].sharding.spec]  # layer 5 is global
    abstract = be.build(config, None, dtype="bfloat16", mesh={"data": 2, "model": 4})
    q_proj = abstract.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]  # a ShapeDtypeStruct
    out["shape_only_spec"] = [str(a) for a in q_proj.sharding.spec]

    # 2. Counts that do not divide: tiny's 2 kv heads on model=4; tiny-mqa's 2 heads, 1 kv head and
    #    vocab 300 on model=8.
    compare("kv-heads-replicated", tiny512, {"data": 2, "model": 4})
    compare("mqa-model8", PRESETS["tiny-mqa"], {"data": 1, "model": 8}, generate=False)

    # 3. The option travels through gemmalab.init and gemmalab.load to build (a sharded model saves one HF
    #    checkpoint, gathered from its shards); a mesh bigger than the devices is an error.
    mesh = {"data": 2, "model": 4}
    initialised = gemmalab.init(config, backend="jax", mesh=mesh)
    loaded = gemmalab.load(initialised.save(tempfile.mkdtemp() + "/tp4"), backend="jax", dtype="float32", mesh=mesh)
    out["api_meshes"] = [dict(m.native.mesh.shape) for m in (initialised, loaded)]
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 19))
    out["reloaded_equal"] = bool(np.array_equal(loaded.logits(ids), initialised.logits(ids)))
    try:
        be.build(config, None, dtype="float32", mesh={"data": 4, "model": 4})
        out["too_big"] = None
    except BackendError as err:
        out["too_big"] = str(err)
    print("RESULT" + json.dumps(out))
    '''
)


@pytest.fixture(scope="module")
def sharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.mark.parametrize("case", ["divisible", "kv-heads-replicated", "mqa-model8"])
def test_sharded_logits_and_greedy_tokens_equal_single_device(sharded, case):
    result = sharded[case]
    for batch, error in result["logits"].items():
        assert error < FP32_TOLERANCE, (case, batch, error)
    if "greedy" in result:
        single, sharded = result["greedy"]
        assert sharded == single
        single, sharded = result["sampled"]
        assert sharded == single and len({t for row in single for t in row}) > 2


def test_parameters_are_split_over_every_device(sharded):
    """data=2 x model=4: matrices split 8 ways (rows over model, columns over data), norms replicated."""
    assert sharded["shard_shapes"] == {
        "model.embed_tokens.weight": [512 // 4, 64 // 2],  # vocab over model, hidden over data
        "model.layers.0.self_attn.q_proj.weight": [8 * 16 // 4, 64 // 2],  # heads over model
        "model.layers.0.self_attn.k_proj.weight": [4 * 16 // 4, 64 // 2],  # kv heads over model
        "model.layers.0.self_attn.o_proj.weight": [64 // 2, 8 * 16 // 4],
        "model.layers.0.mlp.gate_proj.weight": [128 // 4, 64 // 2],  # mlp columns over model
        "model.layers.0.mlp.down_proj.weight": [64 // 2, 128 // 4],
        "model.layers.0.input_layernorm.weight": [64],
    }
    assert sharded["devices_per_shard"] == 8
    per_device = sharded["bytes_per_device"]
    assert len(per_device) == 8 and min(per_device) == max(per_device)
    share = (sharded["total_bytes"] - sharded["norm_bytes"]) / 8 + sharded["norm_bytes"]
    assert per_device[0] == share  # about 1/8 of the model: every matrix split, only the norms whole
    assert per_device[0] < 0.14 * sharded["total_bytes"]
    assert sharded["divisible"]["fallbacks"] == []
    assert sharded["cache_spec"] == ["data", "None", "model", "None"]  # batch over data, kv heads over model
    assert sharded["shape_only_spec"] == ["model", "data"]  # shape-only builds carry their shardings


def test_counts_that_do_not_divide_are_replicated_and_reported(sharded):
    kv = sharded["kv-heads-replicated"]["fallbacks"]
    assert any(note.startswith("k_proj: 2 kv_heads") for note in kv) and len(kv) == 2  # k_proj and v_proj
    mqa = " ".join(sharded["mqa-model8"]["fallbacks"])
    assert "q_proj" in mqa and "k_proj" in mqa and "embed_tokens: 300 vocab" in mqa


def test_mesh_option_passes_through_the_api_and_bad_meshes_fail_clearly(sharded):
    assert sharded["api_meshes"] == [{"data": 2, "model": 4}] * 2
    assert sharded["reloaded_equal"]
    assert sharded["too_big"] is not None and "xla_force_host_platform_device_count=16" in sharded["too_big"]
