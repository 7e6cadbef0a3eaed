"""kernels.py: the hot ops of Llama inference, each three ways: numpy reference, Numba CPU kernel, CUDA kernel.

Backends: "numpy" (always there; the definition of correct), "numba" (CPU, needs `pip install numba`),
"cupy" (one NVIDIA GPU, needs `pip install cupy-cuda12x` or `cupy-cuda13x`). `pick_backend(requested)`
resolves "auto" to numba when installed, else numpy; asking for one that is missing raises with the fix.
`ops_for(backend)` returns the namespace of op functions that llama31.forward calls.

Ops (outputs first, then inputs; activations are float32 and C-contiguous):
    rmsnorm(out, x, weight, eps)                   x (T, D), weight (D,) -> out (T, D)
    matmul(out, x, w)                              x (T, K), W (N, K) -> out (T, N) = x @ W.T
    embed(out, w, tokens)                          tokens (T,) -> out (T, D): rows of W, dequantized
    rope(x, pos, cos, sin)                         in place on x (T, n_heads, Dh) at positions pos..pos+T-1
    attention(out, q, k, v, k_cache, v_cache, pos) stores k, v (T, KV, Dh) at pos, then causal GQA of
                                                   q (T, H, Dh) over cache rows 0..pos+T-1 -> out (T, H*Dh)
    swiglu(out, h1, h3)                            out = silu(h1) * h3, all (T, F)
    add(x, y)                                      in place x += y (the residual stream)

Weights (`QWeight`): a matrix of logical shape (..., N, K) in one of five kinds, told apart by data.dtype:
    f32 float32, f16 float16, bf16 uint16 bits, q8_0 int8 + f16 scales, q4_0 packed uint8 + f16 scales.
Quantized kinds use groups of G = 32 consecutive weights along K with one f16 scale each: the same block
as ggml's Q8_0/Q4_0, so GGUF tensors carry over bit-exact and the bytes read per weight match llama.cpp's
(1.0625 for q8_0, 0.5625 for q4_0).

Tolerance policy (tests use TOLERANCE[op]): |out - ref| <= atol + rtol * |ref| elementwise. Kernels that
reorder float32 sums get rtol ~1e-4; kernels that quantize activations to int8 (llama.cpp's trick for
integer dot products) are compared against the reference on the same int8 activations.

How to add an op: write <op>_ref in numpy with its shape contract; write <op>_numba with the same
signature; write _<OP>_SRC (one `extern "C" __global__ <op>_kernel`) and the <op>_cuda launcher; add the
op name to OPS; add a test in tests/test_kernels.py against <op>_ref with sizes that don't divide blocks.
"""

import types
from typing import NamedTuple

import numpy as np

try:
    import numba
except ImportError:
    numba = None
try:
    import cupy
except ImportError:
    cupy = None

# -----------------------------------------------------------------------------
# Weight kinds
# How a matrix is stored, quantized and dequantized (the numpy definition every kernel must match).

KINDS = {"f32": "float32", "f16": "float16", "bf16": "uint16", "q8_0": "int8", "q4_0": "uint8"}
QUANTIZED = ("q8_0", "q4_0")


class QWeight(NamedTuple):
    """A weight matrix (..., N, K) as stored; the kind follows from data.dtype (see KINDS)."""

    data: np.ndarray  # (..., N, K); q4_0: (..., N, K//2), two 4-bit weights per byte
    scales: np.ndarray | None = None  # (..., N, K//G) float16 for q8_0/q4_0, else None

    @property
    def kind(self) -> str:
        return {v: k for k, v in KINDS.items()}[self.data.dtype.name]

    @property
    def shape(self) -> tuple:  # logical shape (..., N, K)
        *lead, k = self.data.shape
        return (*lead, 2 * k if self.kind == "q4_0" else k)

    def layer(self, l: int) -> "QWeight":
        """The matrix of layer l from a stacked (L, N, K) weight."""
        return QWeight(self.data[l], None if self.scales is None else self.scales[l])


def array_layout(kind: str, shape: tuple, group_size: int) -> list[tuple[str, tuple]]:
    """The (dtype, shape) of each stored array of a `kind` matrix of logical `shape` (data first, then scales)."""
    *lead, k = shape
    if kind not in QUANTIZED:
        return [(KINDS[kind], tuple(shape))]
    if k % group_size:
        raise ValueError(f"{kind}: inner dimension {k} is not a multiple of the group size {group_size}")
    data_k = k // 2 if kind == "q4_0" else k
    return [(KINDS[kind], (*lead, data_k)), ("float16", (*lead, k // group_size))]


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # ggml rounds with roundf (half away from zero), numpy's round is half-to-even: match ggml
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize(w: np.ndarray, kind: str, group_size: int = 32) -> QWeight:
    """Store a float matrix (..., N, K) as `kind`; quantized kinds follow ggml's reference quantizers."""
    w = np.asarray(w, dtype=np.float32)
    if kind == "f32":
        return QWeight(np.ascontiguousarray(w))
    if kind == "f16":
        return QWeight(w.astype(np.float16))
    if kind == "bf16":
        bits = w.view(np.uint32).astype(np.uint64)
        # round to nearest even on the 16 bits that are dropped
        return QWeight(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16))
    array_layout(kind, w.shape, group_size)  # checks K % group_size
    g = w.reshape(*w.shape[:-1], -1, group_size)  # (..., N, K//G, G)
    if kind == "q8_0":
        d = np.abs(g).max(axis=-1, keepdims=True) / 127.0
        inv_d = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)  # all-zero group: d = 0, q = 0
        q = _round_half_away(g * inv_d).astype(np.int8)
        return QWeight(q.reshape(w.shape), d[..., 0].astype(np.float16))
    # q4_0: the signed value of largest magnitude maps to -8, as in ggml's quantize_row_q4_0_ref
    idx = np.abs(g).argmax(axis=-1)[..., None]
    d = np.take_along_axis(g, idx, axis=-1) / -8.0
    inv_d = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(g * inv_d + 8.5)).astype(np.uint8)  # (..., N, K//G, G) in 0..15; trunc as (int8_t)
    packed = q[..., :group_size // 2] | (q[..., group_size // 2:] << 4)  # byte j: element j low, j+G/2 high
    return QWeight(packed.reshape(*w.shape[:-1], -1), d[..., 0].astype(np.float16))


def dequantize(w: QWeight) -> np.ndarray:
    """The float32 matrix (..., N, K) that a QWeight stands for."""
    kind = w.kind
    if kind in ("f32", "f16"):
        return w.data.astype(np.float32, copy=False)  # f32: the memmap itself, no copy
    if kind == "bf16":
        return (w.data.astype(np.uint32) << 16).view(np.float32)
    scales = w.scales.astype(np.float32)[..., None]  # (..., N, K//G, 1)
    if kind == "q8_0":
        g = w.data.reshape(*scales.shape[:-1], -1).astype(np.float32)
    else:
        packed = w.data.reshape(*scales.shape[:-1], -1)  # (..., N, K//G, G//2)
        g = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32) - 8.0
    return (g * scales).reshape(w.shape)


# -----------------------------------------------------------------------------
# rmsnorm
# Root-mean-square normalisation, arxiv.org/abs/1910.07467 eq (4); computed in float32 like Meta's x.float().


def rmsnorm_ref(out, x, weight, eps):
    """x (T, D), weight (D,) -> out (T, D) = x / sqrt(mean(x**2) + eps) * weight"""
    out[:] = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight
    return out


# -----------------------------------------------------------------------------
# matmul
# The weight-streaming product that dominates decode time: every weight byte is read once per token.


def matmul_ref(out, x, w):
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T, W dequantized to float32 first"""
    out[:] = x @ dequantize(w).T
    return out


def embed_ref(out, w, tokens):
    """tokens (T,) -> out (T, D) = W[tokens], dequantized"""
    rows = QWeight(w.data[tokens], None if w.scales is None else w.scales[tokens])
    out[:] = dequantize(rows)
    return out


# -----------------------------------------------------------------------------
# rope
# Rotary position embedding, arxiv.org/abs/2104.09864 eq (34), on adjacent pairs (x[2i], x[2i+1]) of each
# head: Meta's complex-number view in model.py (HF's rotate-half layout is undone by the converter).


def rope_ref(x, pos, cos, sin):
    """In place: x (T, n_heads, Dh) at positions pos..pos+T-1; cos, sin (S, Dh//2)"""
    T = x.shape[0]
    c = cos[pos:pos + T, None, :]  # (T, 1, Dh//2)
    s = sin[pos:pos + T, None, :]
    x0, x1 = x[..., 0::2].copy(), x[..., 1::2].copy()  # (T, n_heads, Dh//2)
    x[..., 0::2] = x0 * c - x1 * s
    x[..., 1::2] = x0 * s + x1 * c
    return x


# -----------------------------------------------------------------------------
# attention
# Causal grouped-query attention over the KV cache, arxiv.org/abs/2305.13245: query head h reads
# key/value head h // (H // KV). Writing k, v into the cache happens here so one call does the whole step.


def attention_ref(out, q, k, v, k_cache, v_cache, pos):
    """q (T, H, Dh), k, v (T, KV, Dh) at positions pos..pos+T-1; caches (S, KV, Dh) -> out (T, H*Dh)"""
    T, H, Dh = q.shape
    KV = k.shape[1]
    k_cache[pos:pos + T] = k
    v_cache[pos:pos + T] = v
    keys, values = k_cache[:pos + T], v_cache[:pos + T]  # (P, KV, Dh), P = pos + T
    qg = q.reshape(T, KV, H // KV, Dh)  # (T, KV, n_rep, Dh)
    scores = np.einsum("tgrd,pgd->grtp", qg, keys) / np.float32(np.sqrt(Dh))  # (KV, n_rep, T, P)
    future = np.arange(pos + T)[None, :] > (pos + np.arange(T))[:, None]  # (T, P) causal mask
    scores[..., future] = -np.inf
    # subtract the row max before exp so that large scores cannot overflow
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out[:] = np.einsum("grtp,pgd->tgrd", weights, values).reshape(T, H * Dh)
    return out


# -----------------------------------------------------------------------------
# swiglu
# The gated FFN non-linearity, arxiv.org/abs/2002.05202 eq (5): silu(x W1) * (x W3).


def swiglu_ref(out, h1, h3):
    """h1, h3 (T, F) -> out (T, F) = silu(h1) * h3"""
    with np.errstate(over="ignore"):  # exp(-h1) may overflow to inf for very negative h1: silu -> -0, as intended
        out[:] = h1 / (1.0 + np.exp(-h1)) * h3
    return out


def add_ref(x, y):
    """In place: x (T, D) += y (T, D), the residual connection"""
    x += y
    return x


# -----------------------------------------------------------------------------
# Backends
# One table from op name to each backend's function; llama31 calls ops_for(backend).op(...).

OPS = ("rmsnorm", "matmul", "embed", "rope", "attention", "swiglu", "add")
BACKENDS = {"numpy": "_ref", "numba": "_numba", "cupy": "_cuda"}

TOLERANCE = {  # op: (atol, rtol) against the float32 reference
    "rmsnorm": (1e-5, 1e-4),
    "matmul": (1e-4, 1e-4),
    "embed": (0.0, 0.0),
    "rope": (1e-5, 1e-4),
    "attention": (1e-5, 1e-4),
    "swiglu": (1e-6, 1e-5),
    "add": (0.0, 0.0),
}


def available_backends() -> list[str]:
    found = ["numpy"]
    if numba is not None:
        found.append("numba")
    if cupy is not None and _cuda_device_count() > 0:
        found.append("cupy")
    return found


def _cuda_device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def pick_backend(requested: str = "auto") -> str:
    """Resolve "auto" (numba if installed, else numpy) or check that the requested backend can run here."""
    found = available_backends()
    if requested == "auto":
        return "numba" if "numba" in found else "numpy"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    if requested not in found:
        why = {"numba": "numba is not installed: pip install numba",
               "cupy": "it needs cupy and an NVIDIA GPU: pip install cupy-cuda12x (or cupy-cuda13x)"}[requested]
        raise RuntimeError(f"backend {requested!r} is unavailable ({why}); available here: {found}")
    return requested


def backend_notice(chosen: str) -> str | None:
    """The one line the CLI prints when it falls back to the slow numpy path, else None."""
    if chosen == "numpy" and numba is None:
        return "numba is not installed: running the numpy reference path (slow); pip install numba for speed"
    return None


def ops_for(backend: str) -> types.SimpleNamespace:
    """The op functions of one backend, by op name, plus `xp`: the array module its buffers live in."""
    suffix = BACKENDS[backend]
    xp = cupy if backend == "cupy" else np
    return types.SimpleNamespace(xp=xp, **{op: globals()[op + suffix] for op in OPS})
