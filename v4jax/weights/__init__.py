"""Checkpoint exchange (spec 3.7, 6, 8, 10): streaming safetensors load with FP8/FP4
dequantization from the official or transformers naming, and official-naming save.

>>> variables, cfg = load_variables("ckpt_dir", cfg)   # cfg.n_mtp_layers -> 0 if no mtp.* tensors
>>> save_official(variables, cfg, "out_dir", dtype="bfloat16", shard_bytes=5 << 30)
"""

from v4jax.weights.load import (CheckpointError, LoadedWeights, LoadReport, load_checkpoint,
                                load_variables)
from v4jax.weights.quant import dequant_fp4, dequant_fp8_block, unpack_fp4
from v4jax.weights.save import save_official

__all__ = ["CheckpointError", "LoadedWeights", "LoadReport", "load_variables", "load_checkpoint",
           "save_official", "dequant_fp8_block", "dequant_fp4", "unpack_fp4"]
