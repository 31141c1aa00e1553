"""lora-tiny: what does a LoRA adapter give up against full fine-tuning, for how much less to store? A `tiny`
model is first trained on the embedded corpus (the "pretrained" base); the experiment then writes a chat
JSONL of a small assistant (it greets the user by the name they gave and answers questions about animals from
one fixed table) and fine-tunes the base on it twice, at the same steps, batch, data and seed:

* full fine-tuning: every parameter trains (``gemmalab train --model BASE``);
* LoRA: the base is frozen and an adapter on every block linear trains (``--lora rank=...``).

The headline is each one's held-out loss on the chat replies (windows neither run trained on), beside the
base's own, and what each run has to store: the adapter file against a full checkpoint.

    gemmalab experiments run lora-tiny [--out DIR] [--set lora.rank=4] [--set finetune.steps=600]
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import gemmalab
from gemmalab.backend import resolve_backend_name
from gemmalab.experiments import Experiment
from gemmalab.experiments.plots import columns, line_plot
from gemmalab.experiments.progress import step_reporter
from gemmalab.lora import LoraConfig
from gemmalab.train import TrainConfig, train
from gemmalab.train.evaluation import perplexity, plan_eval

SECTIONS = ("base", "chat", "finetune", "full", "lora")

# The assistant's world: what each animal eats and where it lives (what the adapter must learn).
ANIMALS = {
    "otter": ("fish", "rivers"), "camel": ("dry grass", "deserts"), "panda": ("bamboo", "mountain forests"),
    "koala": ("eucalyptus leaves", "gum trees"), "heron": ("frogs", "marshes"), "badger": ("earthworms", "burrows"),
    "walrus": ("clams", "arctic ice"), "lemur": ("fruit", "Madagascar"), "bison": ("prairie grass", "plains"),
    "gecko": ("crickets", "warm walls"), "puffin": ("sand eels", "sea cliffs"), "tapir": ("river plants", "rainforests"),
}
NAMES = ("Ada", "Bo", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia", "Max", "Nia", "Oto",
         "Pia", "Raj", "Sol", "Tea", "Uma", "Vik", "Wen", "Yui", "Zed")


def conversation(rng: random.Random) -> dict[str, Any]:
    """One chat: the user gives a name and asks what an animal eats or where it lives; the assistant greets
    them by that name and answers from ANIMALS."""
    name, animal = rng.choice(NAMES), rng.choice(sorted(ANIMALS))
    food, home = ANIMALS[animal]
    if rng.random() < 0.5:
        question, answer = f"What does the {animal} eat?", f"The {animal} eats {food}."
    else:
        question, answer = f"Where does the {animal} live?", f"The {animal} lives in {home}."
    return {"messages": [{"role": "user", "content": f"Hi, I am {name}. {question}"},
                         {"role": "assistant", "content": f"Hello {name}! {answer}"}]}


def write_chats(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(count)), encoding="utf-8")
    return path


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    common = {k: v for k, v in settings.items() if k not in SECTIONS}
    base_config = TrainConfig.from_dict({**common, **settings["base"], "out": str(out / "base")})
    backend = resolve_backend_name(base_config.backend)
    curves: dict[str, list[tuple[int, float]]] = {"full": [], "lora": []}

    log(f"1/3: pretraining the base ({base_config.preset}, {base_config.steps} steps on the embedded corpus, {backend})")
    base = train(base_config, progress=False, echo=log,
                 on_step=step_reporter(progress, "base", base_config.steps)).checkpoint

    chats = write_chats(out / "chats.jsonl", settings["chat"]["conversations"], settings["seed"])
    tune = {**common, **settings["finetune"], "model": str(base), "data": str(chats)}
    full_config = TrainConfig.from_dict({**tune, **settings["full"], "out": str(out / "full")})
    lora_settings = LoraConfig.from_dict(settings["lora"]["adapter"])
    lora_config = TrainConfig.from_dict({**tune, **{k: v for k, v in settings["lora"].items() if k != "adapter"},
                                         "lora": lora_settings.describe(), "out": str(out / "lora")})

    def held_out(name: str):
        def on_step(record: dict) -> None:
            if "eval_loss" in record:
                curves[name].append((record["step"], record["eval_loss"]))
        return on_step

    def both(*callbacks):
        return lambda record: [callback(record) for callback in callbacks]

    log(f"2/3: full fine-tuning on {chats.name} ({full_config.steps} steps, lr {full_config.lr:g})")
    full = train(full_config, progress=False, echo=log, on_step=both(
        step_reporter(progress, "full fine-tuning", full_config.steps), held_out("full")))
    log(f"3/3: LoRA ({lora_settings.describe()}) on the frozen base ({lora_config.steps} steps, lr {lora_config.lr:g})")
    adapted = train(lora_config, progress=False, echo=log, on_step=both(
        step_reporter(progress, "LoRA", lora_config.steps), held_out("lora")))
    for name, result in (("full", full), ("lora", adapted)):
        curves[name].append((result.steps, result.eval_loss))

    # the base on the same held-out windows (the fine-tuning runs' split of the chat file)
    plan = plan_eval(full.checkpoint)
    base_loss = perplexity(gemmalab.load(base, backend=backend), plan=plan).loss
    model = gemmalab.load(base, backend=backend, adapter=adapted.checkpoint)
    adapter_parameters = sum(a.size for parts in model.adapter().tensors.values() for a in parts.values())
    full_parameters = model.config.num_parameters()
    adapter_bytes = folder_bytes(adapted.checkpoint, "adapter_model.safetensors")
    full_bytes = folder_bytes(full.checkpoint, "model*.safetensors")

    plot = line_plot(
        out / "loss.png",
        {"full fine-tuning": columns(curves["full"]),
         f"LoRA (rank {lora_settings.rank}, {len(lora_settings.targets)} kinds of linear)": columns(curves["lora"]),
         "base, not fine-tuned": columns([(0, base_loss), (max(full.steps, adapted.steps), base_loss)])},
        title=f"lora-tiny: held-out loss on the chat replies ({backend})",
        xlabel="fine-tuning step", ylabel="held-out loss (nats per reply token)", log_y=True,
    )
    return {
        "eval_loss_full": full.eval_loss,
        "eval_loss_lora": adapted.eval_loss,
        "eval_loss_base": base_loss,
        "adapter_bytes": adapter_bytes,
        "full_checkpoint_bytes": full_bytes,
        "adapter_parameters": adapter_parameters,
        "model_parameters": full_parameters,
        "lora": lora_settings.describe(),
        "curve_full": curves["full"],
        "curve_lora": curves["lora"],
        "backend": backend,
        "base_checkpoint": str(base),
        "lora_checkpoint": str(adapted.checkpoint),
        "plot": plot.name,
    }


EXPERIMENT = Experiment(
    name="lora-tiny",
    summary="LoRA against full fine-tuning of a trained tiny model on a chat JSONL: held-out loss, adapter size.",
    config="configs/lora-tiny.yaml",
    expected="about 2 minutes on PyTorch (2 CPU cores)",
    run=run,
    headline=("eval_loss_full", "eval_loss_lora", "eval_loss_base", "adapter_bytes", "full_checkpoint_bytes",
              "backend"),
    smoke={
        "base.steps": 4,
        "finetune.steps": 3,
        "finetune.eval_every": 0,
        "chat.conversations": 40,
        "batch_size": 2,
        "seq_len": 64,
        "eval_batches": 1,
    },
)
