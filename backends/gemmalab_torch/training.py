"""Training on PyTorch: the chunked loss, gradient accumulation, clipping and the optimizer step behind
gemmalab.train.spec.BackendTrainer. The formulas are in gemmalab/train/spec.py.

AdamW is ``torch.optim.AdamW``, which computes spec.py's formula as it stands. Adafactor is written here:
``torch.optim.Adafactor`` (torch 2.13) caps the step size at 1/sqrt(t), and guards the second moment with
``clamp(min=eps1**2)``, which for eps1 = 1e-30 underflows to 0 in float32, so a parameter row whose
gradient is all zero (the embedding row of a token absent from the batch) gets 0 * inf = NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from gemmalab.errors import InputError
from gemmalab.train.spec import TrainSpec, check_optimizer_state

from .model import Gemma3ForCausalLM

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LinearCrossEntropy(torch.autograd.Function):
    """sum(weights * token loss) of hidden states [n, dim] through the output matrix [vocab, dim], computed
    ``chunk`` positions at a time, with its gradient computed in the same pass (as Liger-Kernel's fused
    linear cross-entropy does): per chunk, logits -> softmax -> d(loss)/d(logits) -> the two gradient
    matmuls, then the chunk's [chunk, vocab] buffers are dropped. So [n, vocab] logits never exist and
    nothing is recomputed in the backward pass, which only scales the stored gradients.

    d(loss)/d(logits) = weight * (softmax - (1 - eps) * onehot(target) - eps / vocab), times the soft-cap's
    derivative (1 - tanh^2) when the model caps its logits.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, matrix: Tensor, targets: Tensor, weights: Tensor, chunk: int,
                smoothing: float, softcap: float | None) -> Tensor:
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else matrix.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # fp16 would round the logit gradients (probabilities ~1/vocab are fp16 subnormals at 262k ids) before
        # any loss scale reaches them: its gradient matmuls run in float32 instead.
        grad_dtype = torch.float32 if compute == torch.float16 else compute
        with torch.autocast(hidden.device.type, enabled=False):
            matrix_c = matrix.to(compute)  # one cast per call, not per chunk
            matrix_g = matrix_c if grad_dtype == compute else matrix.to(grad_dtype)
            grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs_grad else None
            grad_matrix = torch.zeros_like(matrix, dtype=torch.float32) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            vocab = matrix.shape[0]
            for start in range(0, hidden.shape[0], chunk):
                part = slice(start, start + chunk)
                h, t, w = hidden[part].to(compute), targets[part], weights[part]
                logits = (h @ matrix_c.T).float()  # [c, vocab]
                capped = None
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                nll = lse - logits.gather(-1, t[:, None])[:, 0]
                per_token = nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - logits.mean(-1))
                total += (per_token * w).sum()
                if not needs_grad:
                    continue
                d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
                d_logits.scatter_add_(-1, t[:, None], torch.full_like(lse[:, None], -(1 - smoothing)))
                if smoothing:
                    d_logits.sub_(smoothing / vocab)
                d_logits.mul_(w[:, None])
                if capped is not None:
                    d_logits.mul_(1 - capped.square_())
                d_c = d_logits.to(grad_dtype)
                grad_hidden[part] = (d_c @ matrix_g).float()
                grad_matrix.add_((d_c.T @ h.to(grad_dtype)).float())
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_matrix)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_matrix = ctx.saved_tensors
        return grad_hidden * grad_output, grad_matrix * grad_output, None, None, None, None, None


def chunked_head_loss(matrix: Tensor, hidden: Tensor, targets: Tensor, weights: Tensor, *, chunk_tokens: int,
                      smoothing: float, softcap: float | None = None) -> Tensor:
    """sum(weights * token loss) of final hidden states [n, dim] against the output ``matrix`` [vocab, dim]
    (logits soft-capped at ``softcap`` when given), ``chunk_tokens`` positions at a time."""
    return LinearCrossEntropy.apply(hidden, matrix, targets, weights.float(), chunk_tokens, smoothing, softcap)


def chunked_loss_sum(model: Gemma3ForCausalLM, inputs: Tensor, targets: Tensor, weights: Tensor, *,
                     chunk_tokens: int, smoothing: float) -> Tensor:
    """The backbone once on inputs [batch, seq], then the head and loss in chunks (chunked_head_loss)."""
    hidden = model.model(inputs).last_hidden_state  # [batch, seq, dim]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, dim]
    return chunked_head_loss(model.output_weight(), hidden, targets.reshape(-1), weights.reshape(-1),
                             chunk_tokens=chunk_tokens, smoothing=smoothing,
                             softcap=model.config.final_logit_softcapping)


def batch_tensors(model: Gemma3ForCausalLM, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    """Check a numpy batch and move it to the model's device."""
    inputs, targets, weights = np.asarray(inputs), np.asarray(targets), np.asarray(weights)
    if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.shape != weights.shape:
        raise InputError(f"inputs, targets and weights must share one [batch, seq] shape, got "
                         f"{inputs.shape}, {targets.shape}, {weights.shape}")
    vocab = model.config.vocab_size
    for name, ids in (("inputs", inputs), ("targets", targets)):
        if not np.issubdtype(ids.dtype, np.integer) or ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"{name} must be integer token ids in [0, {vocab})")
    device = model.device
    return (torch.from_numpy(inputs.astype(np.int64)).to(device), torch.from_numpy(targets.astype(np.int64)).to(device),
            torch.from_numpy(weights.astype(np.float32)).to(device))


class Adafactor(torch.optim.Optimizer):
    """spec.py's Adafactor: factored second moments over the last two axes, update clipping, parameter
    scaling, explicit learning rate, optional first moment, decoupled weight decay."""

    def __init__(self, params, *, lr: float, decay_rate: float, clip_threshold: float, eps: tuple[float, float],
                 beta1: float | None, weight_decay: float):
        defaults = dict(lr=lr, decay_rate=decay_rate, clip_threshold=clip_threshold, eps=eps, beta1=beta1,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 (the Optimizer signature)
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if g.ndim >= 2:
                        state["exp_avg_sq_row"] = torch.zeros(g.shape[:-1], dtype=torch.float32, device=g.device)
                        state["exp_avg_sq_col"] = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.float32,
                                                              device=g.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g, dtype=torch.float32)
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(g, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                beta2 = 1.0 - t ** (-group["decay_rate"])
                squared = g.square() + eps1  # [..., rows, cols]
                if g.ndim >= 2:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1 - beta2)  # [..., rows]
                    col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1 - beta2)  # [..., cols]
                    variance = row[..., :, None] * col[..., None, :] / row.mean(dim=-1)[..., None, None]
                else:
                    state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1 - beta2)
                    variance = state["exp_avg_sq"]
                update = g * variance.rsqrt()
                update.div_(max(1.0, _rms(update) / group["clip_threshold"]))
                if group["beta1"] is not None:
                    update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                step_size = lr * max(eps2, _rms(p))  # the parameter's scale before this update
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-step_size)


def _rms(x: Tensor) -> float:
    return float(x.float().square().mean().sqrt())


class TorchTrainer:
    """gemmalab.train.spec.BackendTrainer for a float32 model.Gemma3ForCausalLM."""

    def __init__(self, model: Gemma3ForCausalLM, spec: TrainSpec):
        if model.dtype != torch.float32:
            raise InputError(f"training needs the model in float32 (master weights), got {model.dtype}: "
                             "build it with dtype='float32' and choose the compute precision in the spec")
        self.model, self.spec = model, spec
        self.model.train()
        self.model.model.gradient_checkpointing = spec.grad_checkpointing
        self.params = dict(model.named_parameters())  # canonical names; the tied head appears once
        self.scales: dict[str, float] = {}
        self.set_lr_scales({})  # everything trains (built models hold their weights without gradients)
        # One parameter group per tensor, so each can carry its own learning rate (layer-wise scales).
        groups = [{"params": [p], "name": n} for n, p in self.params.items()]
        opt = spec.optimizer
        if opt.name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=opt.betas, eps=opt.eps,
                                               weight_decay=opt.weight_decay, foreach=False)
        else:
            self.optimizer = Adafactor(groups, lr=0.0, decay_rate=opt.decay_rate, clip_threshold=opt.clip_threshold,
                                       eps=opt.eps_adafactor, beta1=opt.beta1, weight_decay=opt.weight_decay)

    def _autocast(self):
        dtype = AUTOCAST.get(self.spec.precision)
        return torch.autocast(self.model.device.type, dtype=dtype, enabled=dtype is not None)

    def accumulate(self, inputs, targets, weights, *, loss_scale: float = 1.0) -> float:
        ids, tgt, w = batch_tensors(self.model, inputs, targets, weights)
        with self._autocast():
            loss = chunked_loss_sum(self.model, ids, tgt, w, chunk_tokens=self.spec.loss_chunk_tokens,
                                    smoothing=self.spec.label_smoothing)
        (loss * loss_scale).backward()  # .grad of each trainable parameter sums over micro-batches
        return float(loss.detach())

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.params.items() if p.requires_grad and p.grad is not None]

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: p.grad.detach().cpu().numpy().copy() for n, p in self._trainable()}

    def apply(self, lr: float, normalizer: float) -> dict[str, float]:
        trainable = self._trainable()
        grads = [p.grad for _, p in trainable]
        for g in grads:
            g.div_(normalizer)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if math.isfinite(norm):
            if self.spec.max_grad_norm is not None:
                factor = min(1.0, self.spec.max_grad_norm / (norm + 1e-6))
                for g in grads:
                    g.mul_(factor)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * self.scales[group["name"]]
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def set_lr_scales(self, scales: Mapping[str, float]) -> None:
        for name, param in self.params.items():
            self.scales[name] = float(scales.get(name, 1.0))
            param.requires_grad_(self.scales[name] != 0.0)  # frozen: no gradient, so no update or decay

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical state of gemmalab/train/spec.py. Its names are torch's own (torch.optim.AdamW's, and
        the Adafactor above keeps them too); only the step changes form: torch counts in a float32 0-d
        tensor, the canonical step is int64 [1]."""
        out = {}
        for group in self.optimizer.param_groups:
            for key, value in self.optimizer.state.get(group["params"][0], {}).items():
                array = value.detach().cpu().numpy()
                out[f"{key}/{group['name']}"] = np.array([int(array)], np.int64) if key == "step" else array.copy()
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a canonical state, written by any backend (checked by spec.check_optimizer_state)."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        checked = check_optimizer_state(state, self.spec.optimizer, shapes)
        self.optimizer.state.clear()
        for name, values in checked.items():
            device = self.params[name].device
            self.optimizer.state[self.params[name]] = {
                # torch keeps step counts as float32 on the CPU (a device tensor would cost a sync per step);
                # exact for any count below 2^24
                kind: torch.tensor(float(value[0]), dtype=torch.float32) if kind == "step"
                else torch.from_numpy(np.array(value)).to(device)
                for kind, value in values.items()
            }


__all__ = ["Adafactor", "LinearCrossEntropy", "TorchTrainer", "chunked_head_loss", "chunked_loss_sum"]
