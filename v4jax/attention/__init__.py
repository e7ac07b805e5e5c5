"""Hybrid attention (spec 3): sliding window on every layer, plus CSA (overlapping 4:1 compressor +
lightning indexer + top-k) or HCA (m':1 compressor, dense)."""
