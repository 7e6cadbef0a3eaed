"""Stand-ins for tests/test_cuda.py that `python tests/gpu_check.py OUTDIR --dry-run` runs on the CPU.

numpy stands in for cupy: each test runs an op's numpy reference in float32 on tiny shapes against the op
in float64 and prints its max error through test_cuda.print_max_error, so the dry run drives gpu_check's
grouping, processes, parsing and summary with the output format the real tests print. The
test_*injected_* ones run only when --inject names them: they abort their process, raise what CuPy raises
after a kernel faulted (a sticky error), hang, or fail on one shape. This file's name does not start with
test_, so the suite does not collect it; tests/test_gpu_check.py runs the dry run.
"""

import os
import time

import numpy as np
import pytest

import kernels
from test_cuda import KINDS, print_max_error

on_gpu = pytest.mark.cuda  # grouped as test_cuda.py's on-GPU tests are, but never skipped: numpy is the device


def check(op, got, ref, scale=1.0):
    atol, rtol = kernels.TOLERANCE[op]
    print_max_error(op, got, ref, atol * scale, rtol * scale)
    np.testing.assert_allclose(got, ref, atol=atol * scale, rtol=rtol * scale, err_msg=op)


def matmul_case(kind, N, K, T=3):
    """(float32 result of matmul_ref, float64 reference) for a random (N, K) weight of `kind`."""
    rng = np.random.default_rng(N * K)
    w = kernels.quantize(rng.standard_normal((N, K)) * 0.5, kind)
    x = rng.standard_normal((T, K)).astype(np.float32)
    got = kernels.matmul_ref(np.empty((T, N), np.float32), x, w)
    return got, x.astype(np.float64) @ kernels.dequantize(w).astype(np.float64).T


def test_every_op_has_a_reference():  # no cuda marker: the no_gpu group, as test_cuda.py's compile checks
    for op in kernels.OPS:
        assert callable(getattr(kernels, f"{op}_ref", None)), f"{op}_ref is missing"


@on_gpu
@pytest.mark.parametrize("T, D", [(1, 33), (3, 50)])
def test_rmsnorm(T, D):
    rng = np.random.default_rng(T * D)
    x, weight = rng.standard_normal((T, D)), rng.standard_normal(D)
    got = kernels.rmsnorm_ref(np.empty((T, D), np.float32), x.astype(np.float32), weight.astype(np.float32), 1e-5)
    check("rmsnorm", got, x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight)


@on_gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N, K", [(5, 32), (7, 64)])
def test_matmul(kind, N, K):
    got, ref = matmul_case(kind, N, K)
    check("matmul", got, ref, scale=10.0)


@on_gpu
@pytest.mark.parametrize("shape", [(1, 40), (3, 17)])
def test_swiglu(shape):
    h1, h3 = np.random.default_rng(shape[1]).standard_normal((2, *shape)) * 3
    got = kernels.swiglu_ref(np.empty(shape, np.float32), h1.astype(np.float32), h3.astype(np.float32))
    check("swiglu", got, h1 / (1 + np.exp(-h1)) * h3, scale=10.0)


# -----------------------------------------------------------------------------
# Injected by --inject: what the harness must survive and report


@on_gpu
@pytest.mark.parametrize("kind", ["q8_0"])
@pytest.mark.parametrize("N, K", [(5, 32), (7, 64)])
def test_matmul_injected_fail(kind, N, K):
    got, ref = matmul_case(kind, N, K)
    if (N, K) == (7, 64):
        got[1, 2] += 1.0  # a wrong element, as a kernel bug on one shape would leave
    check("matmul", got, ref, scale=10.0)


@on_gpu
@pytest.mark.parametrize("case", [1, 2])
def test_injected_crash_abort(case):
    os.abort()


@on_gpu
def test_injected_crash_sticky():
    raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")  # as CuPy words it


@on_gpu
def test_injected_crash_then_pass():
    test_rmsnorm(2, 9)


@on_gpu
def test_injected_hang():
    time.sleep(3600)


@on_gpu
def test_injected_hang_then_pass():
    test_rmsnorm(2, 9)
