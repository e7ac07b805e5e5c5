"""MoE dispatch on this backend: blocked vs lax.ragged_dot vs tokamax.ragged_dot vs dense (issue #10).

    .venv/bin/python experiments/moe_dispatch_bench.py experiments/results/moe/moe_dispatch_cpu.json

tiny shapes (E=16 experts, top-2, d=256, I=256): N=2048 tokens (a 8x256 train batch: forward and
forward+backward) and N=1 (a decode step). The tokamax rows need the optional extra
(pip install "v4jax[tokamax]"). Prints and writes {config: {fwd_ms, fwd_bwd_ms, max_abs_diff_vs_dense}}.
"""
import time, jax, jax.numpy as jnp, numpy as np, sys, json
from v4jax.moe.experts import experts_blocked, experts_dense, experts_ragged, tokamax_available
res={}
for N in (2048, 1):
    K,E,d,I = 2,16,256,256
    rng=np.random.default_rng(0)
    x=jnp.asarray(rng.standard_normal((N,d)),jnp.float32)
    idx=jnp.asarray(np.argsort(rng.random((N,E)),1)[:,:K],jnp.int32)
    wts=jnp.asarray(rng.random((N,K)),jnp.float32)
    w1,w3=[jnp.asarray(rng.standard_normal((E,d,I))*0.05,jnp.float32) for _ in range(2)]
    w2=jnp.asarray(rng.standard_normal((E,I,d))*0.05,jnp.float32)
    fns={"dense":lambda x,w1,w2,w3: experts_dense(x,idx,wts,w1,w2,w3,10.),
         "ragged (lax.ragged_dot)":lambda x,w1,w2,w3: experts_ragged(x,idx,wts,w1,w2,w3,10.),
         "tokamax":lambda x,w1,w2,w3: experts_ragged(x,idx,wts,w1,w2,w3,10.,impl="tokamax"),
         "blocked":lambda x,w1,w2,w3: experts_blocked(x,idx,wts,w1,w2,w3,10.)}
    def t(fn,n=9):
        ts=[]
        for _ in range(n):
            s=time.perf_counter(); jax.block_until_ready(fn(x,w1,w2,w3)); ts.append(time.perf_counter()-s)
        return 1e3*sorted(ts)[n//2]
    if not tokamax_available():
        print("tokamax not installed: skipping its rows")
        del fns["tokamax"]
    ref=None
    for name,f in fns.items():
        fw=jax.jit(f); g=jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)**2), argnums=(0,1,2,3)))
        y=fw(x,w1,w2,w3); jax.block_until_ready(g(x,w1,w2,w3))
        if ref is None: ref=y
        err=float(jnp.max(jnp.abs(y-ref)))
        r={"fwd_ms":t(fw),"fwd_bwd_ms":t(g) if N>1 else None,"max_abs_diff_vs_dense":err}
        res[f"N={N} {name}"]=r; print(N, name, r, flush=True)
json.dump(res, open(sys.argv[1],"w"), indent=1)
