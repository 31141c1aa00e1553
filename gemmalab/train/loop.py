"""The training loop, once for every backend: steps, accumulation, schedules, layer scales, fp16 loss
scaling, evaluation, checkpoints, tracking and progress. The backend's trainer does the tensor work
(gemmalab/train/spec.py); everything here is plain Python and numpy.

A run is resumable bit for bit: everything that decides the next step -- weights, optimizer state, the
data position, the loss scale -- is in the checkpoint, the learning rate and layer scales are functions of
the step, and the data order is a function of the seed and epoch. The optimizer state is in the names of
gemmalab/train/spec.py, so a run may also resume on another backend, continuing to float rounding.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import checkpoint as hf_checkpoint
from ..backend import get_backend, resolve_backend_name
from ..bench import process_peak_rss
from ..checkpoint import atomic_write_bytes
from ..errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from ..lora import attached_adapter
from ..outputs import check_writable_folder, writing
from ..params import init_weights
from . import checkpoints, transfer
from .adapter_run import adapter_lr_scales, quantize_base, start_adapter
from .config import TrainConfig
from .data import DataStream, load_documents, pack
from .layers import lr_scales
from .losses import perplexity_from_loss
from .objective import Objective
from .schedules import Cycles, warmup_steps_for
from .tracking import Tracker

# fp16 dynamic loss scaling (as torch.amp.GradScaler): halve on overflow, double after this many good steps.
LOSS_SCALE_GROWTH_INTERVAL = 2000
# Settings that may differ between a run and its resumption; every other one would change the schedule,
# the data order or the model, and must match the run. (`steps` may grow with `extend`, checked on its own;
# the backend may change: the optimizer state is in names every backend reads, gemmalab/train/spec.py.)
RESUMABLE_CHANGES = {"steps", "resume", "extend", "backend", "eval_every", "eval_batches", "log_every",
                     "checkpoint_every", "keep_checkpoints", "tensorboard", "aim", "device", "out"}
# Not carried over from a run's saved settings into its resumption: what the resuming command itself says.
NOT_INHERITED = ("resume", "extend", "backend")
RUN_SETTINGS_FILE = "config.yaml"  # the run's settings, written when it starts (before any checkpoint)


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
    used = warmup_steps_for(config.warmup_steps, config.steps)
    if used == config.warmup_steps:
        return used, None
    return used, f"warmup_steps {config.warmup_steps} would take half the run or more; using {used} (a tenth of it)"


def saved_settings(run_dir: Path) -> dict | None:
    """The settings a run in ``run_dir`` was started with (its newest checkpoint's, else its config.yaml),
    without the keys a resuming command decides for itself; None when the folder holds no run."""
    last = checkpoints.latest(run_dir)
    return _settings(run_dir, checkpoints.read_state(last) if last is not None else None)


def _settings(run_dir: Path, state: dict | None) -> dict | None:
    """saved_settings, given the newest checkpoint's state (None: there is none, read config.yaml)."""
    if state is not None:
        settings = state["config"]
    elif (run_dir / RUN_SETTINGS_FILE).is_file():
        try:
            settings = yaml.safe_load((run_dir / RUN_SETTINGS_FILE).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TrainingError(f"{run_dir / RUN_SETTINGS_FILE} is unreadable ({err}): fix it, or start a new run") from None
    else:
        return None
    return {k: v for k, v in settings.items() if k not in NOT_INHERITED}


def _write_settings(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "# The settings of this run (gemmalab train); `gemmalab train --out DIR --resume` reads them.\n"
    text += yaml.safe_dump({k: v for k, v in config.to_dict().items() if k not in NOT_INHERITED}, sort_keys=False)
    atomic_write_bytes(run_dir / RUN_SETTINGS_FILE, text.encode("utf-8"))


def _check_resumable(saved: dict, config: TrainConfig, run_dir: Path) -> None:
    changed = [k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if changed:
        what = ", ".join(f"{k} (the run has {saved[k]!r}, this command {getattr(config, k)!r})" for k in changed)
        raise TrainingError(
            f"--resume cannot change {what}: they set the schedule, data order or model; resume with the run's "
            f"own settings ({run_dir / RUN_SETTINGS_FILE}), or start a new run in another --out"
        )


def _resume_backend(requested: str | None, writer: str) -> str:
    """The backend a resumption runs on: the one that wrote the run's newest checkpoint, unless --backend
    or $GEMMALAB_BACKEND chooses one (any backend reads any backend's optimizer state)."""
    if not requested and not os.environ.get("GEMMALAB_BACKEND"):
        return writer
    return resolve_backend_name(requested)


@dataclass
class RunPlan:
    """Where a run starts: the checkpoint it resumes from (None for step 0), that checkpoint's state, the
    backend, and the schedule's cycles."""

    resume_from: Path | None
    state: dict | None
    backend: str
    cycles: Cycles


def plan_run(run_dir: Path, config: TrainConfig, echo=print) -> RunPlan:
    """Decide how ``config`` starts in ``run_dir``, refusing what would not be what it says."""
    fresh = Cycles(config.schedule, config.lr, (0, config.steps), config.warmup_steps, config.min_lr)
    if not config.resume:
        if checkpoints.complete_checkpoints(run_dir):
            raise TrainingError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        return RunPlan(None, None, resolve_backend_name(config.backend), fresh)
    resume_from = checkpoints.latest(run_dir)
    state = checkpoints.read_state(resume_from) if resume_from is not None else None
    settings = _settings(run_dir, state)
    if settings is None:
        raise TrainingError(
            f"--resume: {run_dir} holds no run to resume (no checkpoint, no {RUN_SETTINGS_FILE}): check --out, "
            "or leave out --resume to start a new run there"
        )
    _check_resumable(settings, config, run_dir)
    if state is None:
        # killed before its first checkpoint: no optimizer state yet, so any backend can start it
        echo(f"no checkpoint in {run_dir} yet: starting from step 0 with the run's settings")
        return RunPlan(None, None, resolve_backend_name(config.backend), fresh)
    backend = _resume_backend(config.backend, state["backend"])
    bounds = tuple(state.get("schedule_bounds") or (0, state["config"]["steps"]))
    cycles = Cycles(config.schedule, config.lr, bounds, config.warmup_steps, config.min_lr)
    if config.steps != cycles.total:
        if not config.extend:
            raise TrainingError(
                f"--steps {config.steps} is not the run's {cycles.total}, and changing it would redraw the learning-rate "
                f"schedule: leave --steps out to finish the run, or add --extend to train to {config.steps} "
                "with the extra steps as a new schedule cycle (warm restart)"
            )
        if config.steps < cycles.total:
            raise TrainingError(f"--extend cannot shorten the run from {cycles.total} to {config.steps} steps: "
                                f"give a larger --steps, or start a new run from {resume_from}")
        cycles = cycles.extended(config.steps)
        echo(f"extending the run from {bounds[-1]} to {config.steps} steps: a new {config.schedule} cycle "
             f"(warmup {warmup_steps_for(config.warmup_steps, config.steps - bounds[-1])}) over the extra steps")
    if state["step"] >= config.steps:
        raise TrainingError(f"{resume_from} is already at step {state['step']} of {config.steps}: to train further, "
                            f"add --extend --steps N with N > {config.steps}")
    if backend != state["backend"]:
        echo(f"{resume_from} was written by the {state['backend']} backend: going on with {backend}, which "
             "continues the same optimizer state to float rounding (bit for bit only on the writer's backend)")
    return RunPlan(resume_from, state, backend, cycles)


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


class _StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the step in progress (so the optimizer never holds half
    an update); a second one stops at once. Only the main thread can take signals: elsewhere this does
    nothing and Ctrl-C keeps Python's behaviour."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstopping after this step and keeping a checkpoint (Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress_line(step: int, total: int, record: dict, started_step: int, elapsed: float) -> str:
    """One plain progress line, for logs that are not a terminal (a file, nohup, a batch scheduler)."""
    done = step - started_step
    eta = elapsed / done * (total - step) if done > 0 else 0.0
    minutes, seconds = divmod(int(round(eta)), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s  eta {hours}:{minutes:02d}:{seconds:02d}")


def train(config: TrainConfig, *, progress: bool = True, echo=print, log_lines: bool = False,
          on_step: Callable[[dict], None] | None = None, objective: Objective | None = None) -> TrainResult:
    """Run (or resume) the training ``config`` describes. Returns where it wrote and what it reached.

    ``progress`` shows a rich bar; ``log_lines`` prints a plain line every ``log_every`` steps instead
    (for output that is not a terminal); ``on_step(record)`` is called after every step with its record
    (step, loss, lr, tokens/s, and the evaluation figures on evaluation steps), for a caller's own view.
    ``objective`` says what the run optimises beyond plain next-token training (gemmalab.train.objective;
    distillation passes its own). Ctrl-C stops after the step in progress, writes a checkpoint and raises
    RunInterrupted, whose message says how to resume."""
    objective = objective or Objective()
    run_dir = check_writable_folder(config.out, what="run folder", fix="choose another --out")
    plan = plan_run(run_dir, config, echo)
    resume_from, saved_state = plan.resume_from, plan.state

    source = objective.model_source(config)
    model_config, weights, tokenizer = source.config, source.weights, source.tokenizer
    if config.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"seq_len {config.seq_len} is past the model's {model_config.max_position_embeddings} "
                          f"positions: pass --seq-len {model_config.max_position_embeddings} or less")
    windows, trained = pack(load_documents(config.data), tokenizer, config.seq_len)
    stream = DataStream(windows, trained, seed=config.seed, eval_fraction=config.eval_fraction,
                        max_train_windows=config.max_train_windows)
    backend_name = plan.backend
    backend = get_backend(backend_name)
    # before anything is written: an objective that cannot start (a teacher cache made for other data) leaves
    # the run folder as it was
    objective.start(backend, config, model_config, tokenizer, windows, trained, echo)
    with writing(run_dir, "run settings"):
        _write_settings(run_dir, config)  # from here on, `--resume` finds the run, even before a checkpoint
    lora = config.lora_config
    if resume_from is not None and lora is None:  # a LoRA checkpoint holds the adapter: the model is the source's
        weights = hf_checkpoint.read_weights(resume_from, model_config)
    elif weights is None:
        weights = init_weights(model_config, seed=config.seed, dtype="float32")
    native = backend.build(model_config, weights, dtype="float32", device=config.device)
    if config.quantize is not None:  # QLoRA: the frozen base quantized before the adapter wraps it
        quantize_base(backend, native, model_config, config.quantize_bits, config.quantize_group_size)
    adapted = [] if lora is None else start_adapter(backend, native, model_config, lora, seed=config.seed,
                                                    base_weights=weights, resume_from=resume_from)
    del weights
    spec, companions = objective.train_spec(config), objective.companions()
    trainer = backend.trainer(native, spec, companions=companions,
                              loss_parameters=_loss_parameters(spec, model_config, companions, resume_from, config.seed))
    objective.attach(trainer)

    warmup, note = warmup_for(config)
    if note and saved_state is None:
        echo(note)
    schedule = plan.cycles

    step, loss_scale, good_steps = 0, (config.loss_scale if config.precision == "fp16" else 1.0), 0
    if saved_state is not None:
        try:
            trainer.load_optimizer_state(checkpoints.read_optimizer_state(resume_from))
        except CheckpointError as err:  # one line that also names the file
            raise CheckpointError(f"{resume_from / checkpoints.OPTIMIZER_FILE}: {err}") from None
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{resume_from} optimizer state does not fit this model ({err})") from None
        stream.restore(saved_state["data"])
        step, loss_scale, good_steps = saved_state["step"], saved_state["loss_scale"], saved_state["good_steps"]
        echo(f"resuming from {resume_from} (step {step})")

    with writing(run_dir, "metrics"):
        tracker = Tracker(run_dir, resume_step=step if saved_state is not None else None,
                          tensorboard=config.tensorboard, aim=config.aim, hparams=config.to_dict())
    bar = Progress(config.steps, step, progress)
    result = TrainResult(run_dir, step, None, None, resume_from)
    scales_key = None
    tokens_seen, started, started_step = 0, time.perf_counter(), step
    saved_at = step if resume_from is not None else None

    def save_checkpoint() -> Path:
        nonlocal saved_at
        state = {"loss_scale": loss_scale, "good_steps": good_steps, "data": stream.state(),
                 "backend": backend_name, "config": config.to_dict(), "schedule_bounds": list(schedule.bounds)}
        with writing(run_dir, "checkpoint"):
            model_or_adapter = ({"weights": backend.weights(trainer.model)} if lora is None else
                                {"adapter": attached_adapter(backend, trainer.model, lora, adapted), "base": config.model})
            path = checkpoints.save(run_dir, step, config=model_config, **model_or_adapter,
                                    optimizer_state=trainer.optimizer_state(), state=state, tokenizer=tokenizer,
                                    keep_last=config.keep_checkpoints,
                                    loss_parameters=trainer.loss_parameters() if spec.loss.projections else None)
        saved_at = step
        return path

    def interrupted(message: str) -> RunInterrupted:
        return RunInterrupted(f"{message}; resume with: {objective.command} --out {run_dir} --resume")

    try:
        with _StopOnCtrlC() as ctrl_c:
            while step < config.steps:
                if ctrl_c.requested:
                    kept = checkpoints.latest(run_dir) if saved_at == step else save_checkpoint()
                    raise interrupted(f"interrupted at step {step} of {config.steps}; checkpoint {kept}")
                scales = lr_scales(model_config, step, layer_decay=config.layer_lr_decay,
                                   unfreeze_every=config.unfreeze_every, unfreeze_blocks=config.unfreeze_blocks)
                if lora is not None:
                    scales = adapter_lr_scales(scales, backend.parameter_shapes(trainer.model), lora, adapted)
                key = tuple(sorted(scales.items()))
                if key != scales_key:
                    trainer.set_lr_scales(scales)
                    scales_key = key
                # The backend differentiates a loss *sum*, so its gradients are ~tokens times those of the mean
                # loss that loss scales are usually chosen for: scale per position in a micro-batch instead.
                factor = loss_scale / (config.batch_size * config.seq_len) if config.precision == "fp16" else 1.0
                loss_sum, tokens, term_sums = 0.0, 0, {}
                scalars = objective.scalars(step)
                for micro in range(config.grad_accum):
                    batch = objective.rewrite(backend, trainer, stream.next_batch(config.batch_size), step, micro)
                    extras = {**batch.extras, **objective.batch_extras(batch)}
                    loss_sum += trainer.accumulate(batch.inputs, batch.targets, batch.weights, positions=batch.positions,
                                                   mask=batch.mask, extras=extras, scalars=scalars, loss_scale=factor)
                    for name, value in trainer.term_sums().items():
                        term_sums[name] = term_sums.get(name, 0.0) + value
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
                if len(term_sums) > 1:  # one term is the loss itself
                    record.update({f"loss/{name}": value / max(tokens, 1) for name, value in term_sums.items()})
                record.update({f"scalar/{name}": value for name, value in scalars.items()})
                record.update(objective.step_metrics())
                if config.precision == "fp16":
                    record.update(loss_scale=loss_scale, skipped=skipped)
                result.final_loss = loss
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    record.update(_eval_record(backend, trainer.model, stream, config, objective))
                if step % config.log_every == 0 or step == config.steps:
                    memory = backend.peak_memory(trainer.model) or process_peak_rss()
                    record["peak_memory_gb"] = memory / 1e9
                    tracker.log(record)
                    result.history.append(record)
                    if log_lines:
                        echo(_progress_line(step, config.steps, record, started_step, elapsed))
                if on_step is not None:
                    on_step(record)
                bar.update(step, f"loss {loss:.4f}  {record['tokens_per_s']:,.0f} tok/s  lr {lr:.2e}  "
                                 f"mem {process_peak_rss() / 1e9:.2f} GB")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    result.checkpoint = save_checkpoint()
            final = {"step": step, **_eval_record(backend, trainer.model, stream, config, objective)}
            if "eval_loss" in final:
                tracker.log(final)
                result.history.append(final)
                result.eval_loss = final["eval_loss"]
            result.checkpoint = save_checkpoint()
            result.steps = step
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: the step in progress is dropped, the last checkpoint stands
        last = checkpoints.latest(run_dir)
        kept = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        raise interrupted(f"stopped at once during step {step + 1}, which is dropped; {kept}") from None
    finally:
        bar.close()
        tracker.close()
    return result


def _loss_parameters(spec, model_config, companions: dict, resume_from: Path | None, seed: int) -> dict | None:
    """The loss's own trainable parameters (its projections) a run starts from: those of the checkpoint it
    resumes, else fresh ones from the run's seed; None when the loss has none."""
    if not spec.loss.projections:
        return None
    shapes = transfer.loss_parameter_shapes(spec.loss, model_config, {n: c.config for n, c in companions.items()})
    if resume_from is None:
        return transfer.init_loss_parameters(shapes, seed)
    return transfer.check_loss_parameters(checkpoints.read_loss_parameters(resume_from), shapes,
                                          error=lambda message: CheckpointError(f"{resume_from}: {message}"))


def _eval_record(backend, native, stream: DataStream, config: TrainConfig, objective: Objective) -> dict:
    loss = evaluate(backend, native, stream, config)
    if loss is None:
        return {}
    return {"eval_loss": loss, "eval_perplexity": perplexity_from_loss(loss),
            **objective.evaluate(backend, native, stream, config)}


__all__ = ["RunPlan", "TrainResult", "evaluate", "plan_run", "saved_settings", "train", "warmup_for"]
