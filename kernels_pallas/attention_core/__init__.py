"""Shared implementation of the two attention kernels (CSA top-k and HCA/dense/window-only).

One online-softmax pass over ``[window keys | compressed keys | sink]`` with the single shared
K=V head, fp32 accumulation. Three key-set modes (static):

* ``"window"``: sliding window only (W layers, or no compressed entries yet).
* ``"dense"``:  window + every visible compressed entry (``e < (t+1)//ratio``, same segment).
* ``"topk"``:   window + the compressed entries listed per query (``-1`` = empty slot).

Two wrappers around the same block math (``_common``):

* TPU (Mosaic): grid ``(B, q_blocks, steps)``; window / dense-compressed key blocks arrive through
  BlockSpec pipelining (index maps clamp to the blocks a query block needs, so nothing else is
  fetched); m/l/acc live in VMEM scratch. Top-k: the index block of the current query block is
  streamed into SMEM (addresses) and VMEM (validity mask), and ONLY the selected compressed rows
  are fetched, with double-buffered per-row DMAs from HBM. The backward scatter-adds the top-k
  gradient rows into a VMEM-resident ``dcomp`` (row read-modify-write, sequential over q blocks).
* Portable (Triton on GPU; the generic interpreter on CPU): grid ``(B, q_blocks)``, one program per
  block, loops inside over key blocks (``pl.ds`` slices of the whole per-batch arrays); top-k rows
  are a vector gather ``comp_ref[idx]``; the backward scatter uses ``atomic_add`` into a
  zero-initialised aliased buffer.

Backward: ``dq`` kernel (same key walk as the forward; for top-k it also emits the per-selection
key gradients and scatter-adds them into ``dcomp``), window ``dkv`` kernel (per key block, over
the query blocks whose window covers it), dense ``dcomp`` kernel (per entry block, over the later
query blocks). ``dsink`` and ``delta`` are cheap jnp reductions.

Modules, by job:

* ``plan.py``      ``AttnCfg`` (static config: mode, padded geometry, block sizes, backend), the
  block-range arithmetic, the window / dense key masks, default blocks, ``plan_attention``.
* ``portable.py``  the Triton / interpreter kernels and their ``pallas_call`` wrappers.
* ``tpu.py``       the Mosaic kernels and their ``pallas_call`` wrappers.
* ``vjp.py``       the ``custom_vjp`` core and the public entry ``attention(...)`` (input layouts).
"""

from kernels_pallas.attention_core.plan import AttnCfg, plan_attention
from kernels_pallas.attention_core.vjp import attention

__all__ = ["attention", "AttnCfg", "plan_attention"]
