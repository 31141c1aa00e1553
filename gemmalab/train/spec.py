"""What the core asks of a backend to train a model: the spec it hands over and the trainer it gets back.

The split (DESIGN.md section 2): the core decides *when* and *how much* -- steps, accumulation, the
learning rate of every step, which layers train, loss scaling, checkpoints, logging -- and a backend does
the tensor work -- the loss and its gradients, clipping, the optimizer update -- with its framework's own
optimizers (torch.optim, mlx.optimizers, optax) wherever those compute the formulas below.

Everything crosses the boundary as numpy or plain floats.

The optimizer formulas (t = 1, 2, ... counts updates applied to a parameter; lr is the step's learning
rate times the parameter's scale; g is the accumulated gradient divided by ``normalizer``, then clipped):

Global-norm clipping (over every trainable gradient): ``norm = sqrt(sum g^2)``;
``g *= min(1, max_grad_norm / (norm + 1e-6))`` (torch's ``clip_grad_norm_`` and MLX's ``clip_grad_norm``).

AdamW (Loshchilov & Hutter, decoupled weight decay; torch.optim.AdamW's formula)::

    p = p * (1 - lr * weight_decay)
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Adafactor (Shazeer & Stern 2018, with an explicit learning rate and parameter scaling, no momentum)::

    beta2 = 1 - t^(-decay_rate)                         (0 at t = 1)
    G = g^2 + eps1
    parameters with >= 2 dims are factored over their last two axes:
        R = beta2 R + (1 - beta2) mean(G, axis=-1)      [..., rows]
        C = beta2 C + (1 - beta2) mean(G, axis=-2)      [..., cols]
        V = R[..., :, None] * C[..., None, :] / mean(R, axis=-1)[..., None, None]
    others keep V = beta2 V + (1 - beta2) G
    u = g / sqrt(V) ;  u = u / max(1, rms(u) / clip_threshold)
    (with beta1: m = beta1 m + (1 - beta1) u ;  u = m)
    p = p * (1 - lr * weight_decay)
    p = p - lr * max(eps2, rms(p_before_update)) * u

rms(x) = sqrt(mean(x^2)). Weight decay applies to every trainable parameter.

The optimizer state, named the same on every backend (so a run written by one resumes on another): one
entry per state of each parameter, ``"<state>/<canonical parameter name>"``, after the parameter's first
update (a parameter never updated -- frozen, or its steps all skipped -- has no entry). The states, with
the symbols of the formulas above (``shape`` is the parameter's)::

    step            int64   [1]                  t, the updates applied to this parameter
    AdamW
    exp_avg         float32 shape                m
    exp_avg_sq      float32 shape                v
    Adafactor, a parameter with >= 2 dims
    exp_avg_sq_row  float32 shape[:-1]           R, the running average of mean(G, axis=-1)
    exp_avg_sq_col  float32 shape[:-2] + [-1]    C, the running average of mean(G, axis=-2)
    Adafactor, a 1-D parameter
    exp_avg_sq      float32 shape                V
    Adafactor with beta1
    exp_avg         float32 shape                m, the moment of the clipped update u (not of -u)

These are torch.optim.AdamW's names, and for Adafactor those of transformers' and mlx.optimizers'; a
backend whose framework keeps other names, layouts, dtypes or signs translates, exactly, both ways, and
checks what it loads with ``check_optimizer_state``. The step is [1] rather than 0-d because the checkpoint
writer stores a 0-d array as [1] anyway.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ..checks import is_count
from ..config import Gemma3Config
from ..errors import CheckpointError, InputError
from .losses import LossSpec
from .transfer import check_transfer

OptimizerName = Literal["adamw", "adafactor"]
# Positions per loss chunk: at Gemma's 262k vocabulary a chunk's float32 logits take 0.5 GB.
LOSS_CHUNK_TOKENS = 512
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class OptimizerSpec:
    """Hyper-parameters of the update rule (see the module docstring for the formulas)."""

    name: OptimizerName = "adamw"
    weight_decay: float = 0.01
    # AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Adafactor
    decay_rate: float = 0.8
    clip_threshold: float = 1.0
    eps_adafactor: tuple[float, float] = (1e-30, 1e-3)
    beta1: float | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Everything a backend needs to build a trainer for a model.

    precision: the compute dtype of the forward and backward passes. Master weights and optimizer state
        stay float32 in every mode (the model is built in float32); "bf16"/"fp16" cast the weights to the
        compute dtype inside the loss function, so gradients arrive in float32. With "fp16" the core scales
        the loss (``loss_scale`` of :meth:`BackendTrainer.accumulate`) and skips steps whose gradients
        overflow.
    max_grad_norm: global-norm clipping threshold, None = no clipping.
    loss: the terms of the loss (gemmalab.train.losses): on the logits, chunk by chunk, and on captured
        hidden states and attention probabilities. Default: plain cross-entropy.
    loss_chunk_tokens: the output head and the logit terms run over at most this many token positions at a
        time, so ``[batch, tokens, vocab]`` logits never exist at once, in the forward or the backward pass.
    grad_checkpointing: recompute each decoder block's activations in the backward pass instead of
        storing them (per-block rematerialisation).
    """

    optimizer: OptimizerSpec = OptimizerSpec()
    precision: Precision = "fp32"
    max_grad_norm: float | None = 1.0
    loss: LossSpec = LossSpec()
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Checked once here, so every backend's trainer can rely on a valid spec.
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.optimizer.name not in ("adamw", "adafactor"):
            raise InputError(f"optimizer must be adamw or adafactor, got {self.optimizer.name!r}")
        if self.loss_chunk_tokens < 1:
            raise InputError(f"loss_chunk_tokens must be at least 1, got {self.loss_chunk_tokens}")
        if not isinstance(self.loss, LossSpec):
            raise InputError(f"loss must be a gemmalab.train.losses.LossSpec, got {type(self.loss).__name__}")


@runtime_checkable
class BackendTrainer(Protocol):
    """One model being trained, with its optimizer and a gradient accumulator (backend-native inside).

    Batches are numpy: ``inputs`` and ``targets`` int32 [batch, seq], ``weights`` float32 [batch, seq] (the
    weight of each position's loss: 0 for padding and for tokens not trained on, e.g. user turns). Losses
    cross the boundary as *sums* of ``weight * token_loss`` so that the core can divide by the number of
    tokens of the whole accumulated batch: k micro-batches then give exactly the gradient of one batch k
    times larger.
    """

    model: Any  # the backend-native model being trained (BACKEND.weights(trainer.model) reads it)

    def accumulate(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        *,
        positions: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        scalars: Mapping[str, float] | None = None,
        loss_scale: float = 1.0,
    ) -> float:
        """Forward and backward on one micro-batch; adds d(loss_scale * loss_sum)/d(params) to the
        accumulated gradients of the trainable parameters. Returns the unscaled loss sum (a float): every
        term of ``spec.loss``, weighted. ``positions``, ``mask``, ``extras`` and ``scalars`` (the step's
        named scalars the terms read, e.g. a scheduled distillation temperature; a changed value never
        recompiles anything) are those of gemmalab.train.inputs.prepare, which every backend calls to check
        them. The companion models the trainer was given (``Backend.trainer(..., companions=)``) run on
        the same ids, positions and masks, frozen: no gradient is computed for them."""

    def term_sums(self) -> dict[str, float]:
        """The last ``accumulate``'s per-term sums, keyed by ``spec.loss.term_names()``: sum over positions of
        position weight * the term's per-position loss, the term's own weight not applied (the numpy
        definition is gemmalab.train.losses.term_sums). For per-component metrics (e.g. the cross-entropy and
        the distillation parts of a KD loss)."""

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated (un-normalised, un-clipped) gradients of the trainable parameters, float32,
        under canonical names (the tied head's gradient is in model.embed_tokens.weight)."""

    def loss_parameters(self) -> dict[str, np.ndarray]:
        """The current values of the loss's own trainable parameters (its projections, gemmalab.train.transfer),
        float32 numpy copies by name; {} when the loss has none. Saved beside the model in a run's
        checkpoint, never in it."""

    def apply(self, lr: float, normalizer: float) -> dict[str, float]:
        """Divide the accumulated gradients by ``normalizer`` (the token count times the loss scale),
        clip them, take one optimizer step with learning rate ``lr`` times each parameter's scale, and
        zero the accumulator. Returns {"grad_norm": the global norm before clipping}. When that norm is not
        finite, nothing is updated (weights and optimizer state unchanged), the accumulator is zeroed and
        the returned norm is inf or nan: the core decides what to do (skip under fp16 loss scaling, stop
        otherwise)."""

    def set_lr_scales(self, scales: Mapping[str, float]) -> None:
        """Per-parameter learning-rate multipliers by canonical name (missing names mean 1.0). A scale of 0
        freezes the parameter: no gradient is computed or kept for it, the optimizer neither updates it nor
        its state, and weight decay does not touch it. Takes effect from the next ``accumulate``."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's whole state as flat numpy arrays under the canonical names of the module
        docstring (e.g. ``"exp_avg/model.layers.0.mlp.up_proj.weight"``, per-parameter steps included):
        ``load_optimizer_state`` on a fresh trainer of the same backend continues bit for bit, and on
        another backend continues the same optimizer (to float rounding)."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what any backend's ``optimizer_state`` returned, checked with
        ``check_optimizer_state`` (a state that does not fit raises CheckpointError)."""


def check_companions(loss: LossSpec, student: Gemma3Config, companions: Mapping[str, Gemma3Config]) -> None:
    """Refuse, in one InputError line, companion models (frozen teachers, by name -> config) that do not fit
    ``loss``: one a term reads and is missing, one given that no term reads, a config without a known
    vocabulary size (the shared vocabulary, losses.shared_vocab, is computed from both), or a transfer term
    whose layers or widths do not fit the two models (transfer.check_transfer)."""
    missing = [name for name in loss.companions if name not in companions]
    if missing:
        raise InputError(f"the loss distils from the companion model {missing[0]!r}, which the trainer was not given: "
                         f"pass companions={{{missing[0]!r}: backend.build(teacher_config, teacher_weights, dtype=...)}}")
    unread = sorted(set(companions) - set(loss.companions))
    if unread:
        raise InputError(f"the trainer was given the companion model {unread[0]!r}, which no loss term reads: drop it, "
                         f"or add a Distillation(teacher={unread[0]!r}) term")
    for what, config in [("the student", student), *((f"companion {n!r}", c) for n, c in companions.items())]:
        vocab = getattr(config, "vocab_size", None)
        if not (is_count(vocab) and vocab >= 1):
            raise InputError(f"{what} has no known vocabulary size (vocab_size={vocab!r}): build it from a Gemma3Config")
    check_transfer(loss, student, companions)


def optimizer_state_by_parameter(
    state: Mapping[str, np.ndarray], parameters: Iterable[str]
) -> dict[str, dict[str, np.ndarray]]:
    """A flat optimizer state (``"<state>/<parameter>"`` -> array, see BackendTrainer.optimizer_state)
    grouped by parameter: {parameter: {state: array}}. A name outside ``parameters`` raises
    CheckpointError: the checkpoint belongs to another model."""
    known = set(parameters)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        kind, _, name = key.partition("/")
        if name not in known:
            raise CheckpointError(
                f"the optimizer state holds {key!r}, for a parameter this model does not have: "
                "resume with the model the run was started with"
            )
        grouped.setdefault(name, {})[kind] = np.asarray(value)
    return grouped


def expected_state_names(optimizer: OptimizerSpec, shape: Iterable[int]) -> dict[str, tuple[int, ...]]:
    """The canonical state of one updated parameter of ``shape`` under ``optimizer``: name -> shape (every
    state float32 but ``step``, int64; see the module docstring)."""
    shape = tuple(int(n) for n in shape)
    names: dict[str, tuple[int, ...]] = {"step": (1,)}
    if optimizer.name == "adamw":
        return {**names, "exp_avg": shape, "exp_avg_sq": shape}
    if len(shape) >= 2:  # factored over the last two axes
        names |= {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    else:
        names["exp_avg_sq"] = shape
    if optimizer.beta1 is not None:
        names["exp_avg"] = shape
    return names


def check_optimizer_state(
    state: Mapping[str, np.ndarray], optimizer: OptimizerSpec, shapes: Mapping[str, Iterable[int]]
) -> dict[str, dict[str, np.ndarray]]:
    """A canonical optimizer state (what a trainer's ``optimizer_state`` returns, on any backend) checked
    against the parameters of a model (``shapes``: canonical name -> shape) and grouped by parameter:
    {parameter: {state: array}}, moments float32 and ``step`` int64 [1].

    Raises CheckpointError, in one line naming the parameter, what it holds and what it needs, for an
    unknown parameter, a missing or unknown state, a shape or dtype that does not fit, or a step that is
    not a whole number >= 1. A step stored as a float (torch keeps its step counts in float32, and
    checkpoints written before the names were canonical hold them so) is accepted when it is whole."""
    checked = {}
    for name, values in optimizer_state_by_parameter(state, shapes).items():
        shape = tuple(int(n) for n in shapes[name])
        needed = expected_state_names(optimizer, shape)
        if not _fits(values, needed):
            found = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in sorted(values.items()))
            want = ", ".join(f"{k} {'int64' if k == 'step' else 'float32'} {list(s)}" for k, s in sorted(needed.items()))
            raise CheckpointError(
                f"the optimizer state of {name} holds {found}, where {optimizer.name} needs {want} for its shape "
                f"{list(shape)}: resume with the model and optimizer the run was started with"
            )
        if not _is_whole_step(values["step"]):
            raise CheckpointError(
                f"the optimizer state of {name} has step {values['step'].tolist()}, not a whole number of updates "
                ">= 1: the checkpoint is damaged; resume from an earlier one"
            )
        checked[name] = {k: v.astype(np.int64) if k == "step" else v for k, v in values.items()}
    return checked


def _fits(values: Mapping[str, np.ndarray], needed: Mapping[str, tuple[int, ...]]) -> bool:
    """Every needed state and no other, of its shape; the moments float32 (a cast would hide rounding)."""
    return values.keys() == needed.keys() and all(
        values[k].shape == shape and (k == "step" or values[k].dtype == np.float32) for k, shape in needed.items()
    )


def _is_whole_step(step: np.ndarray) -> bool:
    """A step of shape [1] (checked by _fits) holding a whole number >= 1, as an integer or a float."""
    if not (np.issubdtype(step.dtype, np.integer) or np.issubdtype(step.dtype, np.floating)):
        return False
    value = float(step[0])
    return math.isfinite(value) and value >= 1 and value.is_integer()


__all__ = [
    "LOSS_CHUNK_TOKENS",
    "BackendTrainer",
    "OptimizerName",
    "OptimizerSpec",
    "Precision",
    "TrainSpec",
    "check_companions",
    "check_optimizer_state",
    "expected_state_names",
    "optimizer_state_by_parameter",
]
