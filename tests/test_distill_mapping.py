"""Layer mappings for hidden-state and attention transfer (gemmalab.distill.mapping): every table here is
derived by hand in the comments, from the formulas of the module docstring; by-type is also checked against
a brute-force search over every ordered same-type mapping."""

from itertools import combinations_with_replacement

import pytest

from gemmalab.config import FULL, SLIDING, Gemma3Config
from gemmalab.distill.mapping import by_type_indices, layer_mapping
from gemmalab.errors import ConfigError

L, G = SLIDING, FULL


def pattern(blocks: int) -> list[str]:
    """Gemma 3's 5:1 pattern: every sixth block (5, 11, ...) global."""
    return [G if (i + 1) % 6 == 0 else L for i in range(blocks)]


def teachers(student: str, teacher: str, mapping: str) -> list[int]:
    return [pair.teacher_layer for pair in layer_mapping(Gemma3Config.preset(student), Gemma3Config.preset(teacher), mapping)]


def test_uniform_for_270m_from_1b():
    # Ls 18, Lt 26: round((i + 1) * 13 / 9) - 1; e.g. i=0: 1.44 -> 1 -> 0; i=1: 2.89 -> 3 -> 2; i=8: 13 -> 12;
    # i=16: 24.56 -> 25 -> 24; i=17: 26 -> 25
    assert teachers("gemma-3-270m", "gemma-3-1b", "uniform") == [
        0, 2, 3, 5, 6, 8, 9, 11, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25]


def test_uniform_rounds_halves_up():
    # Ls 4, Lt 6: (i + 1) * 1.5 = 1.5, 3, 4.5, 6 -> 2, 3, 5, 6 -> minus one
    assert [p.teacher_layer for p in layer_mapping(pattern(4), pattern(6), "uniform")] == [1, 2, 4, 5]


def test_uniform_onto_a_shallower_teacher_repeats_blocks():
    # Ls 6, Lt 3: round((i + 1) / 2) - 1 = round(0.5, 1, 1.5, 2, 2.5, 3) - 1 = 0, 0, 1, 1, 2, 2
    assert [p.teacher_layer for p in layer_mapping(pattern(6), pattern(3), "uniform")] == [0, 0, 1, 1, 2, 2]


def test_last_takes_the_teachers_top_blocks():
    # 26 - 18 + i
    assert teachers("gemma-3-270m", "gemma-3-1b", "last") == list(range(8, 26))
    with pytest.raises(ConfigError, match="at least as deep"):
        layer_mapping(pattern(18), pattern(6), "last")


def test_progressive_for_270m_from_1b():
    # raw = round(26 (i+1)(i+2) / 342) - 1: -1, -1, 0, 1, 1, 2, 3, 4, 6, 7, 9, 11, 13, 15, 17, 20, 22, 25;
    # then at least one above the previous block and at most 8 + i: 0 .. 11 (the raw values are lower), then
    # 13, 15, 17, 20, 22, 25 as they are. The gaps at the top grow: 2, 2, 2, 3, 2, 3.
    assert teachers("gemma-3-270m", "gemma-3-1b", "progressive") == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 20, 22, 25]


def test_progressive_is_denser_early_than_uniform():
    # Ls 3, Lt 12: raw = round(12 (i+1)(i+2) / 12) - 1 = 2 - 1, 6 - 1, 12 - 1 = 1, 5, 11 (uniform: 3, 7, 11)
    assert [p.teacher_layer for p in layer_mapping(pattern(3), pattern(12), "progressive")] == [1, 5, 11]


def test_by_type_on_a_hand_example():
    # student LLLLLG, teacher LLLLLG LLLLLG; uniform positions 1, 3, 5, 7, 9, 11. Block 5 (global) -> 11 (global,
    # exact). Block 2's position 5 is the teacher's global: 4 and 6 are one away each, the lower wins.
    pairs = layer_mapping(pattern(6), pattern(12), "by-type")
    assert [p.teacher_layer for p in pairs] == [1, 3, 4, 7, 9, 11]
    assert all(p.same_type for p in pairs)
    assert [p.as_dict() for p in pairs][-1] == {"student_layer": 5, "student_type": "global",
                                                 "teacher_layer": 11, "teacher_type": "global"}


def brute_force_cost(student: list[str], teacher: list[str]) -> tuple[int, int]:
    """The least (repeats, distance) over every non-decreasing same-type choice of teacher blocks."""
    ls, lt = len(student), len(teacher)
    best = None
    for chosen in combinations_with_replacement(range(lt), ls):  # every non-decreasing sequence
        if any(teacher[t] != s for t, s in zip(chosen, student, strict=True)):
            continue
        repeats = sum(a == b for a, b in zip(chosen, chosen[1:], strict=False))
        distance = sum(abs(ls * (t + 1) - lt * (i + 1)) for i, t in enumerate(chosen))
        best = min(best or (repeats, distance), (repeats, distance))
    return best


@pytest.mark.parametrize(("ls", "lt"), [(6, 12), (6, 8), (7, 13), (12, 12), (8, 7)])
def test_by_type_is_the_best_ordered_same_type_mapping(ls, lt):
    student, teacher = pattern(ls), pattern(lt)
    chosen = by_type_indices(student, teacher)
    assert all(teacher[t] == s for t, s in zip(chosen, student, strict=True))
    assert chosen == sorted(chosen)
    repeats = sum(a == b for a, b in zip(chosen, chosen[1:], strict=False))
    distance = sum(abs(ls * (t + 1) - lt * (i + 1)) for i, t in enumerate(chosen))
    assert (repeats, distance) == brute_force_cost(student, teacher)


def test_by_type_for_270m_from_1b_keeps_types_and_order():
    pairs = layer_mapping(Gemma3Config.preset("gemma-3-270m"), Gemma3Config.preset("gemma-3-1b"), "by-type")
    chosen = [p.teacher_layer for p in pairs]
    assert all(p.same_type for p in pairs) and chosen == sorted(set(chosen))
    # the student's globals (5, 11, 17) on teacher globals (5, 11, 17, 23)
    assert {p.student_layer: p.teacher_layer for p in pairs if p.student_type == G} == {5: 5, 11: 17, 17: 23}


def test_by_type_refuses_what_cannot_be_ordered():
    with pytest.raises(ConfigError, match="no global layer"):
        layer_mapping(pattern(6), pattern(5), "by-type")  # a teacher without a global layer
    with pytest.raises(ConfigError, match="student block 6"):
        layer_mapping(pattern(12), pattern(6), "by-type")  # locals above the teacher's last local


def test_explicit_lists():
    assert [(p.student_layer, p.teacher_layer) for p in layer_mapping(pattern(6), pattern(12), "5:11, 0:1")] == [
        (0, 1), (5, 11)]
    pairs = layer_mapping(pattern(6), pattern(12), "1,3,5,7,9,11")
    assert [(p.student_layer, p.teacher_layer, p.same_type) for p in pairs][2] == (2, 5, False)


@pytest.mark.parametrize(("text", "message"), [
    ("0:1,0:2", "more than once"),
    ("0:12", "teacher block 12 is out of range"),
    ("6:0", "student block 6 is out of range"),
    ("1,2,3", "lists 3 teacher blocks for a student of 6"),
    ("unifrom", "neither a strategy"),
    ("0:1,2", "neither a strategy"),
    (",", "empty"),
])
def test_bad_explicit_lists_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        layer_mapping(pattern(6), pattern(12), text)
