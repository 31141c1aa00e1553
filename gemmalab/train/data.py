"""Training data: documents from files or the embedded corpus, tokenized, packed into fixed-length
windows, split into training and held-out sets, and served in a deterministic shuffled order whose
position is part of a checkpoint.

Sources (``--data``):

* nothing: the embedded default corpus, the documentation text that ships inside CPython
  (``pydoc_data.topics``, about 0.46 MB of English prose and code in 79 topics): no download, anywhere;
* a ``.jsonl`` file: one JSON object per line, one of
  - ``{"text": ...}``: the loss falls on every token;
  - a chat ``{"messages": [...]}``: the loss falls on the assistant replies only (Gemma's turn format,
    gemmalab.tokenizer.chat_segments);
  - ``{"prompt": ..., "completion": ...}`` (the form TRL and mlx-lm take): the loss falls on the completion
    (and the closing <eos>) only. Two strings are joined as they are, with no template (as TRL does for
    plain text); two lists of messages (TRL's conversational form) are one chat in Gemma's turn format,
    trained on the completion's replies only;
* any other file: plain UTF-8 text, one document;
* a folder: every ``.txt``, ``.md`` and ``.jsonl`` file under it, in sorted order.

Packing: each document becomes ``<bos> tokens <eos>`` and documents are concatenated into one stream, cut
into windows of ``seq_len + 1`` tokens (inputs are the first ``seq_len``, targets the last ``seq_len``). A
loss weight rides with every target: 1 for trained tokens, 0 for prompts and user turns. Windows do not
overlap; a stream tail shorter than a window is dropped. The held-out split takes a fixed, seeded sample of
whole windows, so training never sees them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import is_count
from ..errors import InputError
from ..tokenizer import Tokenizer, chat_segments

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One training document: plain text, or a conversation (a list of role/content messages)."""

    text: str | None = None
    messages: list | None = None
    prompt: str | None = None  # with completion: a prompt/completion pair of plain strings
    completion: str | None = None
    untrained_replies: int = 0  # leading assistant replies of `messages` that are prompt, not trained


def embedded_corpus() -> list[Document]:
    """CPython's bundled documentation topics (pydoc_data.topics), one document per topic, sorted by name."""
    from pydoc_data.topics import topics

    return [Document(text=topics[name]) for name in sorted(topics)]


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL file; a line that is not JSON stops with
    its number."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number} is not valid JSON ({err.msg}): fix or remove that line") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    for number, record in jsonl_records(path):
        document = _record_document(record)
        if document is None:
            raise InputError(
                f'{path}:{number} has no "text" string, "messages" list or "prompt"/"completion" pair: '
                "give each line one of them"
            )
        yield document


def _record_document(record: object) -> Document | None:
    """The document of one JSONL record, or None when it has none of the known forms."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return Document(text=record["text"])
    if isinstance(record.get("messages"), list):
        return Document(messages=record["messages"])
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Document(prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        replies_in_prompt = sum(isinstance(m, dict) and m.get("role") in ("assistant", "model") for m in prompt)
        return Document(messages=prompt + completion, untrained_replies=replies_in_prompt)
    return None


def _file_documents(path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
        return
    try:
        yield Document(text=path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: convert it, or pass a .jsonl file") from None


def load_documents(source: str | Path | None) -> list[Document]:
    """The documents of a data source (see the module docstring); None = the embedded corpus."""
    if source is None or str(source) in ("", "embedded"):
        return embedded_corpus()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} files: point --data at a file or such a folder")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"data {path} does not exist: give a text file, a .jsonl file or a folder (or omit --data)")
    documents = [doc for file in files for doc in _file_documents(file)]
    if not documents:
        raise InputError(f"{path} holds no documents")
    return documents


def tokenize(document: Document, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) of one document: ``<bos> ... <eos>`` ids and, per id, whether the loss predicts it."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if document.completion is not None:
        prompt = tokenizer.encode(document.prompt or "", add_bos=True)
        completion = tokenizer.encode(document.completion, add_bos=False) + eos
        ids, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    elif document.messages is None:
        ids = tokenizer.encode(document.text or "", add_bos=True) + eos
        trained = [False] + [True] * (len(ids) - 1)  # nothing predicts <bos>
    else:
        ids, trained = [], []
        replies_left_untrained = document.untrained_replies
        for piece, is_reply in chat_segments(document.messages, bos=""):
            if is_reply and replies_left_untrained > 0:  # a reply inside a prompt/completion pair's prompt
                is_reply, replies_left_untrained = False, replies_left_untrained - 1
            piece_ids = tokenizer.encode(piece, add_bos=not ids)
            ids += piece_ids
            trained += [is_reply] * len(piece_ids)
        trained[0] = False
        ids += eos
        trained += [False] * len(eos)
    return np.asarray(ids, np.int32), np.asarray(trained, np.bool_)


def pack(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(windows [n, seq_len + 1] int32, trained [n, seq_len + 1] bool) from the concatenated documents.

    Data with nothing to learn from is refused here, before any step runs: a run over it would report a
    loss of 0 over 0 tokens and look like it succeeded."""
    if not is_count(seq_len) or seq_len < 1:
        raise InputError(f"sequence length must be a positive integer, got {seq_len!r}: pass e.g. --seq-len 256")
    documents = list(documents)
    pieces = [tokenize(doc, tokenizer) for doc in documents]
    ids = np.concatenate([p[0] for p in pieces])
    trained = np.concatenate([p[1] for p in pieces])
    width = seq_len + 1
    count = len(ids) // width
    if count == 0:
        raise InputError(f"the data has {len(ids)} tokens, fewer than one window of {width}: lower --seq-len or add data")
    windows, trained = ids[: count * width].reshape(count, width), trained[: count * width].reshape(count, width)
    if not trained[:, 1:].any():
        chats = any(doc.messages is not None for doc in documents)
        why = "no chat has an assistant reply" if chats else "every token is prompt"
        raise InputError(f"the data has no tokens to train on or score ({why}): "
                         "give each chat at least one assistant reply, or pass text records")
    return windows, trained


@dataclass
class Batch:
    """inputs, targets int32 [batch, seq]; weights float32 [batch, seq] (1 = trained target). Optional, as
    gemmalab.train.inputs describes them: explicit positions and a boolean mask, and the named extra inputs
    the loss terms read. ``windows`` int64 [batch]: the index of each row's window among the packed windows
    (``pack``'s order), which is how a row finds its targets in an offline teacher cache."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray | None = None
    mask: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    windows: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.weights.sum())


def make_batch(windows: np.ndarray, trained: np.ndarray, indices: np.ndarray | None = None) -> Batch:
    """The batch of packed windows [batch, seq_len + 1]; ``indices``: their indices among the packed windows."""
    return Batch(
        inputs=np.ascontiguousarray(windows[:, :-1]),
        targets=np.ascontiguousarray(windows[:, 1:]),
        weights=trained[:, 1:].astype(np.float32),
        windows=None if indices is None else np.asarray(indices, np.int64),
    )


class DataStream:
    """Packed windows served in batches: a seeded shuffle per epoch, a held-out split, and a position
    (epoch, index) that a checkpoint saves so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, windows: np.ndarray, trained: np.ndarray, *, seed: int, eval_fraction: float, eval_windows_max: int = 64,
                 max_train_windows: int | None = None):
        if not 0.0 <= eval_fraction < 1.0:
            raise InputError(f"eval fraction must be in [0, 1), got {eval_fraction}")
        order = np.random.default_rng([seed, 0xE7A1]).permutation(len(windows))
        n_eval = min(eval_windows_max, int(round(len(windows) * eval_fraction))) if eval_fraction > 0 else 0
        if eval_fraction > 0 and len(windows) >= 2:
            n_eval = max(1, n_eval)
        # A data-limited run keeps the first max_train_windows of the same seeded order after the held-out ones,
        # so the held-out split, and every perplexity measured on it, is the one a full run has.
        kept = order[n_eval:] if max_train_windows is None else order[n_eval:n_eval + max_train_windows]
        held_out, train = np.sort(order[:n_eval]), np.sort(kept)
        self.train_windows, self.train_trained = windows[train], trained[train]
        self.eval_windows, self.eval_trained = windows[held_out], trained[held_out]
        # Where each kept window sits among the packed windows (Batch.windows).
        self.train_indices, self.eval_indices = train.astype(np.int64), held_out.astype(np.int64)
        if len(self.train_windows) and not self.train_trained[:, 1:].any():
            raise InputError("after the held-out split no training window has a token to train on: "
                             "add data, or lower eval_fraction")
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_windows))

    def next_batch(self, batch_size: int) -> Batch:
        """The next ``batch_size`` training windows, wrapping into a freshly shuffled epoch as needed."""
        if len(self.train_windows) == 0:
            raise InputError("no training windows are left after the held-out split: add data or lower --seq-len")
        rows = []
        while len(rows) < batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            rows.append(self._order[self.position])
            self.position += 1
        index = np.asarray(rows)
        return make_batch(self.train_windows[index], self.train_trained[index], self.train_indices[index])

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
        """The held-out windows in fixed order, ``batch_size`` at a time (the last batch may be smaller)."""
        for n, start in enumerate(range(0, len(self.eval_windows), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            stop = start + batch_size
            yield make_batch(self.eval_windows[start:stop], self.eval_trained[start:stop],
                             self.eval_indices[start:stop])

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


__all__ = [
    "Batch",
    "DataStream",
    "Document",
    "embedded_corpus",
    "load_documents",
    "make_batch",
    "pack",
    "tokenize",
]
