"""The conformance suite: runs once per installed backend (the ``backend`` parameter).

Oracles: the float64 numpy reference and transformers' Gemma3ForCausalLM, on tiny random checkpoints
written here in HF format, on sequences longer than 2.5 sliding windows, batch 2.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    SHAPES,
    hf_logits,
    hf_weights,
    make_hf_model,
    relative_error,
    save_hf,
    token_ids,
    torch,
    transformers,
)

import gemmalab
from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.config import PRESETS

FP32_TOLERANCE = 1e-5
# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through 6-7 blocks of matmuls, norms and
# softmax the logits drift further: 1.5e-2 to 2.3e-2 on these shapes, and up to 3.8e-2 over other seeds,
# for transformers' bf16 as for ours (README, benchmarks/exactness.py). Any wrong detail gives > 0.1.
BF16_TOLERANCE = 0.06
# fp16 keeps 11 significant bits; gemmalab keeps the residual stream in fp32 for fp16 (see the backends).
FP16_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per shape: (config, float32 HF weights, ids, reference logits, transformers logits, checkpoint folder)."""
    out = {}
    for name, config in SHAPES.items():
        hf = make_hf_model(config, seed=len(name))
        ids = token_ids(config)
        weights = hf_weights(hf)
        folder = save_hf(hf, tmp_path_factory.mktemp(name))
        out[name] = (config, weights, ids, reference.forward(config, weights, ids), hf_logits(hf, ids), folder)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_logits_equal_reference_and_transformers(backend, shape, cases):
    config, _, ids, expected, theirs, folder = cases[shape]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    logits = model.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, config.vocab_size)
    assert relative_error(logits, expected) < FP32_TOLERANCE
    assert relative_error(logits, theirs) < FP32_TOLERANCE


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", BF16_TOLERANCE), ("float16", FP16_TOLERANCE)])
@pytest.mark.parametrize("shape", ["tiny", "tiny-mqa"])
def test_half_precision_within_stated_tolerance(backend, shape, dtype, tolerance, cases):
    config, _, ids, expected, _, folder = cases[shape]
    model = gemmalab.load(folder, backend=backend, dtype=dtype, device="cpu")
    logits = model.logits(ids)
    assert np.isfinite(logits).all()
    assert relative_error(logits, expected) < tolerance
    # and the precision is really lower: a bf16/fp16 model that silently computed in fp32 would not differ
    assert relative_error(logits, expected) > FP32_TOLERANCE


def test_bf16_matches_transformers_bf16_closely(backend, cases):
    """Both round the same ops to bf16 (norms in fp32, embed scale rounded to bf16), so they agree better
    than either agrees with fp64."""
    config, weights, ids, expected, _, folder = cases["tiny"]
    ours = gemmalab.load(folder, backend=backend, dtype="bfloat16", device="cpu").logits(ids)
    hf = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    theirs = hf_logits(hf, ids)
    assert relative_error(ours, theirs) < BF16_TOLERANCE
    assert relative_error(theirs, expected) < BF16_TOLERANCE


def test_tied_head_is_one_matrix(backend, cases):
    config, weights, *_ = cases["tiny"]
    model = gemmalab.init(config, backend=backend, device="cpu")
    assert model.num_parameters() == config.num_parameters()
    names = set(model.weights())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_untied_head_is_its_own_matrix(backend, cases):
    config, *_ = cases["untied-softcap"]
    model = gemmalab.init(config, backend=backend, device="cpu")
    assert model.num_parameters() == config.num_parameters()
    assert "lm_head.weight" in model.weights()


def test_weights_round_trip_through_the_backend(backend, cases):
    config, weights, *_ = cases["tiny-mqa"]
    native = get_backend(backend).build(config, weights, dtype="float32", device="cpu")
    back = get_backend(backend).weights(native)
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_shape_only(backend, name):
    """No weights: nothing is allocated (27B would need 100 GiB), and the count matches the config's,
    which test_config checks against transformers."""
    config = PRESETS[name]
    native = get_backend(backend).build(config, None, dtype="bfloat16")
    assert get_backend(backend).num_parameters(native) == config.num_parameters()


def test_saved_checkpoint_reloads_in_transformers(backend, cases, tmp_path):
    config, weights, ids, expected, _, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    out = model.save(tmp_path / "saved")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert relative_error(hf_logits(hf, ids), model.logits(ids)) < FP32_TOLERANCE
    assert hf.config.layer_types == list(config.layer_types)
    # and in gemmalab itself, on the same backend
    again = gemmalab.load(out, backend=backend, dtype="float32", device="cpu")
    np.testing.assert_array_equal(again.logits(ids), model.logits(ids))


def test_bf16_save_keeps_bf16_on_disk(backend, cases, tmp_path):
    from safetensors import safe_open

    _, weights, *_, folder = cases["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="bfloat16", device="cpu")
    out = model.save(tmp_path / "bf16")
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype.name == "bfloat16"
    hf = transformers.Gemma3ForCausalLM.from_pretrained(out)
    assert hf.config.dtype == torch.bfloat16 or hf.dtype == torch.bfloat16




def test_fp16_survives_a_residual_stream_beyond_fp16_range(backend, tmp_path):
    """Real Gemma checkpoints carry residual values past fp16's maximum (65504). Here the embeddings are
    scaled until they do (about 1e5 after the sqrt(hidden) scale): gemmalab's fp16 keeps the residual
    stream in fp32 and stays close to the reference; an all-fp16 model (transformers) overflows."""
    import dataclasses

    config = dataclasses.replace(SHAPES["tiny"], tie_word_embeddings=False)  # a tied head would overflow too
    hf = make_hf_model(config, seed=3)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(2e5)
    ids = token_ids(config)
    weights = hf_weights(hf)
    residual = weights["model.embed_tokens.weight"][ids] * config.embed_scale()
    assert np.abs(residual).max() > 65504  # the case is real
    folder = save_hf(hf, tmp_path / "hot")
    peer = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float16).eval()
    assert not np.isfinite(hf_logits(peer, ids)).all()  # all-fp16 fails on it

    logits = gemmalab.load(folder, backend=backend, dtype="float16", device="cpu").logits(ids)
    assert np.isfinite(logits).all()
    assert relative_error(logits, reference.forward(config, weights, ids)) < FP16_TOLERANCE
