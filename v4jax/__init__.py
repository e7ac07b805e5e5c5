"""v4jax: DeepSeek-V4 (Flash / Pro) in JAX and Flax.

>>> import v4jax
>>> model = v4jax.load_hf("path/to/checkpoint")      # official or transformers naming, FP8/FP4 ok
>>> logits = model(ids)                              # ids [B, T] int -> fp32 [B, T, vocab]
>>> model = v4jax.V4Model.init(v4jax.preset("tiny"))  # fresh weights
"""

from v4jax.api import V4Model, load_hf
from v4jax.config import ConfigError, V4Config, preset
from v4jax.inference.prefix_cache import PrefixCache
from v4jax.inputs import InputError, check_token_ids
from v4jax.params import ParamCount, count_params

__all__ = ["V4Model", "load_hf", "V4Config", "preset", "ConfigError", "InputError", "check_token_ids",
           "count_params", "ParamCount", "PrefixCache"]
__version__ = "0.1.0"
