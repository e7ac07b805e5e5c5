"""Tokenizers for the training pipeline.

* ``Tokenizer``: byte-level BPE (``tokenizers`` package) with vocab 4096, the ``tiny`` preset's vocab, trained on the train
  split of the shipped corpus and stored in ``tokenizer.json`` beside this file. Every string round-trips exactly.
* ``ByteTokenizer``: pure-Python fallback, one token per UTF-8 byte plus the same three specials (vocab 259), for tests
  and configs with tiny vocabularies.

Both have fixed special ids: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2. Special-token *strings* inside text are
encoded as ordinary text, so a document can never inject a special id.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

TOKENIZER_PATH = Path(__file__).resolve().parent / "tokenizer.json"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")      # ids 0, 1, 2 in both tokenizers
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BPE_VOCAB_SIZE = 4096


class Tokenizer:
    """Byte-level BPE behind a small interface (``encode``/``decode``/``vocab_size``/special ids)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tok):
        import tokenizers
        if not isinstance(tok, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        for i, s in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"special token {s!r} must have id {i}, has {tok.token_to_id(s)}")
        tok.encode_special_tokens = True        # "<|eos|>" in a document is text, not the eos id
        self._tok = tok
        self._json = tok.to_str()
        self.fingerprint = "bpe-" + hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path = TOKENIZER_PATH) -> Tokenizer:
        import tokenizers
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (~1.5x faster); same ids
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, {self.fingerprint})"


class ByteTokenizer:
    """One token per UTF-8 byte: id = byte + 3; ids 0..2 are ``<|pad|>``, ``<|bos|>``, ``<|eos|>``. Vocab 259."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    vocab_size = 256 + len(SPECIAL_TOKENS)
    fingerprint = "byte-v1"
    _offset = len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._offset).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if i >= self._offset:
                buf.append(i - self._offset)
                continue
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(SPECIAL_TOKENS[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The shipped 4096-token BPE (loaded once per process)."""
    return Tokenizer.from_file(TOKENIZER_PATH)


def get_tokenizer(spec: str | Path | Tokenizer | ByteTokenizer | None = None) -> Tokenizer | ByteTokenizer:
    """``None``/``"bpe"`` → the shipped BPE; ``"byte"`` → ``ByteTokenizer``; a path → that ``tokenizer.json``;
    an object with ``encode``/``decode`` → itself."""
    if spec is None or spec == "bpe":
        return default_tokenizer()
    if spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, (str, Path)):
        return Tokenizer.from_file(spec)
    for attr in ("encode", "decode", "eos_id", "pad_id", "vocab_size", "fingerprint"):
        if not hasattr(spec, attr):
            raise TypeError(f"tokenizer {spec!r} lacks {attr!r}")
    return spec


def train_bpe(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE with the fixed special ids. Deterministic for a given text sequence."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return Tokenizer(tok)
