"""Tokenizers (tokenizer.json and tokenizer.model) and Gemma's chat format.

Both tokenizer files are made here: a BPE trained with the tokenizers library and a SentencePiece model
trained with sentencepiece, each with Gemma's special tokens at Gemma's ids (pad 0, eos 1, bos 2) and, like
Gemma's tokenizer.model, no dummy-prefix space.
"""

from __future__ import annotations

import pytest

from gemmalab import Tokenizer, format_chat
from gemmalab.errors import InputError, TokenizerError

CORPUS = [
    "Gemma is a family of lightweight open models.",
    "The sliding window keeps the cache small while the context grows.",
    "Local layers look back one window; global layers see everything.",
] * 20
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.Train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=50,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", add_dummy_prefix=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_chat_format_by_hand():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi!  "},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "Window size?"},
    ]
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWindow size?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert format_chat(messages) == expected
    assert format_chat(messages[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n"


@pytest.mark.parametrize("messages", [[{"role": "assistant", "content": "x"}], [{"role": "user", "content": "a"}] * 2,
                                      [{"role": "tool", "content": "x"}]])
def test_chat_format_rejects_bad_turns(messages):
    with pytest.raises(InputError):
        format_chat(messages)


@pytest.mark.parametrize("which", ["tokenizer_json", "tokenizer_model"])
def test_tokenizer_round_trip_and_specials(which, request):
    tok = Tokenizer(request.getfixturevalue(which))
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    text = "Local layers look back one window."
    ids = tok.encode(text)
    assert ids[0] == 2 and ids.count(2) == 1
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    chat = tok.apply_chat([{"role": "user", "content": "Gemma is a family."}])
    turn = tok.token_to_id("<start_of_turn>")
    assert turn is not None and chat[:2] == [2, turn] and chat.count(turn) == 2  # one token each, one <bos>
    assert tok.end_of_turn_id == tok.token_to_id("<end_of_turn>") and tok.end_of_turn_id in chat


def test_folder_prefers_tokenizer_json(tokenizer_json, tokenizer_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    assert Tokenizer.from_folder(tmp_path).path.name == "tokenizer.model"
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    assert Tokenizer.from_folder(tmp_path).path.name == "tokenizer.json"
    assert Tokenizer.from_folder(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_is_a_clear_error(name, tmp_path):
    (tmp_path / name).write_text("not a tokenizer")
    with pytest.raises(TokenizerError, match=name):
        Tokenizer(tmp_path / name)
