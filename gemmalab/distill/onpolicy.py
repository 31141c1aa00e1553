"""On-policy and sequence-level batches of a distillation run: GKD's ``lmbda`` and ``seq_kd`` (Agarwal et al.
2024, "On-policy distillation of language models: learning from self-generated mistakes"; TRL's GKDTrainer).

Each micro-batch drawn from the data is, before the trainer sees it, one of

* ``student``: with probability ``lmbda`` (decided from the run's seed, the step and the micro-batch, so a
  resumed run makes the same choices), the *student* continues each row's prompt by sampling, and the batch
  becomes prompt + the student's tokens, trained on the student's tokens only: the divergence then scores
  the teacher's distribution over the student's own continuations (on-policy);
* ``teacher``: otherwise, with ``seq_kd``, the *teacher* writes the continuations the same way
  (sequence-level KD, Kim & Rush 2016): the student learns the teacher's text and its distribution on it;
* ``data``: otherwise the batch as drawn.

The continuations go through the generation layer (``Model.generate``: its caches and samplers, at
``gen_temperature``, stopping at the model's eos ids), at most ``max_new_tokens`` and never past the window.

A row's prompt is its inputs up to its first trained target (prompt/completion and chat data: the prompt and
the user turns); a row trained from its first target on (plain text, or a window that starts inside a
response) is prompted with the first half of its inputs. The rebuilt row is ``prompt + continuation``, padded
after the end with the pad id at weight 0.
"""

from __future__ import annotations

import numpy as np

from ..train.data import Batch

KINDS = ("data", "student", "teacher")


def batch_kind(seed: int, step: int, micro: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes micro-batch ``micro`` of step ``step``: "student" (probability ``lmbda``), else "teacher"
    under ``seq_kd``, else "data" (the module docstring). A function of its arguments alone."""
    if lmbda > 0 and np.random.default_rng([seed, step, micro]).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "data"


def sampling_seed(seed: int, step: int, micro: int) -> int:
    """The generation seed of one rebuilt micro-batch (another stream than batch_kind's draw)."""
    return int(np.random.default_rng([seed, step, micro, 1]).integers(0, 2**31 - 1))


def prompt_length(weights: np.ndarray) -> int:
    """How many of a row's inputs are its prompt: up to and including the input that predicts the first
    trained target; half the row when the row is trained from its first target (or not at all)."""
    trained = np.flatnonzero(np.asarray(weights) > 0)
    if len(trained) == 0 or trained[0] == 0:
        return max(1, len(weights) // 2)
    return int(trained[0]) + 1


def prompts_of(batch: Batch) -> list[list[int]]:
    """Each row's prompt token ids."""
    return [batch.inputs[row, : prompt_length(batch.weights[row])].tolist() for row in range(batch.inputs.shape[0])]


def continued_batch(prompts: list[list[int]], continuations: list[list[int]], seq_len: int, pad: int) -> Batch:
    """The rows ``prompt + continuation`` (cut at seq_len + 1 tokens), as inputs, targets and weights: weight 1
    on each target that is a continuation token, 0 on the prompt and on the padding after the end."""
    width = seq_len + 1
    rows = np.full((len(prompts), width), pad, np.int32)
    trained = np.zeros((len(prompts), width), bool)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        ids = (list(prompt) + list(continuation))[:width]
        rows[row, : len(ids)] = ids
        trained[row, len(prompt) : len(ids)] = True
    return Batch(rows[:, :-1].copy(), rows[:, 1:].copy(), trained[:, 1:].astype(np.float32))


__all__ = ["KINDS", "batch_kind", "continued_batch", "prompt_length", "prompts_of", "sampling_seed"]
