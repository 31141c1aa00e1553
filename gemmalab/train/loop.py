"""The training loop, once for every backend: steps, accumulation, schedules, layer scales, fp16 loss
scaling, evaluation, checkpoints, tracking and progress. The backend's trainer does the tensor work
(gemmalab/train/spec.py); everything here is plain Python and numpy.

A run is resumable bit for bit: everything that decides the next step -- weights, optimizer state, the
data position, the loss scale -- is in the checkpoint, the learning rate and layer scales are functions of
the step, and the data order is a function of the seed and epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as hf_checkpoint
from ..api import preset_tokenizer
from ..backend import get_backend, resolve_backend_name
from ..bench import process_peak_rss
from ..config import Gemma3Config, resolve_config
from ..errors import CheckpointError, ConfigError, TrainingError
from ..params import init_weights
from ..tokenizer import Tokenizer
from . import checkpoints
from .config import TrainConfig
from .data import DataStream, load_documents, pack
from .layers import lr_scales
from .schedules import Schedule
from .tracking import Tracker

# fp16 dynamic loss scaling (as torch.amp.GradScaler): halve on overflow, double after this many good steps.
LOSS_SCALE_GROWTH_INTERVAL = 2000
# Settings that may differ between a run and its resumption (the others must match the checkpoint).
RESUMABLE_CHANGES = {"steps", "resume", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints", "tensorboard", "aim", "device", "out"}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)


def warmup_for(config: TrainConfig) -> tuple[int, str | None]:
    """The warmup length actually used, and a note when the configured one does not fit the run."""
    if config.warmup_steps < config.steps // 2 or config.warmup_steps == 0:
        return config.warmup_steps, None
    used = config.steps // 10
    return used, f"warmup_steps {config.warmup_steps} would take half the run or more; using {used} (a tenth of it)"


def _model_source(config: TrainConfig) -> tuple[Gemma3Config, dict | None, Tokenizer | None]:
    """(model config, starting weights or None for random init, tokenizer)."""
    if config.model is not None:
        folder = hf_checkpoint.locate(config.model)
        model_config = hf_checkpoint.load_config(folder)
        tokenizer = Tokenizer.from_folder(folder)
        if tokenizer is None:
            raise ConfigError(f"{folder} has no tokenizer.json or tokenizer.model: training needs one")
        return model_config, hf_checkpoint.read_weights(folder, model_config), tokenizer
    model_config = resolve_config(config.preset)
    tokenizer = preset_tokenizer(model_config) or Tokenizer.byte_level()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"preset {config.preset} has {model_config.vocab_size} ids, fewer than the byte-level 261")
    return model_config, None, tokenizer


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise TrainingError(
            f"--resume with different settings ({', '.join(changed)}): resume with the run's own settings "
            f"(they are in its checkpoints' trainer_state.json) or start a new run in another --out"
        )


class Progress:
    """A rich progress bar with loss, tokens/s, learning rate, memory and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, stats="")
            self._bar.start()

    def update(self, step: int, stats: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def evaluate(backend, native, stream: DataStream, config: TrainConfig) -> float | None:
    """Mean held-out loss per trained token (None when there is no held-out data)."""
    total, tokens = 0.0, 0
    for batch in stream.eval_batches(config.batch_size, config.eval_batches):
        total += backend.loss_sum(native, batch.inputs, batch.targets, batch.weights,
                                  chunk_tokens=config.loss_chunk_tokens)
        tokens += batch.tokens
    return total / tokens if tokens else None


def train(config: TrainConfig, *, progress: bool = True, echo=print) -> TrainResult:
    """Run (or resume) the training ``config`` describes. Returns where it wrote and what it reached."""
    run_dir = Path(config.out).expanduser()
    resume_from = checkpoints.latest(run_dir) if config.resume else None
    if not config.resume and checkpoints.complete_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    saved_state = checkpoints.read_state(resume_from) if resume_from is not None else None
    if saved_state is not None:
        _check_resumable(saved_state["config"], config)
        if saved_state["step"] >= config.steps:
            raise TrainingError(f"{resume_from} is already at step {saved_state['step']} of {config.steps}: "
                                "raise --steps to train further")
    elif config.resume:
        echo(f"no checkpoint in {run_dir} yet: starting from step 0")

    model_config, weights, tokenizer = _model_source(config)
    if resume_from is not None:
        weights = hf_checkpoint.read_weights(resume_from, model_config)
    elif weights is None:
        weights = init_weights(model_config, seed=config.seed, dtype="float32")
    backend_name = resolve_backend_name(config.backend)
    backend = get_backend(backend_name)
    native = backend.build(model_config, weights, dtype="float32", device=config.device)
    del weights
    trainer = backend.trainer(native, config.train_spec())

    windows, trained = pack(load_documents(config.data), tokenizer, config.seq_len)
    stream = DataStream(windows, trained, seed=config.seed, eval_fraction=config.eval_fraction)
    warmup, note = warmup_for(config)
    if note:
        echo(note)
    schedule = Schedule(config.schedule, config.lr, config.steps, warmup, config.min_lr)

    step, loss_scale, good_steps = 0, (config.loss_scale if config.precision == "fp16" else 1.0), 0
    if saved_state is not None:
        try:
            trainer.load_optimizer_state(checkpoints.read_optimizer_state(resume_from))
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{resume_from} optimizer state does not fit this model ({err})") from None
        stream.restore(saved_state["data"])
        step, loss_scale, good_steps = saved_state["step"], saved_state["loss_scale"], saved_state["good_steps"]
        echo(f"resuming from {resume_from} (step {step})")

    tracker = Tracker(run_dir, resume_step=step if saved_state is not None else None,
                      tensorboard=config.tensorboard, aim=config.aim, hparams=config.to_dict())
    bar = Progress(config.steps, step, progress)
    result = TrainResult(run_dir, step, None, None, resume_from)
    scales_key = None
    tokens_seen, started = 0, time.perf_counter()

    def save_checkpoint() -> Path:
        state = {"loss_scale": loss_scale, "good_steps": good_steps, "data": stream.state(),
                 "backend": backend_name, "config": config.to_dict()}
        return checkpoints.save(run_dir, step, config=model_config, weights=backend.weights(trainer.model),
                                optimizer_state=trainer.optimizer_state(), state=state, tokenizer=tokenizer,
                                keep_last=config.keep_checkpoints)

    try:
        while step < config.steps:
            scales = lr_scales(model_config, step, layer_decay=config.layer_lr_decay,
                               unfreeze_every=config.unfreeze_every, unfreeze_blocks=config.unfreeze_blocks)
            key = tuple(sorted(scales.items()))
            if key != scales_key:
                trainer.set_lr_scales(scales)
                scales_key = key
            # The backend differentiates a loss *sum*, so its gradients are ~tokens times those of the mean
            # loss that loss scales are usually chosen for: scale per position in a micro-batch instead.
            factor = loss_scale / (config.batch_size * config.seq_len) if config.precision == "fp16" else 1.0
            loss_sum, tokens = 0.0, 0
            for _ in range(config.grad_accum):
                batch = stream.next_batch(config.batch_size)
                loss_sum += trainer.accumulate(batch.inputs, batch.targets, batch.weights, loss_scale=factor)
                tokens += batch.tokens
            lr = schedule(step)
            update = trainer.apply(lr, max(tokens, 1) * factor)
            loss = loss_sum / max(tokens, 1)
            grad_norm = update["grad_norm"]  # of the unscaled gradient: the normalizer divided the scale out
            overflow = not math.isfinite(grad_norm)
            skipped = config.precision == "fp16" and overflow and math.isfinite(loss)
            if skipped:
                loss_scale, good_steps = loss_scale / 2, 0  # the backend updated nothing; try again smaller
            elif not math.isfinite(loss) or overflow:
                last = checkpoints.latest(run_dir)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise TrainingError(
                    f"loss became {loss} at step {step + 1} (gradient norm {grad_norm}): stopped; {kept}. "
                    "Lower --lr, keep gradient clipping on, or use --set precision=fp32"
                )
            elif config.precision == "fp16":
                good_steps += 1
                if good_steps % LOSS_SCALE_GROWTH_INTERVAL == 0:
                    loss_scale *= 2
            step += 1
            tokens_seen += tokens
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0}
            if config.precision == "fp16":
                record.update(loss_scale=loss_scale, skipped=skipped)
            result.final_loss = loss
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                record.update(_eval_record(backend, trainer.model, stream, config))
            if step % config.log_every == 0 or step == config.steps:
                memory = backend.peak_memory(trainer.model) or process_peak_rss()
                record["peak_memory_gb"] = memory / 1e9
                tracker.log(record)
                result.history.append(record)
            bar.update(step, f"loss {loss:.4f}  {record['tokens_per_s']:,.0f} tok/s  lr {lr:.2e}  "
                             f"mem {process_peak_rss() / 1e9:.2f} GB")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                result.checkpoint = save_checkpoint()
        final = {"step": step, **_eval_record(backend, trainer.model, stream, config)}
        if "eval_loss" in final:
            tracker.log(final)
            result.history.append(final)
            result.eval_loss = final["eval_loss"]
        result.checkpoint = save_checkpoint()
        result.steps = step
    finally:
        bar.close()
        tracker.close()
    return result


def _eval_record(backend, native, stream: DataStream, config: TrainConfig) -> dict:
    loss = evaluate(backend, native, stream, config)
    if loss is None:
        return {}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


__all__ = ["TrainResult", "evaluate", "train", "warmup_for"]
