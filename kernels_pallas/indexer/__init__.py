from kernels_pallas.indexer.kernel import indexer_scores, indexer_topk
from kernels_pallas.indexer.reference import indexer_scores_reference, indexer_topk_reference

__all__ = ["indexer_scores", "indexer_topk", "indexer_scores_reference", "indexer_topk_reference"]
