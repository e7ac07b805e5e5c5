"""Training input pipeline: shipped corpus → TFDS (array_record, no TensorFlow) → tokenizer → packing → grain.

    >>> from v4jax.data import prepare, make_dataset, make_eval_dataset, loss_masks
    >>> prepare()                                             # once: builds ~/.cache/v4jax/tfds, reports sizes
    >>> it = make_dataset("train", seq_len=256, batch_size=16, seed=0)
    >>> batch = next(it)                                      # tokens / segment_ids: int32 [16, 257]
    >>> next_mask, mtp_mask = loss_masks(batch["segment_ids"])   # [16, 256] bool each
    >>> state = it.get_state()                                # JSON-able; it.set_state(state) resumes exactly
    >>> it = make_dataset("train", 256, 16, source="my_corpus/", tokenizer="my_tokenizer.json")   # your own data
    >>> it.stats                                              # documents, tokens, bytes per token, rows

Your own data: ``sources`` (files: .txt/.md, .jsonl/.json, .parquet; or a prepared TFDS dataset) →
``shards`` (tokenized and packed once into array_record shards, streamed) → the same grain iterator.
"""

from v4jax.data.builder import default_data_dir, ensure_prepared, load_builder, read_split
from v4jax.data.corpus import CORPUS_PATH, SPLITS, read_corpus, split_of
from v4jax.data.packing import loss_masks, pack_documents, segment_positions
from v4jax.data.pipeline import (DataIterator, make_dataset, make_eval_dataset, packed_split, prepare, split_num_bytes,
                                 tokenized_split)
from v4jax.data.shards import Prepared, UserData, prepare_user_data
from v4jax.data.sources import DataError, FileSource, TfdsSource, in_eval_split
from v4jax.data.tokenizer import ByteTokenizer, Tokenizer, default_tokenizer, get_tokenizer, train_bpe

__all__ = ["DataError", "FileSource", "Prepared", "TfdsSource", "UserData", "in_eval_split", "prepare_user_data",
           "CORPUS_PATH", "SPLITS", "ByteTokenizer", "DataIterator", "Tokenizer", "default_data_dir",
           "default_tokenizer", "ensure_prepared", "get_tokenizer", "load_builder", "loss_masks", "make_dataset",
           "make_eval_dataset", "pack_documents", "packed_split", "prepare", "read_corpus", "read_split",
           "segment_positions", "split_num_bytes", "split_of", "tokenized_split", "train_bpe"]
