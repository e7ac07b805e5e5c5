from kernels_pallas.sparse_attention.kernel import sparse_attention
from kernels_pallas.sparse_attention.reference import sparse_attention_reference

__all__ = ["sparse_attention", "sparse_attention_reference"]
