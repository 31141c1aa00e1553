"""Stop strings, decided once in the core (gemmalab.generation.RowText), checked against hand-worked examples
with a tokenizer whose decoding is a plain concatenation of pieces."""

from __future__ import annotations

import pytest

from gemmalab.errors import InputError
from gemmalab.generation import RowText, split_stops


class PieceTokenizer:
    """Token i decodes to PIECES[i]; a sequence decodes to the concatenation (an oracle with no subtlety)."""

    PIECES = ["Hel", "lo", " wor", "ld", "\n", "\nUs", "er:", " ok"]

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def feed(text: RowText, ids):
    shown, stopped = [], False
    for i in ids:
        stopped = text.add(i)
        shown.append(text.take())
        if stopped:
            break
    return shown, stopped


def test_text_before_a_stop_string_is_shown_and_the_string_never_is():
    text = RowText(PieceTokenizer(), ["\nUser:"])
    shown, stopped = feed(text, [0, 1, 4, 5, 6, 7])
    # "Hel" "lo" pass; "\n" might start "\nUser:" so it waits; "\nUs" makes "\n\nUs": the first "\n" is safe,
    # "\nUs" waits; "er:" completes the stop string, which starts at index 6 of "Hello\n\nUser:"
    assert shown == ["Hel", "lo", "", "\n", ""] and stopped
    assert text.text == "Hello\n" and text.flush() == ""


def test_held_back_text_is_released_when_the_row_ends_otherwise():
    text = RowText(PieceTokenizer(), ["\nUser:"])
    shown, stopped = feed(text, [2, 3, 4])
    assert shown == [" wor", "ld", ""] and not stopped
    assert text.flush() == "\n" and text.text == " world\n"


def test_the_earliest_of_several_stop_strings_wins():
    text = RowText(PieceTokenizer(), ["ld", "wor"])
    shown, stopped = feed(text, [0, 1, 2])
    assert stopped and text.text == "Hello "


def test_split_stops_sorts_ids_from_strings_and_refuses_the_rest():
    assert split_stops([1, "END", 106]) == ([1, 106], ("END",))
    assert split_stops("END") == ([], ("END",)) and split_stops(None) == ([], ())
    with pytest.raises(InputError, match="empty stop string"):
        split_stops([""])
    with pytest.raises(InputError, match="token ids"):
        split_stops([True])
