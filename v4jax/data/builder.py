"""TFDS builder over the shipped corpus (no download, no TensorFlow).

    >>> from v4jax.data import prepare, load_builder
    >>> prepare()                                  # writes array_record files once into ~/.cache/v4jax/tfds
    >>> src = load_builder().as_data_source("validation")
    >>> src[0]["name"], src[0]["text"][:20]        # bytes

The builder is defined in a plain module, so ``_info`` returns ``tfds.core.DatasetInfo`` directly
(``dataset_info_from_configs`` looks for README/CITATIONS in a package directory and crashes here). Only
``as_data_source`` is used to read: ``as_dataset`` needs TensorFlow, which is deliberately not installed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar

from v4jax.data.corpus import CORPUS_PATH, SPLITS, corpus_sha256, iter_corpus

NAME = "v4jax_text"
log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$V4JAX_DATA_DIR``, else ``$XDG_CACHE_HOME/v4jax/tfds``, else ``~/.cache/v4jax/tfds``."""
    if os.environ.get("V4JAX_DATA_DIR"):
        return Path(os.environ["V4JAX_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "v4jax" / "tfds"


def _tfds():
    import tensorflow_datasets as tfds  # imported lazily: ~1.5 s, and only needed to (re)build or read
    return tfds


_BUILDER_CLS = None


def builder_class():
    """The ``GeneratorBasedBuilder`` subclass (created on first use so importing v4jax.data stays cheap)."""
    global _BUILDER_CLS
    if _BUILDER_CLS is not None:
        return _BUILDER_CLS
    tfds = _tfds()

    class V4jaxText(tfds.core.GeneratorBasedBuilder):
        """CPython standard-library sources, one document per file (see v4jax/data/corpus/NOTICE.md)."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "CPython 3.12.1 Lib/*.py subset, 396 documents, ~5 % held out by name hash."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Deterministic subset of the CPython standard library source, one document per file.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "name": tfds.features.Text()}),
                homepage="https://docs.python.org/3/license.html",
                license="PSF-2.0",
                metadata=tfds.core.MetadataDict(corpus_sha256=corpus_sha256()),
            )

        def _split_generators(self, dl_manager):
            del dl_manager                      # the corpus ships with the package: nothing to download
            return {split: self._generate_examples(split) for split in SPLITS}

        def _generate_examples(self, split):
            for doc in iter_corpus(CORPUS_PATH, split):
                yield doc["name"], {"text": doc["text"], "name": doc["name"]}

    _BUILDER_CLS = V4jaxText
    return V4jaxText


def load_builder(data_dir: str | Path | None = None):
    """A builder instance rooted at ``data_dir`` (default ``default_data_dir()``); does not prepare."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    return builder_class()(data_dir=str(data_dir), file_format="array_record")


def _is_current(builder) -> bool:
    if not builder.is_prepared():
        return False
    return builder.info.metadata.get("corpus_sha256") == corpus_sha256()


def ensure_prepared(data_dir: str | Path | None = None):
    """Prepare the dataset if it is missing or was built from a different corpus file; return the builder."""
    tfds = _tfds()
    builder = load_builder(data_dir)
    if _is_current(builder):
        return builder
    if builder.is_prepared():
        # Built from another corpus file. A builder over an existing version dir takes its DatasetInfo (metadata
        # included) from disk, and FORCE_REDOWNLOAD would write that stale info again: delete the version dir instead.
        log.warning("%s in %s was built from another corpus; rebuilding", NAME, builder.data_dir)
        shutil.rmtree(str(builder.data_dir))
        builder = load_builder(data_dir)
    log.info("preparing %s into %s", NAME, builder.data_dir)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except FileExistsError:
        # several processes (hosts, SLURM tasks) share data_dir and prepared it at once: another one
        # moved its finished copy into place first (tfds builds in an incomplete.* directory)
        log.info("%s in %s was prepared by another process", NAME, builder.data_dir)
    builder = load_builder(data_dir)            # re-read dataset_info.json / metadata from disk
    if not _is_current(builder):
        raise RuntimeError(f"prepared {NAME} in {builder.data_dir} does not match the shipped corpus")
    return builder


def read_split(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """All documents of a split as ``{"name": str, "text": str}``, sorted by name (independent of on-disk order)."""
    src = ensure_prepared(data_dir).as_data_source(split=split)
    docs = [{"name": ex["name"].decode("utf-8"), "text": ex["text"].decode("utf-8")}
            for ex in (src[i] for i in range(len(src)))]
    return sorted(docs, key=lambda d: d["name"])
