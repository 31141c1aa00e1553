"""Config presets and parsing of the config.json forms found in the wild.

The oracles: the published numbers (written out below from the google/gemma-3-* config.json files and the
Gemma 3 technical report), and transformers' own Gemma3TextConfig parsing the same dicts.
"""

from __future__ import annotations

import copy
import math

import pytest
from conftest import hf_text_config, torch, transformers

from gemmalab import Gemma3Config
from gemmalab.config import FULL, SLIDING
from gemmalab.errors import ConfigError

# (hidden, mlp, layers, heads, kv heads, head_dim, query_pre_attn_scalar, window, vocab, global RoPE factor)
PUBLISHED = {
    "gemma-3-270m": (640, 2048, 18, 4, 1, 256, 256, 512, 262144, 1.0),
    "gemma-3-1b": (1152, 6912, 26, 4, 1, 256, 256, 512, 262144, 1.0),
    "gemma-3-4b": (2560, 10240, 34, 8, 4, 256, 256, 1024, 262208, 8.0),
    "gemma-3-12b": (3840, 15360, 48, 16, 8, 256, 256, 1024, 262208, 8.0),
    "gemma-3-27b": (5376, 21504, 62, 32, 16, 128, 168, 1024, 262208, 8.0),
}

# config.json files as published (abridged to the fields that matter, forms kept exactly).
CONFIG_270M_TF455 = {  # text-only, transformers 4.55: layer_types AND 4.x rope fields
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "_sliding_window_pattern": 6,
    "attention_bias": False, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "torch_dtype": "bfloat16", "use_bidirectional_attention": False, "vocab_size": 262144,
}
CONFIG_1B_TF450 = {  # text-only, transformers 4.50: sliding_window_pattern, no layer_types
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144,
}
VISION = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}
def _multimodal(text_config):  # noqa: E302  the sparse 4B/12B/27B form: defaults fill the gaps
    return {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
            "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
            "text_config": text_config, "torch_dtype": "bfloat16", "vision_config": VISION}
CONFIG_4B = _multimodal({"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                         "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                         "sliding_window": 1024})
CONFIG_12B = _multimodal({"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                          "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                          "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024})
CONFIG_27B = _multimodal({"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
                          "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
                          "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 1024})
CONFIG_4B_TF5 = {  # transformers 5.x: layer_types and rope_parameters keyed by layer type, under text_config
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 1024, "vocab_size": 262208,
        "layer_types": [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "vision_config": VISION,
}

WILD = {
    "gemma-3-270m": CONFIG_270M_TF455,
    "gemma-3-1b": CONFIG_1B_TF450,
    "gemma-3-4b": CONFIG_4B,
    "gemma-3-12b": CONFIG_12B,
    "gemma-3-27b": CONFIG_27B,
}


def _shape(config: Gemma3Config):
    return (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.query_pre_attn_scalar, config.sliding_window,
            config.vocab_size, config.rope_global.factor)


def _expected_layer_types(n):
    return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_carry_the_published_numbers(name):
    config = Gemma3Config.preset(name)
    assert _shape(config) == PUBLISHED[name]
    assert config.layer_types == _expected_layer_types(config.num_hidden_layers)
    assert (config.rope_local.theta, config.rope_local.factor) == (10_000.0, 1.0)  # scaling on global layers only
    assert config.rope_global.theta == 1_000_000.0
    assert config.tie_word_embeddings


@pytest.mark.parametrize("name", list(WILD))
def test_published_config_json_parses_to_the_preset(name):
    config = Gemma3Config.from_hf_dict(copy.deepcopy(WILD[name]))
    assert _shape(config) == PUBLISHED[name]
    assert config.layer_types == _expected_layer_types(config.num_hidden_layers)
    assert config.rope_local == Gemma3Config.preset(name).rope_local
    assert config.rope_global == Gemma3Config.preset(name).rope_global
    assert config.stored_dtype == "bfloat16"


def test_multimodal_configs_inherit_stop_ids_from_the_wrapper():
    assert Gemma3Config.from_hf_dict(CONFIG_4B).eos_token_ids == (1, 106)
    assert Gemma3Config.from_hf_dict(CONFIG_1B_TF450).eos_token_ids == (1, 106)
    assert Gemma3Config.from_hf_dict(CONFIG_270M_TF455).eos_token_ids == (1,)


def test_transformers_5_form_parses_like_the_4x_form():
    assert _shape(Gemma3Config.from_hf_dict(CONFIG_4B_TF5)) == _shape(Gemma3Config.from_hf_dict(CONFIG_4B))
    assert Gemma3Config.from_hf_dict(CONFIG_4B_TF5).rope_global == Gemma3Config.from_hf_dict(CONFIG_4B).rope_global


@pytest.mark.parametrize("raw", [CONFIG_1B_TF450, CONFIG_4B, CONFIG_27B, CONFIG_4B_TF5], ids=["1b", "4b", "27b", "4b-tf5"])
def test_parsing_agrees_with_transformers(raw):
    """transformers' own reading of the same dict is the oracle for defaults and derived fields."""
    text = raw.get("text_config", raw)
    text = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    theirs = transformers.Gemma3TextConfig(**copy.deepcopy(text))
    ours = Gemma3Config.from_hf_dict(raw)
    assert list(ours.layer_types) == list(theirs.layer_types)
    assert ours.vocab_size == theirs.vocab_size
    assert ours.num_attention_heads == theirs.num_attention_heads
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    assert ours.rope_global.theta == theirs.rope_parameters[FULL]["rope_theta"]
    assert ours.rope_local.theta == theirs.rope_parameters[SLIDING]["rope_theta"]
    assert ours.rope_global.factor == theirs.rope_parameters[FULL].get("factor", 1.0)
    assert theirs.rope_parameters[SLIDING]["rope_type"] == "default"


@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-4b", "gemma-3-27b", "tiny", "tiny-mqa"])
def test_written_config_round_trips_and_transformers_reads_it(name):
    config = Gemma3Config.preset(name)
    written = config.to_hf_dict()
    assert Gemma3Config.from_hf_dict(written) == config
    theirs = hf_text_config(config)
    assert list(theirs.layer_types) == list(config.layer_types)
    assert theirs.rope_parameters[FULL].get("factor", 1.0) == config.rope_global.factor
    assert theirs.query_pre_attn_scalar == config.query_pre_attn_scalar
    # the 4.x fields alone (what older transformers and mlx-lm read) describe the same model
    legacy = {k: v for k, v in written.items() if k not in ("layer_types", "rope_parameters")}
    assert Gemma3Config.from_hf_dict(legacy) == config


@pytest.mark.parametrize("name", list(PUBLISHED) + ["tiny", "tiny-mqa"])
def test_parameter_count_equals_transformers(name):
    """Counted from shapes alone; transformers builds the same config on the meta device (no memory)."""
    config = Gemma3Config.preset(name)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(hf_text_config(config))
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())  # tied head counted once


def test_embed_scale_rounds_like_transformers():
    config = Gemma3Config.preset("gemma-3-270m")
    assert config.embed_scale("float32") == pytest.approx(math.sqrt(640), rel=1e-7)
    assert config.embed_scale("bfloat16") == torch.tensor(math.sqrt(640)).to(torch.bfloat16).item() == 25.25
    assert config.embed_scale("float16") == torch.tensor(math.sqrt(640)).to(torch.float16).item()


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"model_type": "llama", "hidden_size": 8}, "not Gemma 3"),
        ({"model_type": "gemma2"}, "not Gemma 3"),
        ({**CONFIG_1B_TF450, "layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
        ({**CONFIG_1B_TF450, "layer_types": ["chunked_attention"] * 26}, "unknown entries"),
        ({**CONFIG_1B_TF450, "num_key_value_heads": 3}, "not a multiple"),
        ({**CONFIG_1B_TF450, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({**CONFIG_1B_TF450, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({**CONFIG_1B_TF450, "use_bidirectional_attention": True}, "EmbeddingGemma"),
        ({**CONFIG_1B_TF450, "hidden_size": "big"}, "hidden_size"),
        ({**CONFIG_1B_TF450, "torch_dtype": "int8"}, "dtype"),
    ],
)
def test_bad_configs_name_the_field(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Gemma3Config.from_hf_dict(raw)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="gemma-3-270m"):
        Gemma3Config.preset("gemma-3-2b")
