"""How exact is each backend? Logit error against the float64 numpy reference and against transformers.

    .venv/bin/python benchmarks/exactness.py            # table
    .venv/bin/python benchmarks/exactness.py --json     # for machines

For each installed backend, dtype and tiny shape: a random transformers Gemma3ForCausalLM (norm weights
randomised too), batch 2, a sequence 2.5 sliding windows long; error = max |diff| / max |reference|.
transformers runs in the same dtype as the row (loaded with from_pretrained(dtype=...)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers

import gemmalab
from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.config import Gemma3Config

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {
    "tiny": Gemma3Config.preset("tiny"),
    "tiny-mqa": Gemma3Config.preset("tiny-mqa"),
    "tiny-wide-heads": dataclasses.replace(  # the 270M's head layout (4 heads over 1 kv head of 256), toy width
        Gemma3Config.preset("tiny"), num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, rope_global=gemmalab.RopeSpec(1e6), name="tiny-wide-heads",
    ),
}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_model(config: Gemma3Config, seed: int = 0):
    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**fields)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return model


def measure() -> list[dict]:
    rows = []
    for shape, config in SHAPES.items():
        model = hf_model(config)
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, int(config.sliding_window * 2.5) + 3))
        expected = reference.forward(config, weights, ids)
        folder = tempfile.mkdtemp(prefix="gemmalab-exactness-")
        model.save_pretrained(folder)
        for dtype, torch_dtype in TORCH_DTYPES.items():
            # transformers in each dtype as its users get it: from_pretrained(dtype=...). (Casting a built
            # model with .to() also rounds buffers such as the RoPE frequencies, which would be unfair.)
            peer = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
            with torch.no_grad():
                theirs = peer(torch.as_tensor(ids)).logits.double().numpy()
            row = {"shape": shape, "dtype": dtype, "transformers_vs_ref": rel(theirs, expected)}
            for name in gemmalab.backends():
                backend = get_backend(name)
                native = backend.build(config, weights, dtype=dtype, device="cpu")
                ours = backend.logits(native, ids)
                row[f"{name}_vs_ref"] = rel(ours, expected)
                row[f"{name}_vs_transformers"] = rel(ours, theirs)
            rows.append(row)
        shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="max |logit error| / max |logit| (lower is better)")
    for column in rows[0]:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(v if isinstance(v, str) else f"{v:.1e}" for v in row.values()))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
