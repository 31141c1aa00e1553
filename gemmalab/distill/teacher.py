"""The online teacher: a frozen model beside the student, on the same backend, in its own dtype, read by the
loss's Distillation term inside the trainer's chunk loop (gemmalab.train.losses), so neither model's
[batch, tokens, vocab] logits ever exist in training.

``TeacherObjective`` is the distillation objective of the training loop (gemmalab.train.objective): it
decides the student (a preset student takes the teacher's vocabulary and tokenizer), refuses a tokenizer
that differs from the teacher's, builds the teacher, hands it to the trainer as the loss's companion (for the
logits and, on the mapped layer pairs, the hidden-state and attention transfer), feeds the temperature
schedule, and adds the teacher's figures to every evaluation (and, with feature transfer or
``layer_figures``, each mapped pair's hidden-state cosine and attention KL).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import checkpoint as hf_checkpoint
from ..api import Model
from ..config import Gemma3Config, resolve_config
from ..dtypes import canonical_dtype
from ..errors import ConfigError
from ..masks import layer_masks
from ..tokenizer import Tokenizer
from ..train.objective import ModelSource, Objective, checkpoint_source
from ..train.schedules import ValueSchedule
from ..train.transfer import head_groups
from . import onpolicy
from .config import TEACHER, TEMPERATURE_SCALAR, DistillConfig, projection_name
from .mapping import layer_mapping
from .metrics import HeldOutSums, LayerSums, figures, held_out_sums, layer_figures, layer_sums


@dataclasses.dataclass
class TeacherCheckpoint:
    """The teacher as read from disk before the run starts: its config, tokenizer and folder."""

    config: Gemma3Config
    tokenizer: Tokenizer | None
    folder: Any


def read_teacher(source: str) -> TeacherCheckpoint:
    """The teacher's config and tokenizer; its weights are read when the run starts (``TeacherObjective.start``),
    after every check that could refuse the run, so a refusal never waits for a 4B teacher to load."""
    folder = hf_checkpoint.locate(source)
    config = hf_checkpoint.load_config(folder)
    return TeacherCheckpoint(config, Tokenizer.from_folder(folder), folder)


def check_same_tokenizer(teacher: Tokenizer | None, student: Tokenizer | None, teacher_name: str, student_name: str) -> None:
    """Distillation compares the two models id by id: both must read text into the same ids."""
    if teacher is None or student is None:
        return
    if teacher.fingerprint != student.fingerprint:
        raise ConfigError(
            f"the teacher {teacher_name} and the student {student_name} have different tokenizers "
            f"({teacher.fingerprint} and {student.fingerprint}): distil between models of one tokenizer, "
            "or give the student as a preset (it then takes the teacher's)"
        )


class TeacherObjective(Objective):
    """Distillation from an online, frozen teacher (see the module docstring)."""

    command = "gemmalab distill"

    def __init__(self, config: DistillConfig):
        self.config = config
        self.checkpoint = read_teacher(config.teacher)
        self.native: Any = None
        self.student: Gemma3Config | None = None  # the student's config, once model_source has decided it
        self.tokenizer: Tokenizer | None = None  # the student's, which is the teacher's
        self.trainer: Any = None
        self.kinds: list[str] = []  # who wrote each micro-batch of the step in progress (onpolicy.KINDS)
        self.teacher_dtype = "float32"  # as built by start
        end = config.temperature if config.temperature_end is None else config.temperature_end
        self.temperature = ValueSchedule(config.temperature_schedule, config.temperature, end, config.steps)

    # -- what is trained -------------------------------------------------------------------------------------
    def model_source(self, config: DistillConfig) -> ModelSource:
        source = self._model_source(config)
        self.student, self.tokenizer = source.config, source.tokenizer
        return source

    def _model_source(self, config: DistillConfig) -> ModelSource:
        teacher = self.checkpoint
        if config.model is not None:
            source = checkpoint_source(config.model, "distillation")
            check_same_tokenizer(teacher.tokenizer, source.tokenizer, str(teacher.folder), config.model)
            return source
        # A preset student takes the teacher's vocabulary and tokenizer: the shape of the preset, the ids of
        # the teacher (the whole point of distilling is to match its distribution over them).
        if teacher.tokenizer is None:
            raise ConfigError(f"the teacher {teacher.folder} has no tokenizer.json or tokenizer.model, which a preset "
                              "student would take: give the student as a checkpoint with its tokenizer (--student SRC)")
        shape = dataclasses.replace(resolve_config(config.preset), vocab_size=teacher.config.vocab_size)
        return ModelSource(shape, None, teacher.tokenizer)

    # -- the teacher beside it -------------------------------------------------------------------------------
    def start(self, backend: Any, config: DistillConfig, model_config: Gemma3Config, tokenizer: Tokenizer,
              windows: Any, trained: Any, echo=print) -> None:
        teacher = self.checkpoint
        self.train_spec(config)  # a mapping or transfer that does not fit the pair refuses the run before any load
        dtype = canonical_dtype(config.teacher_dtype) if config.teacher_dtype else (teacher.config.stored_dtype or "float32")
        weights = hf_checkpoint.read_weights(teacher.folder, teacher.config)
        self.native = backend.build(teacher.config, weights, dtype=dtype, device=config.device)
        self.teacher_dtype = dtype
        del weights  # the backend holds them now
        echo(f"teacher {teacher.folder} ({teacher.config.num_parameters() / 1e6:.1f}M parameters, {dtype}, "
             f"vocabulary {teacher.config.vocab_size}) -> student {model_config.num_parameters() / 1e6:.1f}M "
             f"(vocabulary {model_config.vocab_size})")

    def train_spec(self, config: DistillConfig) -> Any:
        return config.train_spec(student=self.student, teacher=self.checkpoint.config)

    def companions(self) -> dict[str, Any]:
        return {TEACHER: self.native}

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer  # its projections enter the per-layer figures; its model writes on-policy batches

    # -- on-policy and sequence-level batches ----------------------------------------------------------------
    def rewrite(self, backend: Any, trainer: Any, batch: Any, step: int, micro: int) -> Any:
        """The drawn micro-batch, or its prompts continued by the student (probability lmbda) or, with seq_kd,
        by the teacher (gemmalab.distill.onpolicy)."""
        config = self.config
        if micro == 0:
            self.kinds = []
        kind = onpolicy.batch_kind(config.seed, step, micro, config.lmbda, config.seq_kd)
        self.kinds.append(kind)
        if kind == "data":
            return batch
        writer = trainer.model if kind == "student" else self.native
        writer_config = self.student if kind == "student" else self.checkpoint.config
        model = Model(writer_config, backend.name, "float32" if kind == "student" else self.teacher_dtype, writer,
                      self.tokenizer)
        prompts = onpolicy.prompts_of(batch)
        room = config.seq_len + 1 - min(len(p) for p in prompts)
        result = model.generate(prompts, min(config.max_new_tokens, room), temperature=config.gen_temperature,
                                seed=onpolicy.sampling_seed(config.seed, step, micro))
        pad = self.student.pad_token_id if self.student.pad_token_id is not None else 0
        return onpolicy.continued_batch(prompts, result.token_rows, config.seq_len, pad)

    def step_metrics(self) -> dict[str, float]:
        """The share of the step's micro-batches the student and the teacher wrote (with lmbda or seq_kd)."""
        if not (self.config.lmbda > 0 or self.config.seq_kd) or not self.kinds:
            return {}
        return {f"batches/{kind}": self.kinds.count(kind) / len(self.kinds) for kind in ("student", "teacher")}

    def scalars(self, step: int) -> dict[str, float]:
        if not self.config.scheduled_temperature:
            return {}
        return {TEMPERATURE_SCALAR: float(self.temperature(step))}

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, backend: Any, native: Any, stream: Any, config: DistillConfig) -> dict[str, float]:
        """The teacher's held-out perplexity, the student's top-1 agreement with it and KL(teacher || student)
        at temperature 1, over the shared vocabulary, on the same held-out batches as the student's loss.
        One row at a time: two [seq, vocab] logit arrays in memory, never [batch, seq, vocab]."""
        sums, layers = HeldOutSums(), LayerSums()
        with_layers = config.transfers_features or config.layer_figures
        for batch in stream.eval_batches(config.batch_size, config.eval_batches):
            for row in range(batch.inputs.shape[0]):
                ids = batch.inputs[row : row + 1]
                student = backend.logits(native, ids)  # float32 [1, seq, vocab]
                teacher = backend.logits(self.native, ids)
                sums = sums + held_out_sums(student[0], teacher[0], batch.targets[row], batch.weights[row])
                if with_layers:
                    layers = layers + self._layer_sums(backend, native, ids, batch.weights[row : row + 1], config)
        return {**figures(sums), **layer_figures(layers)}

    def layer_pairs(self, config: DistillConfig) -> list | None:
        """The run's mapped pairs when it reports per-layer figures (feature transfer or layer_figures)."""
        if not (config.transfers_features or config.layer_figures) or self.student is None:
            return None
        return layer_mapping(self.student, self.checkpoint.config, config.mapping)

    def _layer_sums(self, backend: Any, native: Any, ids: Any, weights: Any, config: DistillConfig) -> LayerSums:
        """The per-pair sums of one row: both models' captures of the mapped blocks, from the core's masks."""
        student, teacher = self.student, self.checkpoint.config
        pairs = self.layer_pairs(config)
        captured = {}
        for name, model, own, blocks in (("student", native, student, [p.student_layer for p in pairs]),
                                         ("teacher", self.native, teacher, [p.teacher_layer for p in pairs])):
            positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
            out = backend.forward(model, ids, positions=positions, masks=layer_masks(own, positions),
                                  hidden_states=tuple(sorted({b + 1 for b in blocks})), attentions=tuple(sorted(set(blocks))),
                                  logits=False)
            captured[name] = {"hidden_states": out.hidden_states, "attentions": out.attentions}
        groups = head_groups(student.num_attention_heads, student.num_key_value_heads, teacher.num_attention_heads,
                             teacher.num_key_value_heads)
        projections = self.trainer.loss_parameters() if self.trainer is not None else {}
        return layer_sums(pairs, captured["student"], captured["teacher"], weights, projections, groups, projection_name)


__all__ = ["TeacherObjective", "check_same_tokenizer", "read_teacher"]
