from kernels_pallas.compressed_attention.kernel import compressed_attention
from kernels_pallas.compressed_attention.reference import compressed_attention_reference

__all__ = ["compressed_attention", "compressed_attention_reference"]
