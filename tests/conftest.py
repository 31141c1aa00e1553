"""Shared fixtures: the installed backends, and tiny random Gemma 3 checkpoints written by transformers.

Every checkpoint here is made by the test run itself (no download): transformers' ``Gemma3ForCausalLM``
with random weights, its norm weights randomised too (transformers initialises them at zero, which
would hide a wrong norm), saved with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import gemmalab
from gemmalab.config import Gemma3Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BACKENDS = gemmalab.backends()

# The shapes the conformance suite runs on. Each covers details that have bitten other implementations.
SHAPES = {
    # GQA (4 heads over 2 kv heads), query_pre_attn_scalar 24 != head_dim 16, linear RoPE x8 on the global layer
    "tiny": Gemma3Config.preset("tiny"),
    # multi-query (1 kv head), 7 layers (LLLLLGL: a local layer after the global one), window 5
    "tiny-mqa": Gemma3Config.preset("tiny-mqa"),
    # untied output head and final logit soft-capping, both supported by the format though Gemma 3 uses neither
    "untied-softcap": dataclasses.replace(
        Gemma3Config.preset("tiny"), tie_word_embeddings=False, final_logit_softcapping=3.0, name="untied-softcap"
    ),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS or [pytest.param(None, marks=pytest.mark.skip("no backend"))])


def hf_text_config(config: Gemma3Config):
    """transformers' config for ``config``, through the config.json gemmalab writes (so it is tested too)."""
    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return transformers.Gemma3TextConfig(**fields)


def make_hf_model(config: Gemma3Config, seed: int = 0):
    """A float32 transformers Gemma3ForCausalLM with random weights, norms included, in eval mode."""
    torch.manual_seed(seed)
    return randomize_norms(transformers.Gemma3ForCausalLM(hf_text_config(config)).float().eval())


def randomize_norms(model):
    """Norm weights ~ N(0, 0.3) in place: transformers starts them at zero, which would hide a wrong norm."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return model


def hf_weights(model) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy under their HF names (the tied head once)."""
    tied = model.config.tie_word_embeddings
    return {
        name: tensor.detach().float().numpy().copy()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.double().numpy()


def token_ids(config: Gemma3Config, batch: int = 2, seq: int | None = None, seed: int = 0) -> np.ndarray:
    """Random ids, longer than 2.5 sliding windows by default so the window and its edges are exercised."""
    seq = seq or int(config.sliding_window * 2.5) + 3
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, seq))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def rewrite_config(folder: Path, update) -> None:
    """Apply ``update(dict) -> dict`` to folder/config.json."""
    path = folder / "config.json"
    path.write_text(json.dumps(update(json.loads(path.read_text()))))


def randomized_peft(hf_base, config, seed: int = 0):
    """PEFT's ``get_peft_model`` over a copy of ``hf_base`` with ``config`` (a peft.LoraConfig), its B ~ N(0, 0.2)
    and any DoRA magnitude scaled by U(0.7, 1.3): an adapter whose every part changes the logits."""
    import copy

    import peft

    model = peft.get_peft_model(copy.deepcopy(hf_base), config)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.from_numpy(rng.normal(0, 0.2, tuple(param.shape)).astype(np.float32)))
            if "lora_magnitude_vector" in name:
                param.mul_(torch.from_numpy(rng.uniform(0.7, 1.3, tuple(param.shape)).astype(np.float32)))
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(config, transformers model, checkpoint folder) for the tiny preset, saved once per session."""
    config = SHAPES["tiny"]
    model = make_hf_model(config)
    folder = save_hf(model, tmp_path_factory.mktemp("tiny-hf"))
    return config, model, folder
