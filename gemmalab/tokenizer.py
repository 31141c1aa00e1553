"""Tokenizers and Gemma's chat format.

A checkpoint carries ``tokenizer.json`` (read with the ``tokenizers`` library) or ``tokenizer.model`` (a
SentencePiece model). Both are wrapped by one small class, so the rest of gemmalab sees ``encode``,
``decode`` and the special ids only.

Models trained from a preset at random init have no tokenizer of their own: they use a byte-level one
(:meth:`Tokenizer.byte_level`), five special tokens then the 256 byte values, 261 ids in all. It is built
with the ``tokenizers`` library, so it saves as an ordinary ``tokenizer.json`` next to the weights.

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

# The byte-level vocabulary: Gemma's ids for pad, eos and bos (0, 1, 2), the turn markers, then byte b at b + 5.
BYTE_LEVEL_SPECIALS = ("<pad>", "<eos>", "<bos>", START_OF_TURN, END_OF_TURN)
BYTE_LEVEL_VOCAB_SIZE = len(BYTE_LEVEL_SPECIALS) + 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of the ``ByteLevel`` pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    for n, b in enumerate(extra):
        chars[b] = chr(256 + n)
    return chars


def _byte_level_hf_tokenizer():
    """A ``tokenizers.Tokenizer`` mapping every byte to one id (b + 5), with Gemma's special tokens first."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(BYTE_LEVEL_SPECIALS)}
    vocab.update({char: len(BYTE_LEVEL_SPECIALS) + b for b, char in _bytes_to_unicode().items()})
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_LEVEL_SPECIALS])
    return tokenizer


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


def chat_segments(messages: Iterable[Mapping[str, object]], *, bos: str = "<bos>") -> list[tuple[str, bool]]:
    """A conversation ({"role": "system"|"user"|"assistant", "content": ...}) in Gemma's turn format, as
    (text, is_reply) pieces whose concatenation is the rendered conversation: ``is_reply`` marks each
    assistant reply with its closing <end_of_turn>, the tokens a chat fine-tune trains on."""
    messages = list(messages)
    prefix = ""
    if messages and messages[0].get("role") == "system":
        prefix = _content_text(messages[0].get("content", "")).strip() + "\n\n"
        messages = messages[1:]
    pieces = [(bos, False)]
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant", "model"):
            raise InputError(f"message {i} has role {role!r}: use user or assistant (system only first)")
        if (role == "user") != (i % 2 == 0):
            raise InputError("conversation roles must alternate user/assistant/user/... starting with user")
        text = _content_text(message.get("content", "")).strip()
        if role == "user":
            pieces.append((f"{START_OF_TURN}user\n{prefix if i == 0 else ''}{text}{END_OF_TURN}\n", False))
        else:
            pieces += [(f"{START_OF_TURN}model\n", False), (f"{text}{END_OF_TURN}", True), ("\n", False)]
    return pieces


def format_chat(messages: Iterable[Mapping[str, object]], *, add_generation_prompt: bool = True, bos: str = "<bos>") -> str:
    """Render messages ({"role": "system"|"user"|"assistant", "content": ...}) in Gemma's turn format."""
    text = "".join(piece for piece, _ in chat_segments(messages, bos=bos))
    return text + (f"{START_OF_TURN}model\n" if add_generation_prompt else "")


class Tokenizer:
    """Text <-> token ids for one checkpoint, over either tokenizers or sentencepiece."""

    def __init__(self, path: Path | None, *, hf_tokenizer=None):
        self.path = Path(path) if path is not None else None
        if hf_tokenizer is not None:  # built in memory (the byte-level tokenizer)
            self._hf, self._sp = hf_tokenizer, None
            self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        elif self.path.name == "tokenizer.json":
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
    def byte_level(cls) -> Tokenizer:
        """The byte-level tokenizer of models trained from a preset (BYTE_LEVEL_VOCAB_SIZE ids)."""
        return cls(None, hf_tokenizer=_byte_level_hf_tokenizer())

    def save(self, folder: str | Path) -> Path:
        """Write this tokenizer into ``folder`` as tokenizer.json (tokenizer.model for SentencePiece)."""
        from .checkpoint import atomic_write_bytes

        if self._hf is not None:
            target = Path(folder) / "tokenizer.json"
            atomic_write_bytes(target, self._hf.to_str().encode("utf-8"))
        else:
            target = Path(folder) / "tokenizer.model"
            atomic_write_bytes(target, self._sp.serialized_model_proto())
        return target

    @property
    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer (vocabulary, merges, normalizer, special tokens): two
        tokenizers with the same fingerprint turn every text into the same ids."""
        import hashlib

        data = self._hf.to_str().encode("utf-8") if self._hf is not None else self._sp.serialized_model_proto()
        return hashlib.sha256(data).hexdigest()[:16]

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
