"""Tokenizers and Gemma's chat format.

A checkpoint carries ``tokenizer.json`` (read with the ``tokenizers`` library) or ``tokenizer.model`` (a
SentencePiece model). Both are wrapped by one small class, so the rest of gemmalab sees ``encode``,
``decode`` and the special ids only.

Gemma's turn format (the chat template shipped with the instruction-tuned checkpoints)::

    <bos><start_of_turn>user
    {system}\n\n{first user message}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    <start_of_turn>model            <- the generation prompt

There is no system role: a system message is prepended to the first user turn, followed by a blank line.
The assistant's role is called ``model``. Message contents are stripped of surrounding white space.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import InputError, TokenizerError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


def _content_text(content: object) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise InputError(f"message content part {part!r} is not text: gemmalab's Gemma is text-only")
        return "".join(parts)
    raise InputError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def format_chat(messages: Iterable[Mapping[str, object]], *, add_generation_prompt: bool = True, bos: str = "<bos>") -> str:
    """Render messages ({"role": "system"|"user"|"assistant", "content": ...}) in Gemma's turn format."""
    messages = list(messages)
    prefix = ""
    if messages and messages[0].get("role") == "system":
        prefix = _content_text(messages[0].get("content", "")).strip() + "\n\n"
        messages = messages[1:]
    out = [bos]
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant", "model"):
            raise InputError(f"message {i} has role {role!r}: use user or assistant (system only first)")
        if (role == "user") != (i % 2 == 0):
            raise InputError("conversation roles must alternate user/assistant/user/... starting with user")
        turn_role = "user" if role == "user" else "model"
        text = _content_text(message.get("content", "")).strip()
        out.append(f"{START_OF_TURN}{turn_role}\n{prefix if i == 0 else ''}{text}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


class Tokenizer:
    """Text <-> token ids for one checkpoint, over either tokenizers or sentencepiece."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.name == "tokenizer.json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(self.path))
            except Exception as err:  # the Rust library raises plain Exception subclasses
                raise TokenizerError(f"{self.path} is not a readable tokenizer.json ({err}): re-download it") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece as spm

            self._hf = None
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(self.path))
            except (OSError, RuntimeError) as err:
                raise TokenizerError(f"{self.path} is not a readable SentencePiece model ({err}): re-download it") from None
            self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self.token_to_id("<bos>")
        self.eos_id = self.token_to_id("<eos>")
        self.pad_id = self.token_to_id("<pad>")
        self.end_of_turn_id = self.token_to_id(END_OF_TURN)

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        """The checkpoint's tokenizer: tokenizer.json preferred, else tokenizer.model; None when it has neither."""
        for name in ("tokenizer.json", "tokenizer.model"):
            if (Path(folder) / name).is_file():
                return cls(Path(folder) / name)
        return None

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        piece_id = self._sp.PieceToId(token)
        return None if piece_id == self._sp.unk_id() and token != self._sp.IdToPiece(piece_id) else piece_id

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` exactly one <bos> leads (never two)."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.EncodeAsIds(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if not self._sp.IsControl(i)]
        return self._sp.DecodeIds(ids)

    def apply_chat(self, messages: Iterable[Mapping[str, object]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in Gemma's turn format, ready for generation."""
        text = format_chat(messages, add_generation_prompt=add_generation_prompt, bos="")
        return self.encode(text, add_bos=True)
