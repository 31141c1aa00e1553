"""Which teacher block each student block learns from: the layer mapping of hidden-state and attention-map
transfer. Pure numbers (no weights, no array framework), so a mapping can be shown for any pair of configs,
presets included, before anything is loaded.

Blocks are counted from 0; ``Ls`` and ``Lt`` are the student's and the teacher's numbers of blocks. The
strategies (``round`` is half up, so every table is the same on every machine):

* ``uniform``: student block i <- teacher block round((i + 1) * Lt / Ls) - 1. Spread evenly; the last
  student block always learns from the last teacher block.
* ``last``: student block i <- teacher block Lt - Ls + i, the teacher's top Ls blocks (needs Lt >= Ls).
* ``progressive``: dense in the early blocks, sparser toward the top. The uniform positions warped by a
  quadratic, round(Lt * (i + 1)(i + 2) / (Ls (Ls + 1))) - 1, so the gaps between mapped teacher blocks grow
  linearly toward the top; when the teacher is at least as deep, the result is then made strictly increasing
  (each block at least one above the previous, and at most Lt - Ls + i, so there is room above it).
* ``by-type``: Gemma 3's 5:1 pattern. A student global layer learns from a teacher global layer and a local
  from a local, in order (a higher student block never learns from a lower teacher block), each as close to
  its uniform position as that allows (``by_type_indices``).
* an explicit list: ``"s:t,s:t,..."`` (student block s <- teacher block t, any subset of the student's
  blocks) or ``"t0,t1,..."`` (one teacher block per student block, in order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..config import FULL, SLIDING, Gemma3Config
from ..errors import ConfigError

STRATEGIES = ("uniform", "last", "progressive", "by-type")
TYPE_NAMES = {SLIDING: "local", FULL: "global"}  # how a table names the two layer types


@dataclass(frozen=True)
class LayerPair:
    """One mapped pair: the student block, its type, the teacher block it learns from, and that block's type
    (layer types as in Gemma3Config.layer_types: sliding_attention or full_attention)."""

    student_layer: int
    student_type: str
    teacher_layer: int
    teacher_type: str

    @property
    def same_type(self) -> bool:
        return self.student_type == self.teacher_type

    def as_dict(self) -> dict[str, int | str]:
        """The pair for ``--json``: the layers and their types, named local / global."""
        row = asdict(self)
        row["student_type"], row["teacher_type"] = TYPE_NAMES[self.student_type], TYPE_NAMES[self.teacher_type]
        return row


def _round_half_up(numerator: int, denominator: int) -> int:
    """round(numerator / denominator), halves up, in integers (no float rounding at any depth)."""
    return (2 * numerator + denominator) // (2 * denominator)


def uniform_indices(student_count: int, teacher_count: int) -> list[int]:
    """Teacher index round((i + 1) * Lt / Ls) - 1 for each student index i."""
    return [_round_half_up((i + 1) * teacher_count, student_count) - 1 for i in range(student_count)]


def last_indices(student_count: int, teacher_count: int) -> list[int]:
    if teacher_count < student_count:
        raise ConfigError(f"--mapping last needs a teacher at least as deep as the student (student {student_count} "
                          f"blocks, teacher {teacher_count}): use --mapping uniform")
    return [teacher_count - student_count + i for i in range(student_count)]


def progressive_indices(student_count: int, teacher_count: int) -> list[int]:
    """The quadratic warp of the module docstring, strictly increasing when the teacher has room."""
    scale = student_count * (student_count + 1)
    raw = [_round_half_up(teacher_count * (i + 1) * (i + 2), scale) - 1 for i in range(student_count)]
    if teacher_count < student_count:  # a shallower teacher: blocks repeat, as in uniform
        return [max(0, t) for t in raw]
    chosen: list[int] = []
    for i, t in enumerate(raw):
        lowest = chosen[-1] + 1 if chosen else 0
        chosen.append(min(max(t, lowest), teacher_count - student_count + i))
    return chosen


def by_type_indices(student_types: Sequence[str], teacher_types: Sequence[str]) -> list[int]:
    """Each student block on a teacher block of its own type, in order (never going down, repeating only
    when the teacher has too few blocks of a type), as close to the uniform positions as that allows: the
    fewest repeats, then the least total distance |(t + 1) - (i + 1) * Lt / Ls|; ties go to the lower teacher
    block. A small dynamic programme over (student block, teacher block)."""
    ls, lt = len(student_types), len(teacher_types)
    for kind in dict.fromkeys(student_types):
        if kind not in teacher_types:
            students = [i for i, t in enumerate(student_types) if t == kind]
            raise ConfigError(f"--mapping by-type: the teacher has no {TYPE_NAMES[kind]} layer for the student's "
                              f"{TYPE_NAMES[kind]} blocks {students}: use --mapping uniform")

    def distance(i: int, j: int) -> int:  # Ls times the distance from the uniform position, in integers
        return abs(ls * (j + 1) - lt * (i + 1))

    # best[i][j] = ((repeats, distance) of the best order for blocks 0..i with block i on teacher j, previous j)
    best: list[dict[int, tuple[tuple[int, int], int | None]]] = []
    for i, kind in enumerate(student_types):
        row: dict[int, tuple[tuple[int, int], int | None]] = {}
        for j in (j for j in range(lt) if teacher_types[j] == kind):
            if i == 0:
                row[j] = ((0, distance(0, j)), None)
                continue
            options = [((cost[0] + (k == j), cost[1] + distance(i, j)), k)
                       for k, (cost, _) in sorted(best[-1].items()) if k <= j]
            if options:
                row[j] = min(options, key=lambda option: option[0])  # min keeps the first (lowest k) of equals
        if not row:  # e.g. local student blocks after the teacher's last local one (a 6-block teacher's top is global)
            raise ConfigError(f"--mapping by-type: no teacher {TYPE_NAMES[kind]} block at or above those of the student "
                              f"blocks below {i} is left for student block {i}: use --mapping uniform or an explicit list")
        best.append(row)
    j = min(sorted(best[-1]), key=lambda k: best[-1][k][0])
    chosen = [j]
    for row in reversed(best[1:]):
        j = row[j][1]
        chosen.append(j)
    return chosen[::-1]


def parse_explicit(text: str, student_count: int, teacher_count: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs of ``"s:t,..."`` or ``"t0,t1,..."`` (module docstring), checked."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    example = "e.g. --mapping 0:1,1:3 or --mapping uniform"
    pairs_given = all(":" in item for item in items)
    try:
        if pairs_given:
            pairs = [(int(s), int(t)) for s, t in (item.split(":") for item in items)]
        else:
            pairs = list(enumerate(int(item) for item in items))
    except ValueError:  # a word that is no strategy, a stray ':' or a mix of the two forms
        raise ConfigError(f"--mapping {text!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a list of "
                          f"teacher blocks or student:teacher pairs ({example})") from None
    if not pairs:
        raise ConfigError(f"--mapping is empty: {example}")
    if not pairs_given and len(pairs) != student_count:
        raise ConfigError(f"--mapping {text!r} lists {len(pairs)} teacher blocks for a student of {student_count}: "
                          f"give one per student block, or student:teacher pairs ({example})")
    for s, t in pairs:
        if not 0 <= s < student_count:
            raise ConfigError(f"--mapping: student block {s} is out of range (the student has blocks 0-{student_count - 1})")
        if not 0 <= t < teacher_count:
            raise ConfigError(f"--mapping: teacher block {t} is out of range (the teacher has blocks 0-{teacher_count - 1})")
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        repeated = sorted({s for s in students if students.count(s) > 1})
        raise ConfigError(f"--mapping maps student block(s) {repeated} more than once: give each one teacher block")
    return sorted(pairs)


def _layer_types(model: Gemma3Config | Sequence[str]) -> tuple[str, ...]:
    return tuple(model.layer_types) if isinstance(model, Gemma3Config) else tuple(model)


def layer_mapping(student: Gemma3Config | Sequence[str], teacher: Gemma3Config | Sequence[str],
                  mapping: str = "uniform") -> list[LayerPair]:
    """The mapped pairs, in student order, for a strategy name or an explicit list (module docstring).
    ``student`` and ``teacher`` are configs or their ``layer_types``."""
    student_types, teacher_types = _layer_types(student), _layer_types(teacher)
    ls, lt = len(student_types), len(teacher_types)
    if mapping == "uniform":
        pairs = list(enumerate(uniform_indices(ls, lt)))
    elif mapping == "last":
        pairs = list(enumerate(last_indices(ls, lt)))
    elif mapping == "progressive":
        pairs = list(enumerate(progressive_indices(ls, lt)))
    elif mapping == "by-type":
        pairs = list(enumerate(by_type_indices(student_types, teacher_types)))
    else:
        pairs = parse_explicit(mapping, ls, lt)
    return [LayerPair(s, student_types[s], t, teacher_types[t]) for s, t in pairs]


__all__ = ["STRATEGIES", "LayerPair", "by_type_indices", "last_indices", "layer_mapping", "parse_explicit",
           "progressive_indices", "uniform_indices"]
