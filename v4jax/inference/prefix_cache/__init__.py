"""On-disk prefix KV cache (issue #14): requests that share a long prompt pay its prefill once.

An entry is the cache state of ONE sequence after prefilling exactly ``L`` tokens, where ``L`` is a
multiple of the alignment ``align`` (a multiple of every compression ratio: no compressor holds a
half-filled block there, and every complete entry row is final). It holds every per-sequence leaf
of the real cache pytree (``v4jax.model.transformer.init_cache``): the position, the window rings,
the compressors' projection rings, and the compressed CSA/HCA entries and indexer keys, the
latter cut to the ``L // ratio`` rows that exist, so an entry's size grows with ``L``, not with
the cache's ``max_len``. Every leaf keeps its dtype bit-exactly (fp32, bf16, fp8 e4m3, e8m0
scales, fp4 e2m1 packed two per byte on disk, int32). Restoring it into a fresh cache row gives
that row exactly the state a prefill of those ``L`` tokens would have left.

The cache pytree is read generically: which axis of a leaf is the batch axis and which grows with
``max_len`` (and by which ratio) is found by comparing ``jax.eval_shape`` of ``init_cache`` at two
batch sizes and two lengths (``cache_layout``), so a change of the compressor's state layout needs
no change here (the layout's fingerprint is part of every key: old entries simply stop matching).

Keys (sha256, also the file name): the model (``model_fingerprint``: canonical JSON of the config
and a hash of every parameter / buffer leaf's bytes, dtype and shape, in tree order), the cache
format (``"native"`` / ``"fp8"``), the cache layout (paths, dtypes and per-row shapes of the
leaves: this covers the cache dtype), the prefix length and the sha256 of its token ids (int32).

File format (``<key>.v4pc``)::

    b"V4PCACHE" | u32 version | u32 header_len | sha256(header) [32 bytes] | header | payload

``header``: UTF-8 JSON ``{"version", "key", "model", "fmt", "layout", "length", "tokens",
"dtype", "payload_bytes", "payload_sha256", "leaves": [{"path", "dtype", "shape", "offset",
"nbytes", "packing", "batch_axis", "len_axis", "ratio"}, ...]}``; ``payload``: each leaf's C-order
bytes (batch axis removed, entries axis cut), concatenated in tree order; ``packing = "fp4x2"``
marks FP4 leaves stored two values per byte. Both checksums are verified on every read; an entry
that fails (corrupt, truncated, unreadable, other layout) is warned about (``warnings.warn``
naming the file), deleted and treated as a miss: it is never used.

Writes are atomic (temp file in the same directory, ``fsync``, ``os.replace``, directory fsync);
recency is the file's mtime (set on store and on every hit, strictly increasing within a
process), so several processes can share a directory: after each store the least recently used
entries are deleted until the total is at most ``max_bytes``; files that vanish between listing
and reading (another process evicted them) are misses, not errors.

Typical use (``prefill_with_cache`` does all of this for a batch)::

    cache = PrefixCache("/var/cache/v4", max_bytes=50 * 2**30)
    L, state = cache.lookup(model, ids_row, fmt="native")
    kv = model.new_cache(batch, max_len)
    if state is not None:
        kv = restore_into(kv, row, state)           # then extend ids_row[L:] from position L
    ...
    cache.store(model, ids_row, take_row(model, kv, row))   # the row must be at an aligned position

Size: an entry is ``fixed_state_bytes`` (window rings, the compressors' fp32 projection rings,
pos: 15-22 MB for Flash / Pro in fp8, about 4k tokens' worth of entries) plus ``bytes_per_token``
per prefix token (3.5 KB Flash fp8, 5.0 KB Pro fp8: the spec 3.8 figures). At an aligned boundary
the HCA rings are never read again (their block is complete), but they are stored anyway so that
a restored row is bit-identical to a prefilled one.

Cost of the model fingerprint: it reads every weight once (sha256, about 1-2 GB/s per core; leaves
are hashed on a thread pool and big leaves slice by slice, so host memory stays bounded), then is
memoised per model object. That is milliseconds for the test models, about 20 s for ``tiny``-sized
checkpoints of a few GB, but minutes for Flash (~150 GB of FP8/FP4 weights) or Pro (~800 GB); for
those set it once from something cheaper that identifies the weights (e.g. a checkpoint's own
content hash) with ``set_model_fingerprint(model, "...")``.

Layout of this package, by job: ``layout`` (the cache pytree read generically, per-row state,
bytes on disk), ``rows`` (take a row out of a batched cache, restore one into it), ``keys`` (the model's
fingerprint), ``entry_file`` (the file format, atomic write, verified read),
``store`` (``PrefixCache``: prefix digests, lookup, store, eviction), ``prefill`` (``prefill_with_cache``).
"""

from v4jax.inference.prefix_cache.keys import (config_fingerprint, model_fingerprint, set_model_fingerprint,
                                               weights_fingerprint)
from v4jax.inference.prefix_cache.layout import (CacheLayout, RowState, bytes_per_token, cache_layout,
                                                 entry_payload_bytes, fixed_state_bytes, layout_of)
from v4jax.inference.prefix_cache.prefill import checkpoint_lengths, prefill_with_cache
from v4jax.inference.prefix_cache.rows import restore_into, take_row
from v4jax.inference.prefix_cache.store import PrefixCache

__all__ = ["PrefixCache", "RowState", "CacheLayout", "cache_layout", "layout_of", "take_row", "restore_into",
           "model_fingerprint", "set_model_fingerprint", "config_fingerprint", "weights_fingerprint",
           "bytes_per_token", "entry_payload_bytes", "fixed_state_bytes", "checkpoint_lengths",
           "prefill_with_cache"]
