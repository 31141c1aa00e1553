"""Checkpoints: the three key layouts, both config forms, sharding, the HF cache, and bad input.

Layout oracles: transformers writes the ``model.*`` (Gemma3ForCausalLM) and ``language_model.model.*``
(Gemma3ForConditionalGeneration: the first multimodal release and transformers 5) layouts itself; the
``model.language_model.*`` layout of transformers 4.52-4.57 is written here by renaming keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    BACKENDS,
    SHAPES,
    hf_logits,
    hf_weights,
    make_hf_model,
    randomize_norms,
    relative_error,
    rewrite_config,
    token_ids,
    torch,
    transformers,
)
from safetensors.numpy import load_file, save_file

import gemmalab
from gemmalab import checkpoint, reference
from gemmalab.config import FULL
from gemmalab.errors import CheckpointError, ConfigError, ModelNotFoundError

BACKEND = BACKENDS[0] if BACKENDS else None
needs_backend = pytest.mark.skipif(BACKEND is None, reason="no backend installed")


def legacy_text_config(hf_dict: dict) -> dict:
    """The transformers 4.x form of a text config: rope_theta/rope_local_base_freq/rope_scaling and
    sliding_window_pattern instead of layer_types/rope_parameters (as the 1B's config.json was published)."""
    out = {k: v for k, v in hf_dict.items() if k not in ("layer_types", "rope_parameters", "dtype")}
    rope = hf_dict["rope_parameters"]
    out["rope_theta"] = rope[FULL]["rope_theta"]
    out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    out["rope_scaling"] = None if rope[FULL]["rope_type"] == "default" else {"rope_type": "linear", "factor": rope[FULL]["factor"]}
    out["sliding_window_pattern"] = 6
    out["torch_dtype"] = "float32"
    return out


def tiny_multimodal(config):
    text = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    mm_config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(1)
    return randomize_norms(transformers.Gemma3ForConditionalGeneration(mm_config).float().eval())


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory, tiny_hf):
    config, _, _ = tiny_hf
    model = tiny_multimodal(config)
    folder = tmp_path_factory.mktemp("mm")
    model.save_pretrained(folder)
    ids = token_ids(config)
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids)).logits.double().numpy()
    # the text weights, renamed here by hand (independently of gemmalab's key map) for the reference
    text_weights = {
        "model." + k.removeprefix("model.language_model."): v.float().numpy()
        for k, v in model.state_dict().items()
        if k.startswith("model.language_model.")
    }
    return config, folder, ids, theirs, text_weights


@needs_backend
def test_model_layout_with_legacy_config(tiny_hf, tmp_path):
    config, hf, folder = tiny_hf
    copy = Path(shutil.copytree(folder, tmp_path / "legacy"))
    rewrite_config(copy, legacy_text_config)
    assert "layer_types" not in json.loads((copy / "config.json").read_text())
    ids = token_ids(config)
    model = gemmalab.load(copy, backend=BACKEND, dtype="float32", device="cpu")
    assert model.config.layer_types == config.layer_types
    assert relative_error(model.logits(ids), hf_logits(hf, ids)) < 1e-5


@needs_backend
def test_language_model_model_layout(multimodal):
    """What transformers 5 (and the first multimodal release) write: language_model.model.* keys."""
    config, folder, ids, theirs, text_weights = multimodal
    keys = load_file(folder / "model.safetensors").keys()
    assert any(k.startswith("language_model.model.") for k in keys)
    assert any(k.startswith("vision_tower.") for k in keys)
    model = gemmalab.load(folder, backend=BACKEND, dtype="float32", device="cpu")
    assert relative_error(model.logits(ids), theirs) < 1e-5
    assert relative_error(model.logits(ids), reference.forward(config, text_weights, ids)) < 1e-5


@needs_backend
def test_model_language_model_layout_with_sparse_legacy_config(multimodal, tmp_path):
    """What transformers 4.52-4.57 wrote: model.language_model.* keys, with a sparse 4.x text_config."""
    config, folder, ids, theirs, _ = multimodal
    renamed = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key.removeprefix("language_model.model.")
        else:
            key = "model." + key  # model.vision_tower.*, model.multi_modal_projector.*
        renamed[key] = value
    assert any(k.startswith("model.vision_tower.") for k in renamed)
    out = tmp_path / "mm-452"
    out.mkdir()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    text = legacy_text_config(config.to_hf_dict())
    text.pop("torch_dtype")
    sparse = {k: v for k, v in text.items() if k not in ("max_position_embeddings", "rms_norm_eps")}
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "float32",
        "text_config": {"model_type": "gemma3_text", **sparse}, "vision_config": {"model_type": "siglip_vision_model"},
    }))
    model = gemmalab.load(out, backend=BACKEND, dtype="float32", device="cpu")
    assert relative_error(model.logits(ids), theirs) < 1e-5


def test_vision_tensors_are_set_aside(multimodal):
    config, folder, *_ = multimodal
    weights = checkpoint.read_weights(folder, checkpoint.load_config(folder))
    assert set(weights) == set(gemmalab.params.parameter_shapes(config))
    assert weights.set_aside and all("vision_tower" in k or "multi_modal_projector" in k or "lm_head" in k for k in weights.set_aside)


def test_sharded_save_reloads_in_transformers_and_gemmalab(tiny_hf, tmp_path):
    _, hf, folder = tiny_hf
    config = checkpoint.load_config(folder)
    assert config.stored_dtype == "float32"
    weights = checkpoint.read_weights(folder, config)
    out = checkpoint.save_checkpoint(tmp_path / "sharded", config, weights, max_shard_bytes=200_000)
    index = json.loads((out / checkpoint.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == config.num_parameters() * 4
    ids = token_ids(config)
    again = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(hf_logits(again, ids), hf_logits(hf, ids))
    reread = checkpoint.read_weights(out, checkpoint.load_config(out))
    for name in weights:
        np.testing.assert_array_equal(reread[name], weights[name])


def test_convert_to_bf16_rounds_like_torch(tiny_hf, tmp_path):
    config, hf, folder = tiny_hf
    out = tmp_path / "bf16"
    subprocess.run([sys.executable, "-m", "gemmalab", "convert", str(folder), str(out), "--dtype", "bf16"], check=True)
    assert checkpoint.load_config(out).stored_dtype == "bfloat16"
    from safetensors.torch import load_file as load_torch

    converted = load_torch(out / "model.safetensors")
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        assert converted[name].dtype == torch.bfloat16
        torch.testing.assert_close(converted[name], tensor.to(torch.bfloat16), rtol=0, atol=0)


def test_save_refuses_to_overwrite_weights(tiny_hf, tmp_path):
    config, _, folder = tiny_hf
    weights = checkpoint.read_weights(folder, config)
    checkpoint.save_checkpoint(tmp_path / "out", config, weights)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="overwrite"):
        checkpoint.save_checkpoint(tmp_path / "out", config, weights)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


# --- the Hugging Face cache, offline -------------------------------------------------------------------
def _fake_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The documented hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


@needs_backend
def test_repo_id_loads_from_cache_offline(tiny_hf, tmp_path):
    """In a fresh process, as a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE are read at import."""
    config, hf, folder = tiny_hf
    _fake_cache(tmp_path / "hub", "someone/tiny-gemma", folder)
    ids = token_ids(config, seq=10)
    np.save(tmp_path / "ids.npy", ids)
    script = (
        "import sys, numpy as np, gemmalab\n"
        f"m = gemmalab.load('someone/tiny-gemma', backend={BACKEND!r}, dtype='float32', device='cpu')\n"
        "np.save(sys.argv[1], m.logits(np.load(sys.argv[2])))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy"), str(tmp_path / "ids.npy")], env=env, check=True)
    assert relative_error(np.load(tmp_path / "out.npy"), hf_logits(hf, ids)) < 1e-5


def test_missing_repo_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="gemmalab download someone/absent"):
        checkpoint.locate("someone/absent")


# --- bad input: each gives its own clear error through the API and the CLI ------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "bad"))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "gemma3_text", "hidden_size": ')


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _other_model(folder: Path) -> None:
    rewrite_config(folder, lambda c: {**c, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _wrong_shape(folder: Path) -> None:
    def edit(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:-1]

    _edit_tensors(folder, edit)


def _missing_tensor(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.pop("model.layers.4.self_attn.k_norm.weight"))


def _unexpected_tensor(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.update({"model.layers.99.extra.weight": np.zeros(3, np.float32)}))


BAD_INPUTS = {
    "truncated": (_truncate, CheckpointError, "model.safetensors is not a readable safetensors file.*truncated"),
    "not-json": (_not_json, ConfigError, "config.json is not valid JSON"),
    "no-weights": (_no_weights, CheckpointError, "has no \\*.safetensors weights"),
    "pickle-only": (_pickle_only, CheckpointError, "pytorch_model.bin.*safetensors only"),
    "other-model": (_other_model, ConfigError, "model_type 'llama' is not Gemma 3"),
    "wrong-shape": (_wrong_shape, CheckpointError, "model.layers.2.mlp.up_proj.weight .*shape \\[127, 64\\].*\\[128, 64\\]"),
    "missing-tensor": (_missing_tensor, CheckpointError, "missing tensors.*model.layers.4.self_attn.k_norm.weight"),
    "unexpected-tensor": (_unexpected_tensor, CheckpointError, "unexpected tensors.*model.layers.99.extra.weight"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_api_error(case, tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    bad = _copy(folder, tmp_path)
    damage, error, pattern = BAD_INPUTS[case]
    damage(bad)
    with pytest.raises(error, match=pattern):
        gemmalab.load(bad, backend=BACKEND or "torch", dtype="float32")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_cli_error(case, tiny_hf, tmp_path):
    _, _, folder = tiny_hf
    bad = _copy(folder, tmp_path)
    damage, _, pattern = BAD_INPUTS[case]
    damage(bad)
    before = sorted((p.name, p.stat().st_size) for p in bad.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "gemmalab", "convert", str(bad), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing half-written
    assert sorted((p.name, p.stat().st_size) for p in bad.iterdir()) == before  # the input is untouched


def test_debug_flag_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gemmalab", "--debug", "convert", str(tmp_path / "nothing"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "ModelNotFoundError" in result.stderr


def test_hf_weights_helper_matches_checkpoint(tiny_hf):
    """Guards the fixtures: the weights tests compare against are the ones on disk."""
    config, hf, folder = tiny_hf
    on_disk = checkpoint.read_weights(folder, config)
    for name, value in hf_weights(hf).items():
        np.testing.assert_array_equal(on_disk[name], value)


@pytest.mark.parametrize("shape", ["tiny", "tiny-mqa"])
def test_saved_checkpoint_loads_in_mlx_lm(shape, tmp_path):
    """mlx-lm is a peer, not an oracle: it rounds sqrt(hidden) to bf16 even in fp32 (exact for tiny's
    hidden 64, sqrt 8; 4e-4 off for tiny-mqa's 48), so the bound is that rounding, not 1e-5."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    mx = pytest.importorskip("mlx.core")
    config = SHAPES[shape]
    hf = make_hf_model(config)
    weights = hf_weights(hf)
    out = checkpoint.save_checkpoint(tmp_path / shape, config.with_dtype("float32"), weights)
    peer, _ = mlx_lm_utils.load_model(out)
    ids = token_ids(config)
    theirs = np.array(peer(mx.array(ids)).astype(mx.float32))
    assert relative_error(theirs, reference.forward(config, weights, ids)) < 1e-3


def test_read_into_fills_caller_memory_with_the_stored_tensor(tmp_path):
    # Oracle: safetensors' own numpy reader on the same file.
    import ml_dtypes

    rng = np.random.default_rng(0)
    stored = {
        "model.norm.weight": rng.normal(size=(64,)).astype(np.float32),
        "model.embed_tokens.weight": rng.normal(size=(7, 64)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(5, 3)).astype(np.float16),
    }
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = load_file(tmp_path / "model.safetensors")
    weights = checkpoint.Weights({name: (tmp_path / "model.safetensors", name) for name in stored})
    for name, value in expected.items():
        assert weights.stored_dtype(name) == value.dtype
        out = np.empty(value.shape, value.dtype)
        weights.read_into(name, out)
        assert out.tobytes() == value.tobytes(), name
    with pytest.raises(ValueError, match="float32 array of shape \\(64,\\)"):
        weights.read_into("model.norm.weight", np.empty((64,), np.float16))
    with pytest.raises(ValueError, match="shape \\(5, 3\\)"):
        weights.read_into("model.layers.0.mlp.up_proj.weight", np.empty((3, 5), np.float16))
