"""Tokenizers for the training pipeline.

* ``Tokenizer``: byte-level BPE (``tokenizers`` package) with vocab 4096, the ``tiny`` preset's vocab, trained on the train
  split of the shipped corpus and stored in ``tokenizer.json`` beside this file. Every string round-trips exactly.
* ``ByteTokenizer``: pure-Python fallback, one token per UTF-8 byte plus the same three specials (vocab 259), for tests
  and configs with tiny vocabularies.

Both have fixed special ids: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2. Special-token *strings* inside text are
encoded as ordinary text, so a document can never inject a special id.

* Any other Hugging Face ``tokenizer.json`` (``get_tokenizer("path/to/tokenizer.json")``) works too: its end-of-text
  token (``<|endoftext|>``, ``</s>``, ...) ends each document; ``train_bpe`` / ``v4jax-tokenizer`` train a new one
  with the v4jax specials on your own text.
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


_EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "[SEP]")
_BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "[CLS]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<｜▁pad▁｜>")


def _find_special(tok, names) -> int | None:
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return int(i)
    return None


class Tokenizer:
    """Byte-level BPE behind a small interface (``encode``/``decode``/``vocab_size``/special ids)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tok, source: str | None = None):
        import tokenizers
        if not isinstance(tok, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        where = f"tokenizer {source}" if source else "tokenizer"
        if all(tok.token_to_id(s) == i for i, s in enumerate(SPECIAL_TOKENS)):
            self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        else:
            # any Hugging Face tokenizer.json: find its end-of-text token (documents are eos-terminated), and
            # use it for bos / pad when the file has none (padding is masked by segment id 0 anyway)
            eos, bos, pad = (_find_special(tok, names) for names in (_EOS_NAMES, _BOS_NAMES, _PAD_NAMES))
            if eos is None:
                raise ValueError(f"{where} has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                                 "v4jax ends every document with one")
            self.eos_id, self.bos_id = eos, (eos if bos is None else bos)
            self.pad_id = eos if pad is None else pad
        tok.encode_special_tokens = True        # "<|eos|>" in a document is text, not the eos id
        self._tok = tok
        self._json = tok.to_str()
        self.source = source
        self.fingerprint = "bpe-" + hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path = TOKENIZER_PATH) -> Tokenizer:
        """A ``tokenizer.json`` (any Hugging Face ``tokenizers`` file); a clear error naming the file if it
        is missing or not a tokenizer."""
        import tokenizers
        path = Path(path).expanduser()
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:      # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"tokenizer file {str(path)!r} is not a Hugging Face tokenizers file: {e}") from None
        return cls(tok, source=str(path))

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
        return _file_tokenizer(str(Path(spec).expanduser().resolve()), *_stat(spec))
    for attr in ("encode", "decode", "eos_id", "pad_id", "vocab_size", "fingerprint"):
        if not hasattr(spec, attr):
            raise TypeError(f"tokenizer {spec!r} lacks {attr!r}")
    return spec


def _stat(path) -> tuple[int, int]:
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist") from None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _file_tokenizer(path: str, mtime_ns: int, size: int) -> Tokenizer:
    return Tokenizer.from_file(path)            # loaded once per file version and process


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
        raise ValueError(f"the training text gives only {tok.get_vocab_size()} BPE tokens (merges of pairs seen "
                         f"at least twice), fewer than vocab_size {vocab_size}: use a smaller vocabulary or more text")
    return Tokenizer(tok)
