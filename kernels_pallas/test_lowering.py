"""AOT lowering of the accelerator wrappers on this CPU machine: Mosaic (TPU) and Triton (GPU,
through an abstract H100 device), forward and backward of every kernel, at H=8, c=128, T=512,
N=128, K=16, bf16. Full Mosaic compilation (layout passes, VMEM) needs libtpu: set
``KERNELS_PALLAS_LIBTPU`` to an unpacked libtpu wheel (see ``kernels_pallas/tpu_aot.py``)."""

import os
import subprocess
import sys
import warnings

import pytest

from kernels_pallas.tpu_aot import kernel_cases, lower

CASES = kernel_cases(backend="tpu")
GPU_CASES = kernel_cases(backend="gpu")


@pytest.mark.parametrize("name,fn,avals", CASES, ids=[c[0] for c in CASES])
def test_lowers_for_tpu(name, fn, avals):
    txt = lower(fn, avals, "tpu")
    assert "tpu_custom_call" in txt


def test_lowers_for_gpu_triton():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pallas Triton backend warns that it is deprecated
        for name, fn, avals in GPU_CASES:
            txt = lower(fn, avals, "cuda")
            assert "xla.gpu.triton" in txt, name


# A full Mosaic compile needs an unpacked libtpu wheel (pip download libtpu==0.0.50.1): `slow`, and
# it skips with that instruction where KERNELS_PALLAS_LIBTPU is not set.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KERNELS_PALLAS_LIBTPU"),
                    reason="set KERNELS_PALLAS_LIBTPU to an unpacked libtpu wheel to compile with libtpu")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_compiles_for_tpu_with_libtpu(topology):
    r = subprocess.run([sys.executable, "-m", "kernels_pallas.tpu_aot", "--libtpu", os.environ["KERNELS_PALLAS_LIBTPU"],
                        "--topology", topology], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
