"""kernels.py: the hot ops of Llama inference, each three ways: numpy reference, Numba CPU kernel, CUDA kernel.

Backends: "numpy" (always there; the definition of correct), "numba" (CPU, needs `pip install numba`),
"cupy" (one NVIDIA GPU, needs `pip install cupy-cuda12x` or `cupy-cuda13x`). `pick_backend(requested)`
resolves "auto" to numba when installed, else numpy; asking for one that is missing raises with the fix.
`ops_for(backend)` returns the namespace of op functions that llama31.forward calls.
The CUDA backend ("cupy") keeps every weight on the GPU in its stored kind. Decode (T <= MATVEC_MAX_T)
streams the weights through float32 matrix-vector kernels; prefill (larger T) multiplies on tensor cores
through cuBLAS with x and W rounded to 16 bits (bf16 weights as stored, other kinds as f16), so its tests
compare against the reference on the same rounded operands. rope, attention and embed also take pos (and
the tokens) as int32 arrays on the GPU, which lets CudaGraphStep capture one decode step and replay it at
every position; sample_cuda chooses the next token on the GPU, so only its id comes back.

Ops (outputs first, then inputs; activations are float32 and C-contiguous):
    rmsnorm(out, x, weight, eps)                   x (T, D), weight (D,) -> out (T, D)
    matmul(out, x, w)                              x (T, K), W (N, K) -> out (T, N) = x @ W.T
    embed(out, w, tokens)                          tokens (T,) -> out (T, D): rows of W, dequantized
    rope(x, pos, cos, sin)                         in place on x (T, n_heads, Dh) at positions pos..pos+T-1
    attention(out, q, k, v, k_cache, v_cache, pos) stores k, v (T, KV, Dh) at pos, then causal GQA of
                                                   q (T, H, Dh) over cache rows 0..pos+T-1 -> out (T, H*Dh);
                                                   caches float32 (numba: also float16)
    swiglu(out, h1, h3)                            out = silu(h1) * h3, all (T, F)
    add(x, y)                                      in place x += y (the residual stream)

Weights (`QWeight`): a matrix of logical shape (..., N, K) in one of five kinds, told apart by data.dtype:
    f32 float32, f16 float16, bf16 uint16 bits, q8_0 int8 + f16 scales, q4_0 packed uint8 + f16 scales.
Quantized kinds use groups of G = 32 consecutive weights along K with one f16 scale each: the same block
as ggml's Q8_0/Q4_0, so GGUF tensors carry over bit-exact and the bytes read per weight match llama.cpp's
(1.0625 for q8_0, 0.5625 for q4_0).

Tolerance policy (tests use TOLERANCE[op]): |out - ref| <= atol + rtol * |ref| elementwise. Kernels that
reorder float32 sums get rtol ~1e-4; kernels that quantize activations to int8 (llama.cpp's trick for
integer dot products) are compared against the reference on the same int8 activations
(quantize_activations_ref). On numba that is every q8_0/q4_0 matmul, decode and prefill alike. Numba's
matmul is batch-invariant for every kind: row t of out is bit-identical whatever the other rows of x are
and wherever row t sits (a request's output must not depend on what else the serving engine batches).

How to add an op: write <op>_ref in numpy with its shape contract; write <op>_numba with the same
signature; write _<OP>_SRC (one `extern "C" __global__ <op>_kernel`) and the <op>_cuda launcher; add the
op name to OPS; add a test in tests/test_kernels.py against <op>_ref with sizes that don't divide blocks,
and a call to _check_calls for `python kernels.py`, which checks every op of every backend here at once.
"""

import concurrent.futures
import contextlib
import mmap
import sys
import time
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

# Numba kernels compile on first use and are cached in __pycache__ beside this file (cache=True). Their
# fast-math flags leave out "no NaNs/infs": softmax and silu meet exp overflow, and NaN must propagate.
NUMBA_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _njit(**options):
    """numba.njit(**options) with numpy's error model (x / 0 is inf or NaN, as in the references; Python's
    model checks every division, which stops LLVM vectorising loops that divide), releasing the GIL (a
    server's HTTP threads send the last step's tokens while the next step's kernels run). Without numba, a
    stand-in whose functions raise with the install hint."""
    if numba is not None:
        return numba.njit(error_model="numpy", nogil=True, **options)

    def missing(fn):
        def raise_missing(*args, **kwargs):
            raise RuntimeError(f"kernels.{fn.__name__} needs numba, which is not installed: "
                               "pip install numba")
        return raise_missing
    return missing

# -----------------------------------------------------------------------------
# CUDA preamble
# What every CUDA source below shares (prepended before compiling), and the lazily built kernel cache.

_CUDA_PREAMBLE = r"""
// No #include at all, so NVRTC (CuPy, at run time) and nvcc (the CI compile check) see the same code:
// f16 and bf16 conversions are single PTX instructions instead of cuda_fp16.h/cuda_bf16.h helpers, and
// vector values are brace-initialised (float4{...}) rather than built with make_float4.
#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

// weight kinds, numbered as kernels.CUDA_KIND; GROUP weights along K share one f16 scale (ggml's blocks)
#define KIND_F32 0
#define KIND_F16 1
#define KIND_BF16 2
#define KIND_Q8_0 3
#define KIND_Q4_0 4
#define GROUP 32

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {  // round to nearest even
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {  // round to nearest even
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// the value of element (n, k) of a weight matrix with K columns: the CUDA twin of kernels.dequantize
__device__ __forceinline__ float weight_at(int kind, const void* w, const unsigned short* scales,
                                          size_t n, int k, int K) {
    switch (kind) {
    case KIND_F32: return ((const float*)w)[n * K + k];
    case KIND_F16: return f16_to_f32(((const unsigned short*)w)[n * K + k]);
    case KIND_BF16: return bf16_to_f32(((const unsigned short*)w)[n * K + k]);
    case KIND_Q8_0:
        return f16_to_f32(scales[n * (K / GROUP) + k / GROUP]) * (float)((const signed char*)w)[n * K + k];
    default: {  // KIND_Q4_0: byte j of a group's 16 holds element j (low nibble) and j + 16 (high nibble)
        const unsigned char b = ((const unsigned char*)w)[n * (K / 2) + (k / GROUP) * (GROUP / 2) + k % (GROUP / 2)];
        const int q = (k % GROUP) < GROUP / 2 ? (b & 0xF) : (b >> 4);
        return f16_to_f32(scales[n * (K / GROUP) + k / GROUP]) * (float)(q - 8);
    }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
// sum over the block (blockDim.x a multiple of 32), returned to every thread; shared holds 32 floats
__device__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? shared[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();  // the caller may reuse shared
    return v;
}
"""

CUDA_KIND = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}  # the KIND_* numbers of _CUDA_PREAMBLE


class _CudaKernels:
    """Compiled CUDA kernels (each source compiled on first use) and device scratch buffers.

    One instance, _CUDA, lives at module level: the launchers keep the signatures of the numpy references,
    so there is no argument to carry a cache in; it is filled lazily and never changes results.
    """

    def __init__(self):
        self.modules = {}  # source string -> cupy.RawModule
        self.functions = {}  # kernel name -> cupy.RawKernel-like function
        self.buffers = {}  # (name, capacity, dtype) -> cupy array
        self.sm_count = None

    def kernel(self, src: str, name: str):
        """The function `name` of `src`, compiling the source with the preamble on first use."""
        fn = self.functions.get(name)
        if fn is None:
            if src not in self.modules:
                self.modules[src] = cupy.RawModule(code=_CUDA_PREAMBLE + src, options=("-std=c++17",))
            fn = self.functions[name] = self.modules[src].get_function(name)
        return fn

    def scratch(self, name: str, size: int, dtype=np.float32):
        """A device buffer of at least `size` elements that is never freed or moved.

        Captured CUDA graphs keep the address of every buffer they touch, so a temporary from the memory
        pool could be handed to someone else while a graph still writes it. Capacities are powers of two,
        which bounds the number of buffers one name can own.
        """
        capacity = 1 << max(0, int(size) - 1).bit_length()
        key = (name, capacity, np.dtype(dtype).str)
        if key not in self.buffers:
            self.buffers[key] = cupy.empty(capacity, dtype=dtype)
        return self.buffers[key][:size]

    def multiprocessors(self) -> int:
        if self.sm_count is None:
            self.sm_count = cupy.cuda.Device().attributes["MultiProcessorCount"]
        return self.sm_count


_CUDA = _CudaKernels()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _require_cupy(op: str):
    if cupy is None:
        raise RuntimeError(f"{op}: the CUDA backend needs cupy: pip install cupy-cuda12x (or cupy-cuda13x)")


def _check_f32(op: str, **arrays):
    """Every array must be a float32, C-contiguous cupy array."""
    _require_cupy(op)
    for name, a in arrays.items():
        if not isinstance(a, cupy.ndarray):
            raise ValueError(f"{op}: {name} must be a cupy array on the GPU, got {type(a).__name__}")
        if a.dtype != np.float32:
            raise ValueError(f"{op}: {name} must be float32, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: {name} must be C-contiguous (shape {a.shape}, strides {a.strides})")


def _check_weight(op: str, w) -> tuple[str, int, int]:
    """(kind, N, K) of a 2-D QWeight whose arrays are on the GPU with the layout the kernels read."""
    _require_cupy(op)
    data, scales = w.data, w.scales
    if not isinstance(data, cupy.ndarray) or data.dtype.name not in KINDS.values():
        raise ValueError(f"{op}: weight data must be a cupy array of {sorted(KINDS.values())}, "
                         f"got {type(data).__name__} {getattr(data, 'dtype', '')}")
    kind, shape = w.kind, w.shape
    if data.ndim != 2 or not data.flags.c_contiguous:
        raise ValueError(f"{op}: weight must be one C-contiguous (N, K) matrix, got data shape {data.shape}")
    N, K = shape
    if kind in QUANTIZED:
        if K % 32:
            raise ValueError(f"{op}: {kind} weight needs K % 32 == 0, got K = {K}")
        if (not isinstance(scales, cupy.ndarray) or scales.dtype != np.float16 or scales.shape != (N, K // 32)
                or not scales.flags.c_contiguous):
            raise ValueError(f"{op}: {kind} weight needs C-contiguous float16 scales of shape {(N, K // 32)} on "
                             f"the GPU (group size 32), got {getattr(scales, 'shape', scales)}")
    return kind, N, K


def _device_ids(op: str, name: str, ids, T: int, limit: int):
    """Per-row integers (token ids, positions, slots) as the int32 (T,) cupy array the kernels read: host ids
    are checked to lie in 0..limit-1 and copied over; an int32 (T,) cupy array passes as it is, unchecked
    (reading it would synchronise), which is what lets a captured CUDA graph take new ids at every replay."""
    if isinstance(ids, cupy.ndarray):
        if ids.dtype != np.int32 or ids.shape != (T,):
            raise ValueError(f"{op}: device {name} must be an int32 cupy array of shape ({T},), "
                             f"got {ids.dtype} {ids.shape}")
        return ids
    host = np.asarray(ids)
    if host.shape != (T,) or host.dtype.kind not in "iu" or (T and (host.min() < 0 or host.max() >= limit)):
        raise ValueError(f"{op}: {name} must be {T} integers in 0..{limit - 1}, got {host!r:.80}")
    return cupy.asarray(host.astype(np.int32))


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
# Numba vector helpers
# Explicit SIMD values for the numba kernels, emitted as portable LLVM vector IR (LLVM picks the
# instructions: AVX-512 zmm here, NEON on ARM). Why not plain loops: numba widens integer arithmetic to
# int64 and LLVM's auto-vectoriser reduces every 32-weight group horizontally. The one exception to portable
# IR is the int8 dot product, which LLVM does not find on its own: on x86 it names the instructions
# (vpdpbusd, or pmaddubsw + pmaddwd), 1.4-2x faster than widening to int16 and pmaddwd (q8_0 and q4_0
# matvecs, 2 threads); _dot_isa chooses them once per CPU. Conventions: arrays are C-contiguous and
# indexed flat (a.flat[i]); f16 bits travel as int16 and bf16 bits as uint16 (numba has no float16), so the
# element type says how to decode a value.

def _dot_isa() -> str:
    """The instructions of the int8 dot product (_ir_dot4): "vnni" (AVX-512 VNNI), "avx2", or "portable"
    (plain LLVM IR, for other CPUs, or when numba is told to compile for a CPU other than this one)."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "portable"
    try:
        features = llvm_binding.get_host_cpu_features()
    except RuntimeError:  # llvmlite cannot read this CPU's features
        return "portable"
    if features.get("avx512vnni") and features.get("avx512vl"):
        return "vnni"
    return "avx2" if features.get("avx2") else "portable"


if numba is not None:
    import llvmlite.binding as llvm_binding
    from llvmlite import ir
    from numba.core import cgutils
    from numba.core import types as nbt
    from numba.core.extending import intrinsic, models, register_model

    DOT_ISA = _dot_isa()

    class _Vec(nbt.Type):
        """A vector of `lanes` float32 that stays in registers across loop turns."""

        def __init__(self, lanes: int):
            self.lanes = lanes
            super().__init__(name=f"vec_f32x{lanes}")

    @register_model(_Vec)
    class _VecModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))

    _F32X16 = _Vec(16)  # one vector of floats
    _TILE = _Vec(64)  # 4 tokens x 16 lanes of accumulators (attention's tile)
    _I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    _DECODABLE = (nbt.float32, nbt.uint16, nbt.int16, nbt.int8, nbt.uint8)

    def _ir_consts(ty, values):
        return ir.Constant(ir.VectorType(ty, len(values)), list(values))

    def _ir_splat(builder, scalar, lanes):
        v = builder.insert_element(ir.Constant(ir.VectorType(scalar.type, lanes), ir.Undefined), scalar,
                                   ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, lanes), None))

    def _ir_load(context, builder, arrty, arr, index, ty, align):
        """Load a value of IR type ty from &arr.flat[index]."""
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.load(builder.bitcast(builder.gep(data, [index]), ty.as_pointer()), align=align)

    def _ir_const(ty, value):
        """The constant value of IR type ty (splat across the lanes of a vector type)."""
        return ir.Constant(ty, [value] * ty.count if isinstance(ty, ir.VectorType) else value)

    def _ir_decode(builder, raw, dtype):
        """Stored values (IR scalar or vector) as float32: f32 as is, f16 or bf16 from bits, q8_0 integers."""
        like = (lambda elt: ir.VectorType(elt, raw.type.count)) if isinstance(raw.type, ir.VectorType) else (
            lambda elt: elt)
        if dtype == nbt.float32:
            return raw
        if dtype == nbt.int16:  # f16 bits
            return builder.fpext(builder.bitcast(raw, like(ir.HalfType())), like(_F32))
        if dtype == nbt.uint16:  # bf16 bits: the high half of a float32
            wide = builder.zext(raw, like(_I32))
            return builder.bitcast(builder.shl(wide, _ir_const(like(_I32), 16)), like(_F32))
        return builder.sitofp(raw, like(_F32))  # int8: q8_0 integers, and q4_0 nibble - 8 once unpacked

    def _ir_q4(builder, packed, shift):
        """q4_0 bytes (IR i8 or <n x i8>) -> nibble - 8 as i8: the low nibble for shift 0, the high for 4."""
        nibble = builder.and_(builder.lshr(packed, shift), _ir_const(packed.type, 15))
        return builder.sub(nibble, _ir_const(packed.type, 8))

    def _ir_call(builder, name, ret, *args):
        """A call of the LLVM intrinsic `name` (a target's instruction, or a generic llvm.* operation)."""
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return builder.call(fn, args)

    def _ir_hsum(builder, v):
        """Sum of the lanes of a float vector, folding halves: 16 -> 8 -> 4 -> 2 -> 1."""
        n = v.type.count
        while n > 1:
            n //= 2
            v = builder.fadd(builder.shuffle_vector(v, v, _ir_consts(_I32, range(n))),
                             builder.shuffle_vector(v, v, _ir_consts(_I32, range(n, 2 * n))))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    def _zeros(vec: _Vec):
        """An intrinsic () -> a `vec` of zeros (one per vector type: an intrinsic cannot take a type)."""
        @intrinsic
        def zeros(typingctx):
            def codegen(context, builder, sig, args):
                return ir.Constant(ir.VectorType(_F32, vec.lanes), [0.0] * vec.lanes)
            return vec(), codegen
        return zeros

    _vzero = _zeros(_F32X16)  # np.zeros(16, np.float32)
    _tile_zero = _zeros(_TILE)  # accumulators of a 4-token tile: np.zeros((4, 16), np.float32)

    class _Tile(_Vec):
        """matmul's accumulators: `tokens` x `rows` float32 (rows a multiple of 16), token c's at lanes
        c*rows .. (c+1)*rows - 1; lanes are consecutive weight rows, so a token's are consecutive outputs."""

        def __init__(self, tokens: int, rows: int):
            self.lanes, self.tokens, self.rows = tokens * rows, tokens, rows
            nbt.Type.__init__(self, name=f"tile_f32_{tokens}x{rows}")

    register_model(_Tile)(_VecModel)

    @intrinsic(prefer_literal=True)
    def _tile_zeros(typingctx, tokens, rows):
        """np.zeros((tokens, rows), np.float32) as a _Tile, for constant tokens and rows"""
        if not isinstance(tokens, nbt.IntegerLiteral) or not isinstance(rows, nbt.IntegerLiteral):
            return None
        tile = _Tile(tokens.literal_value, rows.literal_value)

        def codegen(context, builder, sig, args):
            return ir.Constant(ir.VectorType(_F32, tile.lanes), [0.0] * tile.lanes)
        return tile(tokens, rows), codegen

    @intrinsic
    def _vsum(typingctx, v):
        """v.sum() of a float vector, folding halves: 16 -> 8 -> 4 -> 2 -> 1"""
        if not isinstance(v, _Vec):
            return None

        def codegen(context, builder, sig, args):
            return _ir_hsum(builder, args[0])
        return nbt.float32(v), codegen

    @intrinsic
    def _vfma(typingctx, acc, a, b):
        """acc + a * b"""
        def codegen(context, builder, sig, args):
            acc, a, b = args
            return builder.fadd(acc, builder.fmul(a, b, flags=("fast",)), flags=("fast",))
        return _F32X16(_F32X16, _F32X16, _F32X16), codegen

    @intrinsic
    def _vadd(typingctx, a, b):
        """a + b"""
        def codegen(context, builder, sig, args):
            return builder.fadd(args[0], args[1], flags=("fast",))
        return _F32X16(_F32X16, _F32X16), codegen

    @intrinsic
    def _vscale(typingctx, v, s):
        """v * s for a float32 scalar s"""
        def codegen(context, builder, sig, args):
            v, s = args
            return builder.fmul(v, _ir_splat(builder, s, 16), flags=("fast",))
        return _F32X16(_F32X16, nbt.float32), codegen

    @intrinsic
    def _vsplat(typingctx, s):
        """np.full(16, s) for a float32 scalar s"""
        def codegen(context, builder, sig, args):
            return _ir_splat(builder, args[0], 16)
        return _F32X16(nbt.float32), codegen

    @intrinsic
    def _vstore(typingctx, a, i, v):
        """a.flat[i:i+16] = v for a float32 array a, or rounded to f16 (nearest even) for f16 bits as int16"""
        if a.dtype not in (nbt.float32, nbt.int16) or a.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            a, i, v = args
            if a_dtype == nbt.int16:
                v = builder.bitcast(builder.fptrunc(v, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(_I16, 16))
            data = context.make_array(sig.args[0])(context, builder, a).data
            builder.store(v, builder.bitcast(builder.gep(data, [i]), v.type.as_pointer()), align=a_dtype.bitwidth // 8)
            return context.get_dummy_value()
        a_dtype = a.dtype
        return nbt.none(a, nbt.intp, _F32X16), codegen

    @intrinsic
    def _vload(typingctx, a, i):
        """a.flat[i:i+16] decoded to float32 (f32, f16 bits, bf16 bits, q8_0 integers), or for q4_0 packed
        bytes (uint8) the integers nibble - 8 of elements i..i+15 of the unpacked row (i % 16 == 0)."""
        if a.dtype not in _DECODABLE or a.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            a, i = args
            if a_dtype != nbt.uint8:
                raw_ty = ir.VectorType(context.get_data_type(a_dtype), 16)
                raw = _ir_load(context, builder, sig.args[0], a, i, raw_ty, a_dtype.bitwidth // 8)
                return _ir_decode(builder, raw, a_dtype)
            # q4_0: a group of 32 elements is 16 bytes, low nibbles first (elements 0..15), then high ones
            byte = builder.shl(builder.ashr(i, ir.Constant(i.type, 5)), ir.Constant(i.type, 4))
            packed = _ir_load(context, builder, sig.args[0], a, byte, ir.VectorType(_I8, 16), 1)
            in_high = builder.and_(i, ir.Constant(i.type, 16))  # elements 16..31 of a group: high nibbles
            shift = builder.trunc(builder.lshr(in_high, ir.Constant(i.type, 2)), _I8)  # 0 or 4
            nibbles = _ir_q4(builder, packed, _ir_splat(builder, shift, 16))
            return builder.sitofp(nibbles, ir.VectorType(_F32, 16))
        a_dtype = a.dtype
        return _F32X16(a, nbt.intp), codegen

    @intrinsic
    def _scalar(typingctx, a, i):
        """a.flat[i] decoded to float32 like _vload (for q4_0, element i of the unpacked row)"""
        if a.dtype not in _DECODABLE or a.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            a, i = args
            if a_dtype != nbt.uint8:
                raw = _ir_load(context, builder, sig.args[0], a, i, context.get_data_type(a_dtype),
                               a_dtype.bitwidth // 8)
                return _ir_decode(builder, raw, a_dtype)
            c = lambda v: ir.Constant(i.type, v)
            byte = builder.add(builder.shl(builder.ashr(i, c(5)), c(4)), builder.and_(i, c(15)))
            shift = builder.trunc(builder.lshr(builder.and_(i, c(16)), c(2)), _I8)
            packed = _ir_load(context, builder, sig.args[0], a, byte, _I8, 1)
            return builder.sitofp(_ir_q4(builder, packed, shift), _F32)
        a_dtype = a.dtype
        return nbt.float32(a, nbt.intp), codegen

    @intrinsic
    def _tile_fma(typingctx, acc, w, x, i, stride):
        """acc[j] += w * x.flat[i + j*stride : i + j*stride + 16] for the tile's tokens j = 0..3"""
        if x.dtype != nbt.float32 or x.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            acc, w, x, i, stride = args
            rows = [_ir_load(context, builder, sig.args[2], x, builder.add(i, builder.mul(stride, ir.Constant(
                i.type, j))), ir.VectorType(_F32, 16), 4) for j in range(4)]
            x01 = builder.shuffle_vector(rows[0], rows[1], _ir_consts(_I32, range(32)))
            x23 = builder.shuffle_vector(rows[2], rows[3], _ir_consts(_I32, range(32)))
            xt = builder.shuffle_vector(x01, x23, _ir_consts(_I32, range(64)))
            wt = builder.shuffle_vector(w, w, _ir_consts(_I32, [j % 16 for j in range(64)]))
            return builder.fadd(acc, builder.fmul(wt, xt, flags=("fast",)), flags=("fast",))
        return _TILE(_TILE, _F32X16, x, nbt.intp, nbt.intp), codegen

    @intrinsic
    def _tile_sums(typingctx, acc):
        """acc.sum(axis=1): the 4 tokens' results, summed together (fold lane halves of all 4 at once)"""
        def codegen(context, builder, sig, args):
            (v,) = args
            width = 16  # lanes per token still to be folded
            while width > 1:  # each step: the first half of every token's lanes plus the second half
                half = width // 2
                lo = [k * width + j for k in range(4) for j in range(half)]
                v = builder.fadd(builder.shuffle_vector(v, v, _ir_consts(_I32, lo)),
                                 builder.shuffle_vector(v, v, _ir_consts(_I32, [j + half for j in lo])))
                width = half
            sums = ir.Constant(ir.ArrayType(_F32, 4), ir.Undefined)
            for k in range(4):
                sums = builder.insert_value(sums, builder.extract_element(v, ir.Constant(_I32, k)), k)
            return sums
        return nbt.UniTuple(nbt.float32, 4)(_TILE), codegen

    # The int8 matmul (_matmul_int8_numba) works on slabs of Q_ROWS = 16 weight rows with one row per 32-bit
    # lane: a vector holds 4 consecutive int8 weights of each of the 16 rows, so one vpdpbusd against 4 bytes
    # of a token broadcast to every lane adds 4 products to each row's sum, and a token's 16 results land
    # in one vector, which is 16 consecutive outputs (no horizontal sums). Stored rows are turned into that
    # layout by an in-register transpose of each 32-weight group.

    def _ir_shape(context, builder, arrty, arr):
        """The shape of array arr (numba type arrty) as a tuple of IR integers."""
        return cgutils.unpack_tuple(builder, context.make_array(arrty)(context, builder, arr).shape, arrty.ndim)

    def _ir_row(builder, n0, r, N):
        """Row n0 + r, or the last row N - 1 past it (a slab's rows beyond the matrix repeat the last one)."""
        n = builder.add(n0, ir.Constant(n0.type, r))
        return builder.select(builder.icmp_signed("<", n, N), n, builder.sub(N, ir.Constant(N.type, 1)))

    def _ir_cat(builder, parts):
        """The concatenation of equal-length vectors."""
        while len(parts) > 1:
            n = parts[0].type.count
            parts = [builder.shuffle_vector(a, b, _ir_consts(_I32, range(2 * n)))
                     for a, b in zip(parts[::2], parts[1::2])]
        return parts[0]

    def _ir_part(builder, v, c, lanes=16):
        """Lanes c*lanes .. (c+1)*lanes - 1 of vector v."""
        if v.type.count == lanes:
            return v
        return builder.shuffle_vector(v, v, _ir_consts(_I32, range(c * lanes, (c + 1) * lanes)))

    def _ir_transpose(builder, v):
        """n vectors (n a power of 2) seen as n x n blocks in each run of n lanes -> the transposed blocks: lane
        i of run s of output p = lane p of run s of input i. Off-diagonal sub-blocks swap at sizes n/2, ..,
        1: each step is one 2-input shuffle per vector (vpunpck*, vpermt2* on x86)."""
        n, lanes, v = len(v), v[0].type.count, list(v)
        b = n // 2
        while b:
            low = [s + 2 * b * k + i + src for s in range(0, lanes, n) for k in range(n // (2 * b))
                   for src in (0, lanes) for i in range(b)]
            for i in (i for i in range(n) if not i & b):
                v[i], v[i + b] = (builder.shuffle_vector(v[i], v[i + b], _ir_consts(_I32, low)),
                                  builder.shuffle_vector(v[i], v[i + b], _ir_consts(_I32, [m + b for m in low])))
            b //= 2
        return v

    def _weight_bias(dtype) -> int:
        """What the weights enter the int8 dot offset by, taken off through the activation sums: q4_0 nibbles
        are weight + 8; q8_0 bytes flipped to weight + 128 for vpdpbusd, whose weight operand is unsigned."""
        if dtype == nbt.uint8:
            return 8
        return 128 if DOT_ISA == "vnni" else 0

    @intrinsic
    def _quantize_block(typingctx, x, i, xq, bias):
        """xq.flat[i:i+32] = round(x / d) (half away from zero) for the 32 floats x.flat[i:i+32], d = amax / 127;
        returns (d, -bias * the sum of the 32 integers). IEEE steps without fast-math flags: exactly
        quantize_activations_ref's."""
        def codegen(context, builder, sig, args):
            x, i, xq, bias = args
            f32x32, i32x32 = ir.VectorType(_F32, 32), ir.VectorType(_I32, 32)
            v = _ir_load(context, builder, sig.args[0], x, i, f32x32, 4)
            # |x| as integers orders like |x| as floats: an integer max is one instruction per step (no NaN rules)
            magnitudes = builder.and_(builder.bitcast(v, i32x32), _ir_const(i32x32, 0x7FFFFFFF))
            amax = builder.bitcast(_ir_call(builder, "llvm.vector.reduce.umax.v32i32", _I32, magnitudes), _F32)
            d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
            zero = builder.fcmp_ordered("==", d, ir.Constant(_F32, 0.0))
            inv_d = builder.select(zero, ir.Constant(_F32, 0.0), builder.fdiv(ir.Constant(_F32, 1.0), d))
            scaled = builder.fmul(v, _ir_splat(builder, inv_d, 32))
            magnitude = builder.fadd(_ir_call(builder, "llvm.fabs.v32f32", f32x32, scaled), _ir_const(f32x32, 0.5))
            rounded = _ir_call(builder, "llvm.copysign.v32f32", f32x32,
                               _ir_call(builder, "llvm.floor.v32f32", f32x32, magnitude), scaled)
            q = builder.fptosi(rounded, i32x32)
            base = context.make_array(sig.args[2])(context, builder, xq).data
            q8 = builder.trunc(q, ir.VectorType(_I8, 32))
            builder.store(q8, builder.bitcast(builder.gep(base, [i]), q8.type.as_pointer()), align=1)
            total = _ir_call(builder, "llvm.vector.reduce.add.v32i32", _I32, q)
            c = builder.mul(total, builder.neg(builder.trunc(bias, _I32)))
            return context.make_tuple(builder, sig.return_type, [d, c])
        return nbt.Tuple((nbt.float32, nbt.int32))(x, nbt.intp, xq, nbt.int64), codegen

    @intrinsic
    def _bias_of(typingctx, data):
        """_weight_bias of data's kind, a constant"""
        def codegen(context, builder, sig, args):
            return ir.Constant(ir.IntType(64), _weight_bias(sig.args[0].dtype))
        return nbt.int64(data), codegen

    def _ir_weight_group(context, builder, arrty, data, n0, g):
        """Group g of weight rows n0..n0+15 (rows past the last repeat it) -> 8 <64 x i8>: vector j holds
        weights 4j..4j+3 of row n0 + r in lane r, plus _weight_bias. q8_0 rows are 32 bytes: each pair of
        rows r, r+8 shares a vector, then 8 x 8 transposes; q4_0 rows are 16 bytes of nibbles (byte i: weight
        i low, i + 16 high): 4 x 4 transposes, then each vector gives two, one per nibble."""
        N, row_bytes = _ir_shape(context, builder, arrty, data)
        q4 = arrty.dtype == nbt.uint8
        group_bytes = Q_BLOCK // 2 if q4 else Q_BLOCK
        offsets = [builder.add(builder.mul(_ir_row(builder, n0, r, N), row_bytes),
                               builder.mul(g, ir.Constant(g.type, group_bytes))) for r in range(Q_ROWS)]
        rows = [_ir_load(context, builder, arrty, data, i, ir.VectorType(_I32, group_bytes // 4), 1) for i in offsets]
        # the hardware prefetchers lose 16 interleaved row streams: ask for the next slab (contiguous) into L2, as
        # many bytes per group as this slab's group has (measured 2026-12-01, one core decoding q4_0 4096 x 4096
        # from memory: 7.5 GB/s without, 10.5 with; also prefetching each row 256 bytes ahead into L1: 9.8)
        base = context.make_array(arrty)(context, builder, data).data
        step = Q_ROWS * group_bytes
        next_slab = builder.add(builder.mul(builder.add(n0, ir.Constant(n0.type, Q_ROWS)), row_bytes),
                                builder.mul(g, ir.Constant(g.type, step)))
        for line in range(0, step, 64):
            at = builder.gep(base, [builder.add(next_slab, ir.Constant(next_slab.type, line))])
            _ir_call(builder, "llvm.prefetch.p0", ir.VoidType(), builder.bitcast(at, ir.IntType(8).as_pointer()),
                     ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1))
        n = group_bytes // 4  # vectors: vector r holds rows r, r + n, ...
        packed = [_ir_cat(builder, rows[r::n]) for r in range(n)]
        i8x64 = ir.VectorType(_I8, 64)
        words = [builder.bitcast(v, i8x64) for v in _ir_transpose(builder, packed)]
        if q4:
            return ([builder.and_(v, _ir_const(i8x64, 15)) for v in words]
                    + [builder.lshr(v, _ir_const(i8x64, 4)) for v in words])
        if _weight_bias(arrty.dtype):
            return [builder.xor(v, _ir_const(i8x64, -128)) for v in words]
        return words

    def _ir_dot4(builder, acc, w, x):
        """<16 x i32> acc + lane j: sum of w[4j+i] * x[4j+i] for i < 4, over <64 x i8> w (unsigned for "vnni",
        else signed) and x (signed). "avx2" multiplies |w| by x with w's sign: pmaddubsw's pair sums then stay
        below 2**15; "portable" widens to int32."""
        if DOT_ISA == "vnni":
            return _ir_call(builder, "llvm.x86.avx512.vpdpbusd.512", acc.type, acc, w, x)
        if DOT_ISA == "avx2":
            i8x32, i16x16, i32x8 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
            halves = []
            for h in range(2):
                wh, xh = _ir_part(builder, w, h, 32), _ir_part(builder, x, h, 32)
                magnitude = _ir_call(builder, "llvm.abs.v32i8", i8x32, wh, ir.Constant(ir.IntType(1), 0))
                signed_x = _ir_call(builder, "llvm.x86.avx2.psign.b", i8x32, xh, wh)
                pairs = _ir_call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16x16, magnitude, signed_x)
                halves.append(_ir_call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, pairs, _ir_const(i16x16, 1)))
            return builder.add(acc, _ir_cat(builder, halves))
        i32x64 = ir.VectorType(_I32, 64)
        sums = builder.mul(builder.sext(w, i32x64), builder.sext(x, i32x64))
        for n in (32, 16):  # fold neighbours: 64 -> 32 -> 16 lanes
            sums = builder.add(builder.shuffle_vector(sums, sums, _ir_consts(_I32, range(0, 2 * n, 2))),
                               builder.shuffle_vector(sums, sums, _ir_consts(_I32, range(1, 2 * n, 2))))
        return builder.add(acc, sums)

    @intrinsic
    def _qpack(typingctx, packed, g, data, n0):
        """packed[g] (8 x 64 bytes) = _ir_weight_group of group g of rows n0..n0+15"""
        def codegen(context, builder, sig, args):
            packed, g, data, n0 = args
            base = context.make_array(sig.args[0])(context, builder, packed).data
            for j, v in enumerate(_ir_weight_group(context, builder, sig.args[2], data, n0, g)):
                i = builder.add(builder.mul(g, ir.Constant(g.type, 8 * 64)), ir.Constant(g.type, 64 * j))
                builder.store(v, builder.bitcast(builder.gep(base, [i]), v.type.as_pointer()), align=1)
            return context.get_dummy_value()
        return nbt.none(packed, nbt.intp, data, nbt.intp), codegen

    @intrinsic
    def _qscales(typingctx, wd, scales, n0, g0):
        """wd[g0:g0+16] (16 groups x 16 rows, float32) = scales[n0:n0+16, g0:g0+16].T (f16 bits; rows past the
        last repeat it)"""
        def codegen(context, builder, sig, args):
            wd, scales, n0, g0 = args
            N, G = _ir_shape(context, builder, sig.args[1], scales)
            f32x16 = ir.VectorType(_F32, 16)
            rows = []
            for r in range(Q_ROWS):
                i = builder.add(builder.mul(_ir_row(builder, n0, r, N), G), g0)
                bits = _ir_load(context, builder, sig.args[1], scales, i, ir.VectorType(_I16, 16), 2)
                rows.append(_ir_decode(builder, bits, nbt.int16))
            base = context.make_array(sig.args[0])(context, builder, wd).data
            for j, v in enumerate(_ir_transpose(builder, rows)):
                i = builder.mul(builder.add(g0, ir.Constant(g0.type, j)), ir.Constant(g0.type, Q_ROWS))
                builder.store(v, builder.bitcast(builder.gep(base, [i]), f32x16.as_pointer()), align=4)
            return context.get_dummy_value()
        return nbt.none(wd, scales, nbt.intp, nbt.intp), codegen

    @intrinsic
    def _qdot(typingctx, acc, weights, n0, wd, g, xq, xd, xc, t0):
        """acc (C tokens x 16 rows) + group g: for token c = t0 + i, the int32 dot of its 32 int8 activations
        xq[c, 32g:32g+32] with each row's 32 weights, started from xc[c, g] (which takes the weights' bias off),
        to float32, then fma with wd[g] * xd[c, g]. weights: data (N, K or K/2) read at rows n0..n0+15, or
        _qpack's buffer (G, 8, 64). Every lane runs the same steps whatever C is: batch-invariant results."""
        if not isinstance(acc, _Tile) or acc.rows != Q_ROWS:
            return None
        C = acc.tokens

        def codegen(context, builder, sig, args):
            acc, weights, n0, wd, g, xq, xd, xc, t0 = args
            i8x64, f32x16 = ir.VectorType(_I8, 64), ir.VectorType(_F32, 16)
            if sig.args[1].ndim == 3:
                base = builder.mul(g, ir.Constant(g.type, 8 * 64))
                w = [_ir_load(context, builder, sig.args[1], weights, builder.add(base, ir.Constant(g.type, 64 * j)),
                              i8x64, 1) for j in range(8)]
            else:
                w = _ir_weight_group(context, builder, sig.args[1], weights, n0, g)
            dw = _ir_load(context, builder, sig.args[3], wd, builder.mul(g, ir.Constant(g.type, Q_ROWS)), f32x16, 4)
            K = _ir_shape(context, builder, sig.args[5], xq)[1]
            G = _ir_shape(context, builder, sig.args[6], xd)[1]
            tokens = []
            for c in range(C):
                t = builder.add(t0, ir.Constant(t0.type, c))
                tg = builder.add(builder.mul(t, G), g)
                s = _ir_splat(builder, _ir_load(context, builder, sig.args[7], xc, tg, _I32, 4), Q_ROWS)
                xi = builder.add(builder.mul(t, K), builder.mul(g, ir.Constant(g.type, Q_BLOCK)))
                for j in range(8):
                    x4 = _ir_load(context, builder, sig.args[5], xq, builder.add(xi, ir.Constant(xi.type, 4 * j)),
                                  _I32, 1)
                    s = _ir_dot4(builder, s, w[j], builder.bitcast(_ir_splat(builder, x4, Q_ROWS), i8x64))
                xd_c = _ir_load(context, builder, sig.args[6], xd, tg, _F32, 4)
                d = builder.fmul(dw, _ir_splat(builder, xd_c, Q_ROWS))
                tokens.append(_ir_call(builder, "llvm.fma.v16f32", f32x16, builder.sitofp(s, f32x16), d,
                                       _ir_part(builder, acc, c)))
            return _ir_cat(builder, tokens)
        return acc(acc, weights, nbt.intp, wd, nbt.intp, xq, xd, xc, nbt.intp), codegen

    @intrinsic
    def _fpack(typingctx, panel, k0, data, n0):
        """panel[k0:k0+16] (16 columns x 32 rows, float32) = data[n0:n0+32, k0:k0+16].T decoded (f32, f16 or
        bf16 bits; rows past the last repeat it): a float slab with rows in lanes, as in the int8 matmul"""
        def codegen(context, builder, sig, args):
            panel, k0, data, n0 = args
            N, K = _ir_shape(context, builder, sig.args[2], data)
            dtype = sig.args[2].dtype
            columns = [[] for _ in range(16)]  # column j: rows 0-15, then rows 16-31
            for half in range(F_ROWS // 16):
                rows = []
                for r in range(16 * half, 16 * half + 16):
                    i = builder.add(builder.mul(_ir_row(builder, n0, r, N), K), k0)
                    raw_ty = ir.VectorType(context.get_data_type(dtype), 16)
                    raw = _ir_load(context, builder, sig.args[2], data, i, raw_ty, dtype.bitwidth // 8)
                    rows.append(_ir_decode(builder, raw, dtype))
                for j, v in enumerate(_ir_transpose(builder, rows)):
                    columns[j].append(v)
            base = context.make_array(sig.args[0])(context, builder, panel).data
            for j, column in enumerate(columns):
                v = _ir_cat(builder, column)
                i = builder.mul(builder.add(k0, ir.Constant(k0.type, j)), ir.Constant(k0.type, F_ROWS))
                builder.store(v, builder.bitcast(builder.gep(base, [i]), v.type.as_pointer()), align=4)
            return context.get_dummy_value()
        return nbt.none(panel, nbt.intp, data, nbt.intp), codegen

    @intrinsic(prefer_literal=True)
    def _fdot(typingctx, acc, panel, k, x, t0, steps):
        """acc[c] = fma(panel[j], x[t0 + c, j], acc[c]) for j = k .. k + steps - 1 in turn, for the tile's C
        tokens: `steps` columns of the slab's 32 rows (steps constant: 4 per loop turn, 1 for the last few)"""
        if not isinstance(acc, _Tile) or acc.rows != F_ROWS or not isinstance(steps, nbt.IntegerLiteral):
            return None
        C, n_steps = acc.tokens, steps.literal_value

        def codegen(context, builder, sig, args):
            acc, panel, k, x, t0, _ = args
            f32x16 = ir.VectorType(_F32, 16)
            K = _ir_shape(context, builder, sig.args[3], x)[1]
            parts = [_ir_part(builder, acc, i) for i in range(2 * C)]  # token c: rows 0-15, rows 16-31
            for step in range(n_steps):
                j = builder.add(k, ir.Constant(k.type, step))
                w = [_ir_load(context, builder, sig.args[1], panel, builder.add(builder.mul(j, ir.Constant(
                    k.type, F_ROWS)), ir.Constant(k.type, 16 * h)), f32x16, 4) for h in range(2)]
                for c in range(C):
                    xi = builder.add(builder.mul(builder.add(t0, ir.Constant(t0.type, c)), K), j)
                    xj = _ir_splat(builder, _ir_load(context, builder, sig.args[3], x, xi, _F32, 4), 16)
                    for h in range(2):
                        parts[2 * c + h] = _ir_call(builder, "llvm.fma.v16f32", f32x16, w[h], xj,
                                                    parts[2 * c + h])
            return _ir_cat(builder, parts)
        return acc(acc, panel, nbt.intp, x, nbt.intp, steps), codegen

    @intrinsic
    def _tile_store(typingctx, out, t0, n0, acc, cols):
        """out[t0 + c, n0:n0 + cols] = acc[c] for each of the tile's tokens c (cols <= its rows: masked)"""
        if not isinstance(acc, _Tile):
            return None
        C, parts = acc.tokens, acc.rows // 16

        def codegen(context, builder, sig, args):
            out, t0, n0, acc, cols = args
            arr = context.make_array(sig.args[0])(context, builder, out)
            N = _ir_shape(context, builder, sig.args[0], out)[1]
            f32x16 = ir.VectorType(_F32, 16)
            lanes = _ir_splat(builder, builder.trunc(cols, _I32), 16)
            masks = [builder.icmp_signed("<", _ir_consts(_I32, range(16 * h, 16 * h + 16)), lanes)
                     for h in range(parts)]
            for c in range(C):
                row = builder.add(builder.mul(builder.add(t0, ir.Constant(t0.type, c)), N), n0)
                for h in range(parts):
                    ptr = builder.gep(arr.data, [builder.add(row, ir.Constant(row.type, 16 * h))])
                    _ir_call(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                             _ir_part(builder, acc, c * parts + h), builder.bitcast(ptr, f32x16.as_pointer()),
                             ir.Constant(_I32, 4), masks[h])
            return context.get_dummy_value()
        return nbt.none(out, nbt.intp, nbt.intp, acc, nbt.intp), codegen

    @intrinsic
    def _f16_bits(typingctx, x):
        """float32 x rounded to float16 (nearest even), as its bits in an int16 (numba has no float16)"""
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)
        return nbt.int16(nbt.float32), codegen

    @intrinsic
    def _pow2(typingctx, n):
        """2.0 ** n for an integral float32 n in [-126, 127], built from the exponent bits"""
        def codegen(context, builder, sig, args):
            biased = builder.add(builder.fptosi(args[0], _I32), ir.Constant(_I32, 127))
            return builder.bitcast(builder.shl(biased, ir.Constant(_I32, 23)), _F32)
        return nbt.float32(nbt.float32), codegen


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _exp_numba(x):
    """np.exp(x) for float32 x, within 2 ulp (Cephes expf: 2**n * e**r, |r| <= ln2/2, degree-7 polynomial)
    in plain arithmetic so that LLVM vectorises loops that call it (libm's expf is an opaque call).
    Clamped to [-87.3, 88.7]: the result stays finite and normal."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.7))
    n = np.floor(x * np.float32(1.442695041) + np.float32(0.5))  # round(x / ln2)
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # x - n ln2, ln2 split in two parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1)) * _pow2(n)


# -----------------------------------------------------------------------------
# rmsnorm
# Root-mean-square normalisation, arxiv.org/abs/1910.07467 eq (4); computed in float32 like Meta's x.float().


def rmsnorm_ref(out, x, weight, eps):
    """x (T, D), weight (D,) -> out (T, D) = x / sqrt(mean(x**2) + eps) * weight"""
    out[:] = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight
    return out


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def rmsnorm_numba(out, x, weight, eps):
    """x (T, D), weight (D,) -> out (T, D); one thread, row by row (a few thousand flops per token)"""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv_rms = np.float32(1) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv_rms * weight[i]


# one block per row, threads stride over D, block-wide sum of squares (warp shuffles, then shared memory);
# with y != nullptr the residual is added first (x += y), which is add() and rmsnorm() in one pass
_RMSNORM_SRC = r"""
extern "C" __global__ void rmsnorm_kernel(float* out, float* x, const float* y, const float* weight,
                                          int D, float eps) {
    __shared__ float shared[32];
    float* xr = x + (size_t)blockIdx.x * D;
    float* outr = out + (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = xr[i];
        if (y) {
            v += y[(size_t)blockIdx.x * D + i];
            xr[i] = v;
        }
        ss += v * v;
    }
    const float inv_rms = 1.0f / sqrtf(block_sum(ss, shared) / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) outr[i] = xr[i] * inv_rms * weight[i];
}
"""


def _rmsnorm_launch(op, out, x, y, weight, eps):
    arrays = dict(out=out, x=x, weight=weight) if y is None else dict(out=out, x=x, y=y, weight=weight)
    _check_f32(op, **arrays)
    if x.ndim != 2 or out.shape != x.shape or (y is not None and y.shape != x.shape):
        raise ValueError(f"{op}: x, out{'' if y is None else ', y'} must be (T, D) alike, got x {x.shape}, "
                         f"out {out.shape}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"{op}: weight must be ({x.shape[1]},), got {weight.shape}")
    T, D = x.shape
    fn = _CUDA.kernel(_RMSNORM_SRC, "rmsnorm_kernel")
    fn((T,), (256,), (out, x, y, weight, np.int32(D), np.float32(eps)))
    return out


def rmsnorm_cuda(out, x, weight, eps):
    """x (T, D), weight (D,) -> out (T, D) = x / sqrt(mean(x**2) + eps) * weight"""
    return _rmsnorm_launch("rmsnorm", out, x, None, weight, eps)


def add_rmsnorm_cuda(out, x, y, weight, eps):
    """In place x (T, D) += y, then out = rmsnorm(x) * weight: the residual add fused with the next norm"""
    return _rmsnorm_launch("add_rmsnorm", out, x, y, weight, eps)


# -----------------------------------------------------------------------------
# matmul
# The weight-streaming product that dominates decode time: every weight byte is read once per token.


def matmul_ref(out, x, w):
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T, W dequantized to float32 first"""
    out[:] = x @ dequantize(w).T
    return out


Q_BLOCK = 32  # numba kernels: the weight group size they take (ggml's block), and the int8 activation block


def quantize_activations_ref(x):
    """x (T, K) as the int8 decode matmul sees it: blocks of 32 with d = amax / 127 and q = round(x / d)
    (half away from zero), returned as q * d in float32; the numpy twin of _quantize_activations_numba."""
    g = x.reshape(x.shape[0], -1, Q_BLOCK)
    d = np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)
    inv_d = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    return (_round_half_away(g * inv_d) * d).reshape(x.shape).astype(np.float32)


# fast-math without "arcp", here and in the kernels that inline this: d = amax / 127 and 1 / d must divide
# exactly, as ggml and quantize_activations_ref do (times a rounded 1/127 flips a rounding now and then)
EXACT_DIVISION = NUMBA_FASTMATH - {"arcp"}


@_njit(fastmath=EXACT_DIVISION, cache=True)
def _quantize_activations_numba(x, bias):
    """x (T, K) -> (xq (T, K) int8, xd (T, K//32) float32, xc (T, K//32) int32) with x ~ xq * xd per block
    of 32: ggml's quantize_row_q8_0 (d = amax / 127, round half away from zero), the scale kept in float32;
    xc = -bias * sum(xq) per block starts the int8 dot of weights stored with that bias (_weight_bias)."""
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // Q_BLOCK), np.float32)
    xc = np.empty((T, K // Q_BLOCK), np.int32)
    for t in range(T):
        for b in range(K // Q_BLOCK):
            xd[t, b], xc[t, b] = _quantize_block(x, t * K + b * Q_BLOCK, xq, bias)
    return xq, xd, xc


Q_ROWS = 16  # int8 matmul: weight rows per slab, one per 32-bit lane of a 512-bit vector
Q_REPACK_MIN_T = 9  # int8 matmul: from this many tokens a slab is transposed once into a per-thread buffer


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _int8_tile(acc, out, t0, n0, cols, weights, wd, xq, xd, xc):
    """out[t0:t0+C, n0:n0+cols] = the C tokens' products with the slab: acc (zeros) advanced by every group"""
    for g in range(wd.shape[0]):
        acc = _qdot(acc, weights, n0, wd, g, xq, xd, xc, t0)
    _tile_store(out, t0, n0, acc, cols)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _int8_slab(out, n0, cols, weights, wd, xq, xd, xc):
    """Every token times one slab of weight rows: tiles of 8 tokens, then one each of 4, 2, 1 as needed"""
    T = xq.shape[0]
    t0 = 0
    while T - t0 >= 8:
        _int8_tile(_tile_zeros(8, 16), out, t0, n0, cols, weights, wd, xq, xd, xc)
        t0 += 8
    if T - t0 >= 4:
        _int8_tile(_tile_zeros(4, 16), out, t0, n0, cols, weights, wd, xq, xd, xc)
        t0 += 4
    if T - t0 >= 2:
        _int8_tile(_tile_zeros(2, 16), out, t0, n0, cols, weights, wd, xq, xd, xc)
        t0 += 2
    if T - t0 >= 1:
        _int8_tile(_tile_zeros(1, 16), out, t0, n0, cols, weights, wd, xq, xd, xc)


# Weight layout: as stored (memory-mapped ggml blocks, no repacked copy), each thread transposing 16-row slabs on
# the fly, why: measured 2.5x llama.cpp's tinyBLAS prefill per core on the same blocks, the transpose 5% of a
# 128-token matmul and decode at the old matvec's rate, where rows interleaved in the file would change every backend.
@_njit(parallel=True, fastmath=EXACT_DIVISION, cache=True)
def _matmul_int8_numba(out, x, data, scales, parts):
    """q8_0/q4_0 W (N, K) -> out (T, N) = x @ W.T with x rounded to int8 blocks, as llama.cpp does: per group
    of 32 an exact int32 dot, to float, fma by scale_w * scale_x, summed in group order (_qdot). Row t of out
    does not depend on the other rows of x: every T runs the same steps per (token, row). `parts` threads
    take contiguous runs of 16-row slabs; a slab's scales are transposed once for all its tokens."""
    T, K = x.shape
    N, G = scales.shape
    xq, xd, xc = _quantize_activations_numba(x, _bias_of(data))
    n_slabs = (N + Q_ROWS - 1) // Q_ROWS
    for p in numba.prange(parts):
        packed = np.empty((G if T >= Q_REPACK_MIN_T else 0, 8, 64), data.dtype)
        wd = np.empty((G, Q_ROWS), np.float32)  # (G, 16) the slab's scales, rows in lanes
        for slab in range(p * n_slabs // parts, (p + 1) * n_slabs // parts):
            n0 = slab * Q_ROWS
            for g in range(0, G - 15, 16):
                _qscales(wd, scales, n0, g)
            for g in range(G - G % 16, G):
                for r in range(Q_ROWS):
                    wd[g, r] = _scalar(scales, min(n0 + r, N - 1) * G + g)
            cols = min(Q_ROWS, N - n0)
            if T >= Q_REPACK_MIN_T:
                for g in range(G):
                    _qpack(packed, g, data, n0)
                _int8_slab(out, n0, cols, packed, wd, xq, xd, xc)
            else:
                _int8_slab(out, n0, cols, data, wd, xq, xd, xc)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _dequantize_row_numba(dst, data, scales, n, K):
    """dst[:K] = row n of W (N, K) in float32; scales (N, K//G) f16 bits, or None for the float kinds"""
    if scales is None:
        for k in range(0, K - K % 16, 16):
            _vstore(dst, k, _vload(data, n * K + k))
        for k in range(K - K % 16, K):
            dst[k] = _scalar(data, n * K + k)
    else:
        for g in range(K // Q_BLOCK):
            d = _scalar(scales, n * (K // Q_BLOCK) + g)
            for k in range(g * Q_BLOCK, (g + 1) * Q_BLOCK, 16):
                _vstore(dst, k, _vscale(_vload(data, n * K + k), d))


F_ROWS = 32  # float matmul: weight rows per slab (two vectors: 16 tokens' worth of fma chains at 8 tokens)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _float_tile(acc, out, t0, n0, cols, panel, x):
    """out[t0:t0+C, n0:n0+cols] = the C tokens' products with the slab: acc (zeros) advanced column by column"""
    K = panel.shape[0]
    for k in range(0, K - 3, 4):
        acc = _fdot(acc, panel, k, x, t0, 4)
    for k in range(K - K % 4, K):
        acc = _fdot(acc, panel, k, x, t0, 1)
    _tile_store(out, t0, n0, acc, cols)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _float_slab(out, n0, cols, panel, x):
    """Every token times one slab of weight rows: tiles of 8 tokens, then one each of 4, 2, 1 as needed"""
    T = x.shape[0]
    t0 = 0
    while T - t0 >= 8:
        _float_tile(_tile_zeros(8, 32), out, t0, n0, cols, panel, x)
        t0 += 8
    if T - t0 >= 4:
        _float_tile(_tile_zeros(4, 32), out, t0, n0, cols, panel, x)
        t0 += 4
    if T - t0 >= 2:
        _float_tile(_tile_zeros(2, 32), out, t0, n0, cols, panel, x)
        t0 += 2
    if T - t0 >= 1:
        _float_tile(_tile_zeros(1, 32), out, t0, n0, cols, panel, x)


@_njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _matmul_float_numba(out, x, data, parts):
    """f32/f16/bf16 W (N, K) -> out (T, N) = x @ W.T in float32, shaped like the int8 matmul: `parts` threads
    take runs of 32-row slabs, decode and transpose each once into a panel (K, 32), then every token tile
    does one fma per column and row in column order, so row t of out does not depend on the other rows."""
    T, K = x.shape
    N = data.shape[0]
    n_slabs = (N + F_ROWS - 1) // F_ROWS
    for p in numba.prange(parts):
        panel = np.empty((K, F_ROWS), np.float32)  # (K, 32) the slab, rows in lanes
        for slab in range(p * n_slabs // parts, (p + 1) * n_slabs // parts):
            n0 = slab * F_ROWS
            for k in range(0, K - 15, 16):
                _fpack(panel, k, data, n0)
            for k in range(K - K % 16, K):
                for r in range(F_ROWS):
                    panel[k, r] = _scalar(data, min(n0 + r, N - 1) * K + k)
            _float_slab(out, n0, min(F_ROWS, N - n0), panel, x)


def _numba_arrays(op: str, w: QWeight, K: int):
    """(data, scales) as the numba kernels take them: f16 data and the f16 scales as int16 bits."""
    if w.scales is None:
        return (w.data.view(np.int16) if w.data.dtype == np.float16 else w.data), None
    if K != Q_BLOCK * w.scales.shape[-1]:
        raise ValueError(f"{op}_numba: quantization group size {K // w.scales.shape[-1]}, but the numba "
                         f"kernels take ggml's blocks of {Q_BLOCK}; requantize with group size {Q_BLOCK} "
                         f"or use backend='numpy'")
    return w.data, w.scales.view(np.int16)


def matmul_numba(out, x, w):
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T. q8_0/q4_0 round x to int8 blocks, as llama.cpp does
    (compare against matmul_ref on quantize_activations_ref(x)); the float kinds multiply in float32."""
    data, scales = _numba_arrays("matmul", w, x.shape[1])
    # one part per thread numba may start (the active ones share them out): numba.get_num_threads() costs 2.5 us
    # here, a tenth of a small decode matmul, and inside the kernels it would keep them out of the disk cache
    threads = numba.config.NUMBA_NUM_THREADS
    if scales is not None:
        _matmul_int8_numba(out, x, data, scales, min(threads, _ceil_div(out.shape[1], Q_ROWS)))
    else:
        _matmul_float_numba(out, x, data, min(threads, _ceil_div(out.shape[1], F_ROWS)))


# Decode (T <= MATVEC_MAX_T): one block of 128 threads per 4 output rows and per token (blockIdx.y); each
# thread takes 16-byte chunks c, c + 128, ... of the 4 rows, so a warp reads 512 contiguous bytes of a row
# per load, and dots them with the x slice it loaded once for all 4 rows (x would otherwise be read from
# L1 4-8x more often than the weights); warp shuffles, then shared memory, sum the 4 threads' partials.
# Weights are read with L1::no_allocate (each byte is used once) so that L1 keeps x.
# Prefill (T > MATVEC_MAX_T) goes through cuBLAS on tensor cores (see _matmul_gemm): matmul_dequant_kernel
# expands quantized rows to f16 and matmul_convert_kernel rounds x to f16/bf16.
# matmul_scalar_kernel is the fallback when rows are not 16-byte aligned (f32/f16/bf16 with odd K).
_MATMUL_SRC = r"""
#define MV_THREADS 128
#define MV_ROWS 4
#define MV_UNROLL 2  // chunks per thread per loop trip, loaded before any is used

// 16 weight bytes, read once: skip L1 so the x slices stay there
__device__ __forceinline__ int4 load_weights(const unsigned char* p) {
    int4 v;
    asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// byte k of u as an exact float minus bias: 0x4B0000bb is the float 2^23 + bb. One PRMT and one FADD per
// weight instead of an int-to-float conversion, which runs at a quarter of the FMA rate and would be the
// bottleneck of the q8_0/q4_0 matvec (equals (float)(byte) - (bias - 2^23))
__device__ __forceinline__ float byte_to_f32(unsigned int u, int k, float bias) {
    return __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | k)) - bias;
}

template <int KIND> __device__ constexpr int chunk_elems() {  // weights in 16 bytes
    return KIND == KIND_Q4_0 ? 32 : KIND == KIND_Q8_0 ? 16 : KIND == KIND_F32 ? 4 : 8;
}

// dot product of one 16-byte chunk of weights with its x slice xv (chunk_elems floats), unscaled
template <int KIND> __device__ __forceinline__ float chunk_dot(int4 w, const float4* xv) {
    const unsigned int u[4] = {(unsigned int)w.x, (unsigned int)w.y, (unsigned int)w.z, (unsigned int)w.w};
    float s = 0.0f;
    if constexpr (KIND == KIND_Q8_0) {  // 16 int8: word i holds elements 4i..4i+3
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int b = u[i] ^ 0x80808080u;  // each signed byte q becomes q + 128, unsigned
            const float bias = 8388736.0f;              // 2^23 + 128
            s += byte_to_f32(b, 0, bias) * xv[i].x + byte_to_f32(b, 1, bias) * xv[i].y +
                 byte_to_f32(b, 2, bias) * xv[i].z + byte_to_f32(b, 3, bias) * xv[i].w;
        }
    } else if constexpr (KIND == KIND_Q4_0) {  // one group: byte j holds element j (low), j + 16 (high)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int lo = u[i] & 0x0F0F0F0Fu, hi = (u[i] >> 4) & 0x0F0F0F0Fu;
            const float bias = 8388616.0f;  // 2^23 + 8: nibble q stands for q - 8
            const float4 xl = xv[i], xh = xv[4 + i];  // elements 4i..4i+3 and 16+4i..16+4i+3
            s += byte_to_f32(lo, 0, bias) * xl.x + byte_to_f32(lo, 1, bias) * xl.y +
                 byte_to_f32(lo, 2, bias) * xl.z + byte_to_f32(lo, 3, bias) * xl.w +
                 byte_to_f32(hi, 0, bias) * xh.x + byte_to_f32(hi, 1, bias) * xh.y +
                 byte_to_f32(hi, 2, bias) * xh.z + byte_to_f32(hi, 3, bias) * xh.w;
        }
    } else if constexpr (KIND == KIND_BF16) {  // 8 bf16: word i holds element 2i (low half), 2i+1 (high)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const unsigned int a = u[2 * i], b = u[2 * i + 1];
            s += __uint_as_float(a << 16) * xv[i].x + __uint_as_float(a & 0xFFFF0000u) * xv[i].y +
                 __uint_as_float(b << 16) * xv[i].z + __uint_as_float(b & 0xFFFF0000u) * xv[i].w;
        }
    } else if constexpr (KIND == KIND_F16) {  // 8 f16, same layout as bf16
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const unsigned int a = u[2 * i], b = u[2 * i + 1];
            s += f16_to_f32((unsigned short)(a & 0xFFFFu)) * xv[i].x + f16_to_f32((unsigned short)(a >> 16)) * xv[i].y +
                 f16_to_f32((unsigned short)(b & 0xFFFFu)) * xv[i].z + f16_to_f32((unsigned short)(b >> 16)) * xv[i].w;
        }
    } else {  // KIND_F32: 4 floats
        s = __uint_as_float(u[0]) * xv[0].x + __uint_as_float(u[1]) * xv[0].y +
            __uint_as_float(u[2]) * xv[0].z + __uint_as_float(u[3]) * xv[0].w;
    }
    return s;
}

// out[t, n] = sum_k W[n, k] x[t, k] for the MV_ROWS rows of this block and the token t = blockIdx.y
template <int KIND>
__device__ __forceinline__ void matvec(float* out, const unsigned char* w, const unsigned short* scales,
                                       const float* x, int N, int K) {
    constexpr int E = chunk_elems<KIND>();
    const int chunks = K / E;
    const int row0 = blockIdx.x * MV_ROWS;
    x += (size_t)blockIdx.y * K;
    out += (size_t)blockIdx.y * N;
    const unsigned char* wrow[MV_ROWS];
    const unsigned short* srow[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; r++) {
        const size_t n = min(row0 + r, N - 1);  // rows past N re-read row N - 1; their sums are dropped
        wrow[r] = w + n * chunks * 16;
        srow[r] = scales + n * (K / GROUP);  // unused (and null) for unquantized kinds
    }
    float acc[MV_ROWS] = {};
    for (int c0 = threadIdx.x; c0 < chunks; c0 += MV_UNROLL * MV_THREADS) {
        // every load first, so that MV_UNROLL * MV_ROWS 16-byte weight loads are in flight together; a
        // chunk past the end of the row re-reads chunk c0 (valid memory) and is weighted 0 (a branch
        // around it instead would let the compiler sink its loads behind the first chunk's math)
        int4 wv[MV_UNROLL][MV_ROWS];
        float4 xv[MV_UNROLL][E / 4];
        float scale[MV_UNROLL][MV_ROWS];
#pragma unroll
        for (int u = 0; u < MV_UNROLL; u++) {
            const bool inside = c0 + u * MV_THREADS < chunks;
            const int c = inside ? c0 + u * MV_THREADS : c0;
#pragma unroll
            for (int r = 0; r < MV_ROWS; r++) wv[u][r] = load_weights(wrow[r] + (size_t)c * 16);
#pragma unroll
            for (int i = 0; i < E / 4; i++) xv[u][i] = __ldg((const float4*)(x + (size_t)c * E) + i);
#pragma unroll
            for (int r = 0; r < MV_ROWS; r++) {  // q8_0: 2 chunks per group; q4_0: 1
                if constexpr (KIND == KIND_Q8_0) scale[u][r] = f16_to_f32(__ldg(srow[r] + c / 2));
                else if constexpr (KIND == KIND_Q4_0) scale[u][r] = f16_to_f32(__ldg(srow[r] + c));
                else scale[u][r] = 1.0f;
                scale[u][r] = inside ? scale[u][r] : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < MV_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < MV_ROWS; r++) acc[r] += scale[u][r] * chunk_dot<KIND>(wv[u][r], xv[u]);
    }
    __shared__ float partial[MV_ROWS][MV_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int r = 0; r < MV_ROWS; r++) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) partial[r][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < MV_ROWS && row0 + threadIdx.x < N) {
        float s = 0.0f;
        for (int i = 0; i < MV_THREADS / 32; i++) s += partial[threadIdx.x][i];
        out[row0 + threadIdx.x] = s;
    }
}

#define MATVEC_KERNEL(name, KIND)                                                                   \
    extern "C" __global__ void __launch_bounds__(MV_THREADS)                                        \
    name(float* out, const unsigned char* w, const unsigned short* scales, const float* x, int N, int K) { \
        matvec<KIND>(out, w, scales, x, N, K);                                                      \
    }
MATVEC_KERNEL(matmul_q8_0_kernel, KIND_Q8_0)
MATVEC_KERNEL(matmul_q4_0_kernel, KIND_Q4_0)
MATVEC_KERNEL(matmul_bf16_kernel, KIND_BF16)
MATVEC_KERNEL(matmul_f16_kernel, KIND_F16)
MATVEC_KERNEL(matmul_f32_kernel, KIND_F32)

// any kind, any K: one warp per output row, lanes stride over K
extern "C" __global__ void matmul_scalar_kernel(float* out, int kind, const void* w, const unsigned short* scales,
                                                const float* x, int N, int K) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;  // the whole warp leaves together
    x += (size_t)blockIdx.y * K;
    float s = 0.0f;
    for (int k = lane; k < K; k += 32) s += weight_at(kind, w, scales, n, k, K) * x[k];
    s = warp_sum(s);
    if (lane == 0) out[(size_t)blockIdx.y * N + n] = s;
}

// rows n0..n0+rows-1 of a quantized W as f16 (rows, K): one thread per 8 weights, one 16-byte store
extern "C" __global__ void matmul_dequant_kernel(unsigned short* out, int kind, const void* w,
                                                 const unsigned short* scales, long long n0, int rows, int K) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // index of an 8-weight piece
    if (i >= (long long)rows * (K / 8)) return;
    const size_t n = n0 + i / (K / 8);
    const int k = (int)(i % (K / 8)) * 8;
    unsigned int h[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        h[j] = f32_to_f16(weight_at(kind, w, scales, n, k + 2 * j, K)) |
               ((unsigned int)f32_to_f16(weight_at(kind, w, scales, n, k + 2 * j + 1, K)) << 16);
    ((uint4*)out)[i] = uint4{h[0], h[1], h[2], h[3]};
}

// x (n floats) rounded to f16 or bf16 bits, the activation operand of the tensor-core product
extern "C" __global__ void matmul_convert_kernel(unsigned short* out, const float* x, long long n, int to_bf16) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = to_bf16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
}
"""

MATVEC_MAX_T = 4  # up to this many tokens the weight-streaming kernels (f32 math) beat dequantize + GEMM
_MV_ROWS, _MV_THREADS = 4, 128  # MV_ROWS, MV_THREADS of _MATMUL_SRC
_CHUNK_ELEMS = {"f32": 4, "f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 32}  # weights per 16 bytes
_DEQUANT_BUDGET = 1 << 26  # f16 weights dequantized per cuBLAS call (128 MB of scratch at most)
# cudaDataType / cublasComputeType_t / cublasGemmAlgo_t values (library_types.h, cublas_api.h)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_OP_N, _CUBLAS_OP_T, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT = 0, 1, 68, -1


def matmul_cuda(out, x, w):
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T

    T <= MATVEC_MAX_T: weight-streaming kernels in float32 (decode). Larger T: cuBLAS on tensor cores with
    x and W rounded to 16 bits (bf16 weights as stored, every other kind as f16; f32 weights stay f32)
    and float32 accumulation, so compare prefill against matmul_ref on the same rounded operands.
    """
    _check_f32("matmul", out=out, x=x)
    kind, N, K = _check_weight("matmul", w)
    if x.ndim != 2 or x.shape[1] != K or out.shape != (x.shape[0], N):
        raise ValueError(f"matmul: x (T, {K}) and out (T, {N}) expected for W {w.shape}, got x {x.shape}, "
                         f"out {out.shape}")
    T = x.shape[0]
    if T == 0:
        return out
    if T > MATVEC_MAX_T:
        return _matmul_gemm(out, x, w, kind, N, K, T)
    # 16-byte loads need 16-byte aligned rows of W and x
    if K % _CHUNK_ELEMS[kind] == 0 and K % 4 == 0 and w.data.data.ptr % 16 == 0 and x.data.ptr % 16 == 0:
        fn = _CUDA.kernel(_MATMUL_SRC, f"matmul_{kind}_kernel")
        fn((_ceil_div(N, _MV_ROWS), T), (_MV_THREADS,), (out, w.data, w.scales, x, np.int32(N), np.int32(K)))
    else:
        fn = _CUDA.kernel(_MATMUL_SRC, "matmul_scalar_kernel")
        fn((_ceil_div(N, 8), T), (256,), (out, np.int32(CUDA_KIND[kind]), w.data, w.scales, x, np.int32(N),
                                          np.int32(K)))
    return out


def _matmul_gemm(out, x, w, kind, N, K, T):
    """Prefill product through cuBLAS GemmEx on tensor cores (the documented first step before a
    hand-written dequantize-in-the-tile kernel): out (T, N) row-major is the column-major (N, T) product
    W (K, N)^T @ x (K, T), so W and x are passed as stored, with W transposed."""
    from cupy.cuda import cublas

    a_type = {"f32": _CUDA_R_32F, "bf16": _CUDA_R_16BF}.get(kind, _CUDA_R_16F)
    if kind == "f32":
        xs = x
    else:
        xs = cupy.empty((T, K), dtype=np.uint16)  # x rounded to the 16-bit type of W
        fn = _CUDA.kernel(_MATMUL_SRC, "matmul_convert_kernel")
        fn((_ceil_div(T * K, 256),), (256,), (xs, x, np.int64(T * K), np.int32(kind == "bf16")))
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)  # host scalars alpha, beta
    handle = cupy.cuda.device.get_cublas_handle()
    step = max(1, min(N, _DEQUANT_BUDGET // K)) if kind in QUANTIZED else N
    for n0 in range(0, N, step):
        rows = min(step, N - n0)
        if kind in QUANTIZED:
            wbuf = cupy.empty((rows, K), dtype=np.uint16)
            fn = _CUDA.kernel(_MATMUL_SRC, "matmul_dequant_kernel")
            fn((_ceil_div(rows * K // 8, 256),), (256,),
               (wbuf, np.int32(CUDA_KIND[kind]), w.data, w.scales, np.int64(n0), np.int32(rows), np.int32(K)))
            a_ptr = wbuf.data.ptr
        else:
            a_ptr = w.data.data.ptr + n0 * K * w.data.itemsize
        cublas.gemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, rows, T, K, one.ctypes.data, a_ptr, a_type, K,
                      xs.data.ptr, a_type, K, zero.ctypes.data, out.data.ptr + n0 * 4, _CUDA_R_32F, N,
                      _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    return out


def embed_ref(out, w, tokens):
    """tokens (T,) -> out (T, D) = W[tokens], dequantized"""
    rows = QWeight(w.data[tokens], None if w.scales is None else w.scales[tokens])
    out[:] = dequantize(rows)
    return out


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def _embed_numba(out, data, scales, tokens):
    """out (T, D) = rows tokens of W (V, D), dequantized exactly as dequantize() does"""
    V, D = data.shape[0], out.shape[1]
    for t in range(tokens.shape[0]):
        if tokens[t] < 0 or tokens[t] >= V:
            raise IndexError("embed_numba: token id out of range of the vocabulary")
        _dequantize_row_numba(out[t], data, scales, tokens[t], D)


def embed_numba(out, w, tokens):
    """tokens (T,) -> out (T, D) = W[tokens], dequantized"""
    data, scales = _numba_arrays("embed", w, out.shape[1])
    _embed_numba(out, data, scales, np.asarray(tokens, dtype=np.int64))


# one block per token, threads stride over the D columns of its row, dequantizing with weight_at
_EMBED_SRC = r"""
extern "C" __global__ void embed_kernel(float* out, int kind, const void* w, const unsigned short* scales,
                                        const int* tokens, int D) {
    const size_t row = tokens[blockIdx.x];
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        out[(size_t)blockIdx.x * D + d] = weight_at(kind, w, scales, row, d, D);
}
"""


def embed_cuda(out, w, tokens):
    """tokens (T,) -> out (T, D) = W[tokens], dequantized; tokens on the host, or int32 on the GPU"""
    _check_f32("embed", out=out)
    kind, V, D = _check_weight("embed", w)
    T = out.shape[0]
    if out.ndim != 2 or out.shape[1] != D:
        raise ValueError(f"embed: out must be (T, {D}), got {out.shape}")
    device_tokens = _device_ids("embed", "tokens", tokens, T, V)
    if T:
        fn = _CUDA.kernel(_EMBED_SRC, "embed_kernel")
        fn((T,), (256,), (out, np.int32(CUDA_KIND[kind]), w.data, w.scales, device_tokens, np.int32(D)))
    return out


# -----------------------------------------------------------------------------
# rope
# Rotary position embedding, arxiv.org/abs/2104.09864 eq (34), on adjacent pairs (x[2i], x[2i+1]) of each
# head: Meta's complex-number view in model.py (HF's rotate-half layout is undone by the converter).


def rope_ref(x, positions, cos, sin):
    """In place: x (T, n_heads, Dh), row t at position positions[t]; cos, sin (S, Dh//2)"""
    c = cos[positions][:, None, :]  # (T, 1, Dh//2)
    s = sin[positions][:, None, :]
    x0, x1 = x[..., 0::2].copy(), x[..., 1::2].copy()  # (T, n_heads, Dh//2)
    x[..., 0::2] = x0 * c - x1 * s
    x[..., 1::2] = x0 * s + x1 * c
    return x


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def rope_numba(x, positions, cos, sin):
    """In place: x (T, n_heads, Dh), row t at position positions[t]; cos, sin (S, Dh//2); one thread"""
    T, n_heads, Dh = x.shape
    for t in range(T):
        pos = positions[t]
        if pos < 0 or pos >= cos.shape[0]:
            raise ValueError("rope_numba: a position is outside the cos/sin tables")
        for h in range(n_heads):
            for i in range(Dh // 2):
                c, s = cos[pos, i], sin[pos, i]
                x0, x1 = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = x0 * c - x1 * s
                x[t, h, 2 * i + 1] = x0 * s + x1 * c


# one thread per (token, head, pair): the pair (x[2i], x[2i+1]) of row t is rotated by the angle at positions[t]
_ROPE_SRC = r"""
extern "C" __global__ void rope_kernel(float* x, const float* cos, const float* sin, const int* positions,
                                       int T, int n_heads, int half) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // pair number in x
    if (idx >= (long long)T * n_heads * half) return;
    const int i = idx % half, t = idx / ((long long)n_heads * half);
    const size_t row = (size_t)positions[t] * half;
    const float c = cos[row + i], s = sin[row + i];
    float2* p = (float2*)x + idx;
    const float2 v = *p;
    *p = float2{v.x * c - v.y * s, v.x * s + v.y * c};
}
"""


def rope_cuda(x, positions, cos, sin):
    """In place: x (T, n_heads, Dh), row t at position positions[t] (host ids, or int32 (T,) on the GPU);
    cos, sin (S, Dh//2)"""
    _check_f32("rope", x=x, cos=cos, sin=sin)
    if x.ndim != 3 or x.shape[2] % 2:
        raise ValueError(f"rope: x must be (T, n_heads, Dh) with Dh even, got {x.shape}")
    T, n_heads, Dh = x.shape
    if cos.ndim != 2 or cos.shape[1] != Dh // 2 or sin.shape != cos.shape:
        raise ValueError(f"rope: cos and sin must be (S, {Dh // 2}), got {cos.shape} and {sin.shape}")
    if x.data.ptr % 8:
        raise ValueError("rope: x must start at an 8-byte boundary (pairs are read as float2)")
    positions = _device_ids("rope", "positions", positions, T, cos.shape[0])
    n = T * n_heads * (Dh // 2)
    if n:
        fn = _CUDA.kernel(_ROPE_SRC, "rope_kernel")
        fn((_ceil_div(n, 256),), (256,), (x, cos, sin, positions, np.int32(T), np.int32(n_heads),
                                          np.int32(Dh // 2)))
    return x


# -----------------------------------------------------------------------------
# attention
# Causal grouped-query attention over the KV cache, arxiv.org/abs/2305.13245: query head h reads
# key/value head h // (H // KV). Writing k, v into the cache happens here so one call does the whole step.
# A call takes rows of several sequences at once (llama.cpp's llama_batch): row t is the token at position
# positions[t] of the sequence whose keys and values live in cache slot slots[t]. The caches are QWeights
# (n_slots, S, KV, Dh) of kind f32, f16 or q8_0 (groups of 32 along Dh, one f16 scale: llama.cpp's
# --cache-type q8_0); each row stores its k, v, then attends to its slot's rows 0..positions[t], so the rows
# of one sequence in a call see each other causally and the keys of earlier calls.


def _cache_store_ref(cache: QWeight, rows, slots, positions):
    """cache (n_slots, S, KV, Dh) at [slots[t], positions[t]] = rows[t] (T, KV, Dh), rounded to the cache's kind"""
    stored = quantize(rows, cache.kind)
    cache.data[slots, positions] = stored.data
    if cache.scales is not None:
        cache.scales[slots, positions] = stored.scales


def attention_ref(out, q, k, v, k_cache, v_cache, slots, positions):
    """q (T, H, Dh), k, v (T, KV, Dh) of the rows at (slots[t], positions[t]); caches QWeight (n_slots, S, KV, Dh)
    -> out (T, H*Dh): row t attends to rows 0..positions[t] of its slot"""
    T, H, Dh = q.shape
    KV = k.shape[1]
    _cache_store_ref(k_cache, k, slots, positions)
    _cache_store_ref(v_cache, v, slots, positions)
    for slot in np.unique(slots):
        rows = np.flatnonzero(slots == slot)  # this sequence's rows of the call
        P = positions[rows].max() + 1
        keys = dequantize(QWeight(k_cache.data[slot, :P], None if k_cache.scales is None else k_cache.scales[slot, :P]))
        values = dequantize(QWeight(v_cache.data[slot, :P], None if v_cache.scales is None else v_cache.scales[slot, :P]))
        qg = q[rows].reshape(len(rows), KV, H // KV, Dh)  # (R, KV, n_rep, Dh)
        scores = np.einsum("tgrd,pgd->grtp", qg, keys) / np.float32(np.sqrt(Dh))  # (KV, n_rep, R, P)
        scores[..., np.arange(P)[None, :] > positions[rows][:, None]] = -np.inf  # causal mask (R, P)
        # subtract the row max before exp so that large scores cannot overflow
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out[rows] = np.einsum("grtp,pgd->tgrd", weights, values).reshape(len(rows), H * Dh)
    return out


ATTENTION_BLOCK = 32  # numba attention: keys per step of the online softmax
ATTENTION_TILE = 4  # numba attention: consecutive rows of one sequence whose queries share a task (prefill)
# numba attention: a row's keys are cut at fixed multiples of this many keys (flash-decoding's split), each
# part's softmax kept apart and merged at the end. Fixed cuts make a row's result depend on its own position
# only, never on the other rows of the call: greedy output does not change with the batch (and a 550-key
# decode still makes 5 tasks per KV head for the threads).
ATTENTION_SPLIT = 128


def attention_numba(out, q, k, v, k_cache, v_cache, slots, positions):
    """q (T, H, Dh), k, v (T, KV, Dh) of the rows at (slots[t], positions[t]); caches QWeight (n_slots, S, KV, Dh)
    f32, f16 or q8_0 -> out (T, H*Dh): row t attends to rows 0..positions[t] of its slot"""
    n_slots, S = k_cache.data.shape[:2]
    slots, positions = np.asarray(slots, np.int64), np.asarray(positions, np.int64)
    if len(slots) and (slots.min() < 0 or slots.max() >= n_slots or positions.min() < 0 or positions.max() >= S):
        raise ValueError(f"attention_numba: rows at slots {slots.min()}..{slots.max()}, positions "
                         f"{positions.min()}..{positions.max()} fall outside the cache of {n_slots} x {S}")
    if q.shape[2] % 16:  # the kernel works in whole 16-float vectors; Llama heads are 64 or 128 wide
        attention_ref(out, q, k, v, k_cache, v_cache, slots, positions)
        return
    if not len(slots):
        return
    (kd, ks), (vd, vs) = _numba_cache_arrays(k_cache), _numba_cache_arrays(v_cache)
    for data, scales, rows in ((kd, ks, k), (vd, vs, v)):
        if scales is None:
            _cache_store_numba(data, rows, slots, positions)
        else:
            _cache_store_q8_0_numba(data, scales, rows, slots, positions)
    _attention_numba(out, q, kd, ks, vd, vs, slots, positions)


def _numba_cache_arrays(cache: QWeight):
    """(data, scales) of a cache as the numba kernels take them: f16 values and f16 scales as int16 bits"""
    data = cache.data.view(np.int16) if cache.data.dtype == np.float16 else cache.data
    return data, None if cache.scales is None else cache.scales.view(np.int16)


@_njit(cache=True)
def _cache_store_numba(data, rows, slots, positions):
    """data (n_slots, S, KV, Dh) float32, or f16 bits (rounded to nearest even), at [slots[t], positions[t]]
    = rows[t] (T, KV, Dh)"""
    S, row = data.shape[1], data.shape[2] * data.shape[3]
    for t in range(rows.shape[0]):
        dst = (slots[t] * S + positions[t]) * row
        for c in range(0, row, 16):
            _vstore(data, dst + c, _vload(rows, t * row + c))


@_njit(fastmath=EXACT_DIVISION, cache=True)
def _cache_store_q8_0_numba(data, scales, rows, slots, positions):
    """data (n_slots, S, KV, Dh) int8 with f16 scales per 32 at [slots[t], positions[t]] = rows[t] (T, KV, Dh):
    ggml's quantize_row_q8_0, dividing exactly as quantize() does"""
    S, row = data.shape[1], data.shape[2] * data.shape[3]
    for t in range(rows.shape[0]):
        dst = (slots[t] * S + positions[t]) * row
        for b in range(row // Q_BLOCK):
            amax = np.float32(0)
            for i in range(b * Q_BLOCK, (b + 1) * Q_BLOCK):
                amax = max(amax, abs(rows.flat[t * row + i]))
            d = amax / np.float32(127)
            inv_d = np.float32(1) / d if d != 0 else np.float32(0)  # all-zero group: q = 0
            for i in range(b * Q_BLOCK, (b + 1) * Q_BLOCK):
                x = rows.flat[t * row + i] * inv_d
                data.flat[dst + i] = np.int8(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)))
            scales.flat[dst // Q_BLOCK + b] = _f16_bits(d)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _attention_rows(acc, m, l, qs, kd, ks, vd, vs, base, stride, p_lo, p_hi, last):
    """Online softmax (arxiv.org/abs/1805.02867) of query rows qs (R, Dh), already scaled by 1/sqrt(Dh), over
    the keys p_lo..p_hi-1 of one KV head, whose key p starts at data.flat[base + p * stride]; row r sees keys
    up to last[r] (causal). Updates its running max m (R,), sum l (R,) of exp(score - m) and unnormalised
    output acc (R, Dh). Keys go 32 a step: the step's keys and values are copied out of the cache once, as
    float32 (an f16 or q8_0 cache is read at its own size and converted once, not once per query head), and
    every row takes them while they are in L1."""
    R, Dh = qs.shape
    e = np.empty(ATTENTION_BLOCK, np.float32)  # a row's scores of the step, then exp(score - max), 0 past nv
    k_step = np.empty((ATTENTION_BLOCK, Dh), np.float32)  # the step's keys and values
    v_step = np.empty((ATTENTION_BLOCK, Dh), np.float32)
    for p0 in range(p_lo, p_hi, ATTENTION_BLOCK):
        for j in range(min(ATTENTION_BLOCK, p_hi - p0)):
            src = base + (p0 + j) * stride
            for c in range(0, Dh, 16):
                kv, vv = _vload(kd, src + c), _vload(vd, src + c)
                if ks is not None:  # q8_0: one scale per 32 values
                    kv = _vscale(kv, _scalar(ks, (src + c) // Q_BLOCK))
                    vv = _vscale(vv, _scalar(vs, (src + c) // Q_BLOCK))
                _vstore(k_step, j * Dh + c, kv)
                _vstore(v_step, j * Dh + c, vv)
        for r in range(R):
            nv = min(ATTENTION_BLOCK, p_hi - p0, last[r] + 1 - p0)  # keys of the step that row r sees
            if nv <= 0:
                continue
            m_new = m[r]
            for j in range(0, nv - 3, 4):  # scores of four keys at a time: four fma chains, one folded sum
                acc4 = _tile_zero()
                for c in range(0, Dh, 16):
                    acc4 = _tile_fma(acc4, _vload(qs, r * Dh + c), k_step, j * Dh + c, Dh)
                s = _tile_sums(acc4)
                e[j], e[j + 1], e[j + 2], e[j + 3] = s[0], s[1], s[2], s[3]
                m_new = max(m_new, max(max(s[0], s[1]), max(s[2], s[3])))
            for j in range(nv - nv % 4, nv):
                acc1 = _vzero()
                for c in range(0, Dh, 16):
                    acc1 = _vfma(acc1, _vload(qs, r * Dh + c), _vload(k_step, j * Dh + c))
                e[j] = _vsum(acc1)
                m_new = max(m_new, e[j])
            rescale = _exp_numba(m[r] - m_new)
            total = np.float32(0)
            for j in range(ATTENTION_BLOCK):  # the whole step, so that LLVM vectorises the exps
                e[j] = _exp_numba(e[j] - m_new) if j < nv else np.float32(0)
                total += e[j]
            l[r], m[r] = l[r] * rescale + total, m_new
            for c in range(0, Dh - Dh % 64, 64):  # 64 lanes of output a key: one splat of e serves 4 loads
                ao = r * Dh + c
                o0, o1 = _vscale(_vload(acc, ao), rescale), _vscale(_vload(acc, ao + 16), rescale)
                o2, o3 = _vscale(_vload(acc, ao + 32), rescale), _vscale(_vload(acc, ao + 48), rescale)
                for j in range(nv):
                    w = _vsplat(_scalar(e, j))
                    vo = j * Dh + c
                    o0, o1 = _vfma(o0, _vload(v_step, vo), w), _vfma(o1, _vload(v_step, vo + 16), w)
                    o2, o3 = _vfma(o2, _vload(v_step, vo + 32), w), _vfma(o3, _vload(v_step, vo + 48), w)
                _vstore(acc, ao, o0)
                _vstore(acc, ao + 16, o1)
                _vstore(acc, ao + 32, o2)
                _vstore(acc, ao + 48, o3)
            for c in range(Dh - Dh % 64, Dh, 16):  # what is left of a head that is not a multiple of 64 wide
                o0, o1, o2, o3 = _vscale(_vload(acc, r * Dh + c), rescale), _vzero(), _vzero(), _vzero()
                for j in range(0, nv - 3, 4):
                    o0 = _vfma(o0, _vload(v_step, j * Dh + c), _vsplat(_scalar(e, j)))
                    o1 = _vfma(o1, _vload(v_step, (j + 1) * Dh + c), _vsplat(_scalar(e, j + 1)))
                    o2 = _vfma(o2, _vload(v_step, (j + 2) * Dh + c), _vsplat(_scalar(e, j + 2)))
                    o3 = _vfma(o3, _vload(v_step, (j + 3) * Dh + c), _vsplat(_scalar(e, j + 3)))
                for j in range(nv - nv % 4, nv):
                    o0 = _vfma(o0, _vload(v_step, j * Dh + c), _vsplat(_scalar(e, j)))
                _vstore(acc, r * Dh + c, _vadd(_vadd(o0, o1), _vadd(o2, o3)))


@_njit(cache=True)
def _attention_tasks(slots, positions):
    """The tasks of a call, before the KV head: tiles are runs of up to ATTENTION_TILE consecutive rows of one
    sequence at consecutive positions, cut into ATTENTION_SPLIT parts of their keys. Returns starts
    (n_tiles + 1,) of the tiles' rows, and per task its tile and split (n_tasks,), plus per tile the index of
    its first kept part, or -1 when it has one split and writes out directly. Tiles are dealt first, last,
    second, second-to-last... so that the threads' contiguous shares of the tasks hold equal causal work."""
    T = slots.shape[0]
    starts = [0]
    for t in range(1, T):
        if slots[t] != slots[t - 1] or positions[t] != positions[t - 1] + 1 or t - starts[-1] == ATTENTION_TILE:
            starts.append(t)
    starts.append(T)
    n_tiles = len(starts) - 1
    n_split = np.empty(n_tiles, np.int64)
    first_part = np.full(n_tiles, -1, np.int64)
    n_parts = 0
    for i in range(n_tiles):
        n_split[i] = positions[starts[i + 1] - 1] // ATTENTION_SPLIT + 1  # splits of the tile's last row
        if n_split[i] > 1:
            first_part[i] = n_parts
            n_parts += n_split[i]
    task_tile = np.empty(n_split.sum(), np.int64)
    task_split = np.empty_like(task_tile)
    n = 0
    for d in range(n_tiles):
        i = d // 2 if d % 2 == 0 else n_tiles - 1 - d // 2
        for s in range(n_split[i]):
            task_tile[n], task_split[n] = i, s
            n += 1
    return np.array(starts), task_tile, task_split, first_part, n_parts


@_njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _attention_numba(out, q, kd, ks, vd, vs, slots, positions):
    """attention_numba for Dh % 16 == 0, once k and v are in the cache. A task is (tile, split, KV head): the
    tile's (token, query head) rows of one KV head's group (GQA: the n_rep heads take each step of keys in
    turn while it is in L1) over one ATTENTION_SPLIT of the keys. A tile with one split writes out directly;
    with more, each split's max, sum and unnormalised output are kept and merged in split order."""
    T, H, Dh = q.shape
    S, KV = kd.shape[1], kd.shape[2]
    n_rep, stride = H // KV, KV * Dh  # query heads per KV head; cache values per position
    scale = np.float32(1) / np.sqrt(np.float32(Dh))
    starts, task_tile, task_split, first_part, n_parts = _attention_tasks(slots, positions)
    R = ATTENTION_TILE * n_rep  # rows of a task at most
    part_m = np.empty((n_parts, KV, R), np.float32)
    part_l = np.empty((n_parts, KV, R), np.float32)
    part_acc = np.empty((n_parts, KV, R, Dh), np.float32)
    for task_g in numba.prange(task_tile.shape[0] * KV):
        task, g = task_g // KV, task_g % KV
        tile, s = task_tile[task], task_split[task]
        t0, nt = starts[tile], starts[tile + 1] - starts[tile]
        qs = np.empty((nt * n_rep, Dh), np.float32)
        last = np.empty(nt * n_rep, np.int64)
        for r in range(nt * n_rep):  # rows (token, query head of the group)
            t, h = t0 + r // n_rep, g * n_rep + r % n_rep
            last[r] = positions[t]
            for c in range(0, Dh, 16):
                _vstore(qs, r * Dh + c, _vscale(_vload(q, (t * H + h) * Dh + c), scale))
        m = np.full(nt * n_rep, -np.inf, np.float32)
        l = np.zeros(nt * n_rep, np.float32)
        acc = np.zeros((nt * n_rep, Dh), np.float32)
        p_lo = s * ATTENTION_SPLIT
        p_hi = min(positions[t0 + nt - 1] + 1, p_lo + ATTENTION_SPLIT)
        _attention_rows(acc, m, l, qs, kd, ks, vd, vs, (slots[t0] * S * KV + g) * Dh, stride, p_lo, p_hi, last)
        if first_part[tile] < 0:
            for r in range(nt * n_rep):
                inv_l = np.float32(1) / l[r]
                oo = ((t0 + r // n_rep) * H + g * n_rep + r % n_rep) * Dh
                for c in range(0, Dh, 16):
                    _vstore(out, oo + c, _vscale(_vload(acc, r * Dh + c), inv_l))
        else:
            part = first_part[tile] + s
            part_m[part, g, :nt * n_rep], part_l[part, g, :nt * n_rep] = m, l
            part_acc[part, g, :nt * n_rep] = acc
    for tile_g in numba.prange((starts.shape[0] - 1) * KV):  # merge the splits, in split order
        tile, g = tile_g // KV, tile_g % KV
        if first_part[tile] >= 0:
            t0, nt = starts[tile], starts[tile + 1] - starts[tile]
            n_split = positions[t0 + nt - 1] // ATTENTION_SPLIT + 1
            _attention_merge(out, part_m, part_l, part_acc, first_part[tile], n_split, g, t0, nt, n_rep)


@_njit(fastmath=NUMBA_FASTMATH, inline="always")
def _attention_merge(out, part_m, part_l, part_acc, first, n_split, g, t0, nt, n_rep):
    """out of the tile's rows of KV head g = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s,
    over its splits first..first+n_split-1 in order (a split that saw no key of a row has m = -inf: skipped;
    with one real split this is acc / l to the bit, as a tile of one split writes it)"""
    H, Dh = out.shape[1] // part_acc.shape[3], part_acc.shape[3]
    for r in range(nt * n_rep):
        oo = ((t0 + r // n_rep) * H + g * n_rep + r % n_rep) * Dh
        m_all = np.float32(-np.inf)
        for s in range(first, first + n_split):
            m_all = max(m_all, part_m[s, g, r])
        l_all = np.float32(0)
        o = np.zeros(Dh, np.float32)
        for s in range(first, first + n_split):
            if part_m[s, g, r] == -np.inf:
                continue
            w = _exp_numba(part_m[s, g, r] - m_all)
            l_all += w * part_l[s, g, r]
            for c in range(0, Dh, 16):
                _vstore(o, c, _vfma(_vload(o, c), _vload(part_acc[s, g], r * Dh + c), _vsplat(w)))
        inv_l = np.float32(1) / l_all
        for c in range(0, Dh, 16):
            _vstore(out, oo + c, _vscale(_vload(o, c), inv_l))


# Flash attention on CUDA cores, one kernel for decode and prefill (arxiv.org/abs/2205.14135, and
# flash-decoding's split over the keys for long contexts). A block takes one tile: up to 16 // n_rep
# consecutive rows of one sequence at consecutive positions (a tile starts at every row index that is a
# multiple of that, and wherever the sequence or position run breaks, so each block finds its tile from the
# slots and positions alone and a captured graph serves every batch of its shape), the (row, head) pairs of
# one KV head (GQA: the n_rep heads of a group read each key once), and one split of the keys (gridDim.z
# splits, sized from the cache length when positions live on the GPU). Per tile of 32 keys it stages K and V
# in shared memory; lane j scores key j for each of its warp's 4 rows, then an online softmax (running max
# m, sum l) rescales the accumulator, each lane owning head dims lane, lane + 32, ... With one split the
# block writes the output; with several it writes (acc, m, l) partials that attention_combine_kernel merges.
_ATTENTION_SRC = r"""
#define ATT_DMAX 128                    // largest head_dim supported (Llama 3: 128)
#define ATT_BK 32                       // keys per tile: one per lane when scoring
#define ATT_WARPS 4
#define ATT_RPW 4                       // query rows per warp
#define ATT_ROWS (ATT_WARPS * ATT_RPW)  // query rows per block
#define ATT_KSTRIDE (ATT_DMAX + 4)      // padded K row: the lanes' float4 reads of 8 rows hit distinct banks

// the new keys and values (T, KV, Dh): row t goes to cache row (slots[t], positions[t]), row_len floats each
extern "C" __global__ void attention_store_kernel(float* k_cache, float* v_cache, const float* k, const float* v,
                                                  const int* slots, const int* positions, int S, int row_len,
                                                  long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int t = i / row_len;
    const size_t dst = ((size_t)slots[t] * S + positions[t]) * row_len + i % row_len;
    k_cache[dst] = k[i];
    v_cache[dst] = v[i];
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_kernel(float* out, float* part_acc, float* part_m, float* part_l, const float* q,
                 const float* k_cache, const float* v_cache, const int* slots, const int* positions,
                 int T, int S, int H, int KV, int Dh, float scale) {
    __shared__ __align__(16) float q_s[ATT_ROWS][ATT_DMAX];
    __shared__ __align__(16) float k_s[ATT_BK][ATT_KSTRIDE];
    __shared__ __align__(16) float v_s[ATT_BK][ATT_DMAX];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n_rep = H / KV, g = blockIdx.y, per_tile = ATT_ROWS / n_rep;
    // this block's tile: rows t0..t0+nt-1, if a tile starts at t0 (else another block has these rows)
    const int t0 = blockIdx.x;
    const bool run_breaks = t0 == 0 || slots[t0] != slots[t0 - 1] || positions[t0] != positions[t0 - 1] + 1;
    if (!(t0 % per_tile == 0 || run_breaks)) return;
    int nt = 1;
    while (t0 + nt < T && (t0 + nt) % per_tile != 0 && slots[t0 + nt] == slots[t0] &&
           positions[t0 + nt] == positions[t0] + nt)
        nt++;
    const int n_f = nt * n_rep;  // rows f = t_local * n_rep + (h - g * n_rep)
    const size_t slot_base = (size_t)slots[t0] * S;
    const int Dh4 = (Dh + 3) & ~3;                            // Dh rounded up to whole float4s
    const int n_dims = CEIL_DIV(Dh, 32);                      // accumulator slots in use per lane

    // this split's keys: the tile's keys (up to its last row's position) in gridDim.z chunks of whole tiles
    const int keys = positions[t0 + nt - 1] + 1;
    const int chunk = CEIL_DIV(CEIL_DIV(keys, (int)gridDim.z), ATT_BK) * ATT_BK;
    const int key_lo = blockIdx.z * chunk;
    const int key_hi = min(key_lo + chunk, keys);

    // the block's query rows, zero past Dh (scores read whole float4s)
    for (int i = threadIdx.x; i < ATT_ROWS * Dh4; i += blockDim.x) {
        const int slot = i / Dh4, d = i % Dh4;
        float val = 0.0f;
        if (slot < n_f && d < Dh) val = q[((size_t)(t0 + slot / n_rep) * H + g * n_rep + slot % n_rep) * Dh + d];
        q_s[slot][d] = val;
    }

    // the running softmax of this warp's rows: slot warp + ATT_WARPS * r
    bool valid[ATT_RPW];
    int qpos[ATT_RPW];
    float m[ATT_RPW], l[ATT_RPW], acc[ATT_RPW][ATT_DMAX / 32];
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        const int f = warp + ATT_WARPS * r;
        valid[r] = f < n_f;
        qpos[r] = valid[r] ? positions[t0 + f / n_rep] : 0;
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_DMAX / 32; i++) acc[r][i] = 0.0f;
    }

    for (int k0 = key_lo; k0 < key_hi; k0 += ATT_BK) {
        __syncthreads();  // the previous tile is used up (and q_s is written, the first time)
        // keys and values k0..k0+31 of KV head g; rows past key_hi are zeros (masked below, and 0 * V must
        // not meet a NaN left in shared memory)
        const int nq = Dh4 / 4;
#pragma unroll 4
        for (int i = threadIdx.x; i < ATT_BK * nq; i += blockDim.x) {
            const int j = i / nq, d = (i % nq) * 4, key = k0 + j;
            float4 kv = {0.0f, 0.0f, 0.0f, 0.0f}, vv = kv;
            if (key < key_hi) {
                const size_t base = ((slot_base + key) * KV + g) * Dh + d;
                if ((Dh & 3) == 0) {  // 16-byte loads
                    kv = *(const float4*)(k_cache + base);
                    vv = *(const float4*)(v_cache + base);
                } else {  // Dh = 4m + 2: the last float4 of a row is half in the next row
                    kv.x = k_cache[base], kv.y = k_cache[base + 1];
                    vv.x = v_cache[base], vv.y = v_cache[base + 1];
                    if (d + 2 < Dh) kv.z = k_cache[base + 2], kv.w = k_cache[base + 3];
                    if (d + 2 < Dh) vv.z = v_cache[base + 2], vv.w = v_cache[base + 3];
                }
            }
            *(float4*)&k_s[j][d] = kv;
            *(float4*)&v_s[j][d] = vv;
        }
        __syncthreads();

        // lane j scores key k0 + j against each of the warp's rows
        float s[ATT_RPW] = {};
        for (int d = 0; d < Dh4; d += 4) {
            const float4 kv = *(const float4*)&k_s[lane][d];
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) {
                if (!valid[r]) continue;  // warp-uniform: decode fills only n_rep of the 16 rows
                const float4 qv = *(const float4*)&q_s[warp + ATT_WARPS * r][d];  // broadcast
                s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
        }
        // online softmax: new max, rescale what was summed so far, add this tile's exp(s - max)
        const int key = k0 + lane;
        float p[ATT_RPW];
#pragma unroll
        for (int r = 0; r < ATT_RPW; r++) {
            const float sc = (valid[r] && key < key_hi && key <= qpos[r]) ? s[r] * scale : NEG_INF;
            const float m_new = fmaxf(m[r], warp_max(sc));
            p[r] = 0.0f;
            if (m_new != NEG_INF) {  // else: the whole tile is masked for this row, nothing changes
                const float corr = expf(m[r] - m_new);  // 0 on the first tile (m = -inf)
                p[r] = expf(sc - m_new);
                l[r] = l[r] * corr + warp_sum(p[r]);
#pragma unroll
                for (int i = 0; i < ATT_DMAX / 32; i++) acc[r][i] *= corr;
                m[r] = m_new;
            }
        }
        // acc += p @ V: key j's probability comes from lane j
        for (int j = 0; j < ATT_BK; j++) {
            float vj[ATT_DMAX / 32];
#pragma unroll
            for (int i = 0; i < ATT_DMAX / 32; i++) vj[i] = i < n_dims ? v_s[j][lane + 32 * i] : 0.0f;
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) {
                if (!valid[r]) continue;
                const float pj = __shfl_sync(FULL_MASK, p[r], j);
#pragma unroll
                for (int i = 0; i < ATT_DMAX / 32; i++) acc[r][i] += pj * vj[i];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        if (!valid[r]) continue;
        const int f = warp + ATT_WARPS * r;
        const size_t row = (size_t)(t0 + f / n_rep) * H + g * n_rep + f % n_rep;  // (t, h) row of out
        if (gridDim.z == 1) {  // one split saw every key: normalise and write the output
            const float inv_l = 1.0f / l[r];
#pragma unroll
            for (int i = 0; i < ATT_DMAX / 32; i++)
                if (lane + 32 * i < Dh) out[row * Dh + lane + 32 * i] = acc[r][i] * inv_l;
        } else {
            const size_t prow = (size_t)blockIdx.z * T * H + row;
#pragma unroll
            for (int i = 0; i < ATT_DMAX / 32; i++)
                if (lane + 32 * i < Dh) part_acc[prow * Dh + lane + 32 * i] = acc[r][i];
            if (lane == 0) part_m[prow] = m[r], part_l[prow] = l[r];
        }
    }
}

// one block per (t, h) row, thread d: out = sum_z acc_z e^(m_z - M) / sum_z l_z e^(m_z - M), M = max_z m_z
extern "C" __global__ void attention_combine_kernel(float* out, const float* part_acc, const float* part_m,
                                                    const float* part_l, int n_splits, int rows, int Dh) {
    const int row = blockIdx.x, d = threadIdx.x;
    float M = NEG_INF;
    for (int z = 0; z < n_splits; z++) M = fmaxf(M, part_m[(size_t)z * rows + row]);
    float L = 0.0f, o = 0.0f;
    for (int z = 0; z < n_splits; z++) {
        const size_t prow = (size_t)z * rows + row;
        if (part_m[prow] == NEG_INF) continue;  // a split with no keys for this row
        const float w = expf(part_m[prow] - M);
        L += part_l[prow] * w;
        if (d < Dh) o += part_acc[prow * Dh + d] * w;
    }
    if (d < Dh) out[(size_t)row * Dh + d] = o / L;
}
"""

ATTENTION_MAX_HEAD_DIM = 128  # ATT_DMAX of _ATTENTION_SRC
_ATT_ROWS, _ATT_THREADS = 16, 128  # ATT_ROWS and ATT_WARPS * 32 of _ATTENTION_SRC


def _attention_splits(blocks: int, max_keys: int) -> int:
    """Key splits so that about 4 blocks run per SM, each split with 64 keys (2 tiles) or more."""
    target = 4 * _CUDA.multiprocessors()
    if blocks >= target:
        return 1
    return max(1, min(_ceil_div(target, blocks), _ceil_div(max_keys, 64)))


def attention_cuda(out, q, k, v, k_cache, v_cache, slots, positions):
    """q (T, H, Dh), k, v (T, KV, Dh) of the rows at (slots[t], positions[t]) (host ids, or int32 (T,) on the
    GPU); caches QWeight (n_slots, S, KV, Dh) of kind f32 -> out (T, H*Dh): row t attends to rows
    0..positions[t] of its slot"""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.kind != "f32":
            raise ValueError(f"attention: the CUDA kernel reads float32 caches, got a {cache.kind} {name}; "
                             f"use cache_type='f32' on the GPU")
    kc, vc = k_cache.data, v_cache.data
    _check_f32("attention", out=out, q=q, k=k, v=v, k_cache=kc, v_cache=vc)
    if q.ndim != 3 or k.ndim != 3 or kc.ndim != 4:
        raise ValueError(f"attention: q, k must be 3-D and caches 4-D, got {q.shape}, {k.shape}, {kc.shape}")
    T, H, Dh = q.shape
    n_slots, S, KV = kc.shape[:3]
    if k.shape != (T, KV, Dh) or v.shape != k.shape or kc.shape != (n_slots, S, KV, Dh) or vc.shape != kc.shape:
        raise ValueError(f"attention: k, v (T, KV, Dh) and caches (n_slots, S, KV, Dh) must match q {q.shape}, "
                         f"got k {k.shape}, v {v.shape}, caches {kc.shape}, {vc.shape}")
    if H % KV or H // KV > _ATT_ROWS or out.shape != (T, H * Dh):
        raise ValueError(f"attention: H = {H} must be a multiple of KV = {KV} with at most {_ATT_ROWS} query heads "
                         f"per KV head, out ({T}, {H * Dh}); got {out.shape}")
    if Dh % 2 or Dh > ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim must be even and <= {ATTENTION_MAX_HEAD_DIM}, got {Dh}")
    if Dh % 4 == 0 and (kc.data.ptr % 16 or vc.data.ptr % 16):
        raise ValueError("attention: caches must start at a 16-byte boundary (rows are read as float4)")
    on_device = isinstance(positions, cupy.ndarray)
    max_keys = S if on_device else int(np.max(positions, initial=-1)) + 1  # a graph is sized for the whole cache
    slots = _device_ids("attention", "slots", slots, T, n_slots)
    positions = _device_ids("attention", "positions", positions, T, S)
    if T == 0:
        return out
    n = T * KV * Dh
    store = _CUDA.kernel(_ATTENTION_SRC, "attention_store_kernel")
    store((_ceil_div(n, 256),), (256,), (kc, vc, k, v, slots, positions, np.int32(S), np.int32(KV * Dh), np.int64(n)))

    tiles = _ceil_div(T, _ATT_ROWS // (H // KV))  # blocks that hold a tile when the rows are one sequence
    splits = _attention_splits(tiles * KV, max_keys)
    part_acc = part_m = part_l = None
    if splits > 1:
        rows = splits * T * H
        part = _CUDA.scratch("attention", rows * (Dh + 2))
        part_acc, part_m, part_l = part[:rows * Dh], part[rows * Dh:rows * (Dh + 1)], part[rows * (Dh + 1):]
    fn = _CUDA.kernel(_ATTENTION_SRC, "attention_kernel")
    fn((T, KV, splits), (_ATT_THREADS,),
       (out, part_acc, part_m, part_l, q, kc, vc, slots, positions, np.int32(T), np.int32(S), np.int32(H),
        np.int32(KV), np.int32(Dh), np.float32(1.0 / np.sqrt(Dh))))
    if splits > 1:
        combine = _CUDA.kernel(_ATTENTION_SRC, "attention_combine_kernel")
        combine((T * H,), (_ceil_div(Dh, 32) * 32,),
                (out, part_acc, part_m, part_l, np.int32(splits), np.int32(T * H), np.int32(Dh)))
    return out


# -----------------------------------------------------------------------------
# swiglu
# The gated FFN non-linearity, arxiv.org/abs/2002.05202 eq (5): silu(x W1) * (x W3).


def swiglu_ref(out, h1, h3):
    """h1, h3 (T, F) -> out (T, F) = silu(h1) * h3"""
    with np.errstate(over="ignore"):  # exp(-h1) may overflow to inf for very negative h1: silu -> -0, as intended
        out[:] = h1 / (1.0 + np.exp(-h1)) * h3
    return out


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def swiglu_numba(out, h1, h3):
    """h1, h3 (T, F) -> out (T, F) = silu(h1) * h3; one thread. Rows go through a buffer because out may
    be h1 itself (in place), and LLVM's overlap check would then fall back to scalar code."""
    T, F = h1.shape
    row = np.empty(F, np.float32)
    for t in range(T):
        for i in range(F):
            row[i] = h1[t, i] / (np.float32(1) + _exp_numba(-h1[t, i])) * h3[t, i]
        out[t] = row


# one thread per element; out may be h1 (forward computes hb = silu(hb) * hb2 in place), so no __restrict__
_SWIGLU_SRC = r"""
extern "C" __global__ void swiglu_kernel(float* out, const float* h1, const float* h3, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = h1[i] / (1.0f + expf(-h1[i])) * h3[i];  // expf overflow -> inf -> silu = -0
}
"""


def swiglu_cuda(out, h1, h3):
    """h1, h3 (T, F) -> out (T, F) = silu(h1) * h3 (out may be h1)"""
    _check_f32("swiglu", out=out, h1=h1, h3=h3)
    if h1.shape != h3.shape or out.shape != h1.shape:
        raise ValueError(f"swiglu: out, h1, h3 must have one shape, got {out.shape}, {h1.shape}, {h3.shape}")
    n = h1.size
    if n:
        fn = _CUDA.kernel(_SWIGLU_SRC, "swiglu_kernel")
        fn((_ceil_div(n, 256),), (256,), (out, h1, h3, np.int64(n)))
    return out


def add_ref(x, y):
    """In place: x (T, D) += y (T, D), the residual connection"""
    x += y
    return x


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def add_numba(x, y):
    """In place: x (T, D) += y (T, D)"""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] += y[t, i]


# one thread per element
_ADD_SRC = r"""
extern "C" __global__ void add_kernel(float* x, const float* y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
"""


def add_cuda(x, y):
    """In place: x (T, D) += y (T, D), the residual connection"""
    _check_f32("add", x=x, y=y)
    if x.shape != y.shape:
        raise ValueError(f"add: x and y must have one shape, got {x.shape} and {y.shape}")
    n = x.size
    if n:
        fn = _CUDA.kernel(_ADD_SRC, "add_kernel")
        fn((_ceil_div(n, 256),), (256,), (x, y, np.int64(n)))
    return x


# -----------------------------------------------------------------------------
# Sampling on the GPU
# The next token chosen where the logits are, so that only its id crosses to the host.

# one block of 1024 threads: each thread scans a stride of the logits, then warps and shared memory reduce
# (value, index) pairs; ties go to the lower index, like np.argmax
_SAMPLE_SRC = r"""
__device__ __forceinline__ void better_of(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) v = v2, i = i2;
}

extern "C" __global__ void sample_argmax_kernel(int* out, const float* logits, int n) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    float v = NEG_INF;
    int i = n;  // "none yet": any real index beats it on a tie
    for (int j = threadIdx.x; j < n; j += blockDim.x) better_of(v, i, logits[j], j);
    for (int o = 16; o > 0; o >>= 1)
        better_of(v, i, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, i, o));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) best_v[warp] = v, best_i[warp] = i;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? best_v[lane] : NEG_INF;
        i = lane < blockDim.x / 32 ? best_i[lane] : n;
        for (int o = 16; o > 0; o >>= 1)
            better_of(v, i, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, i, o));
        if (lane == 0) out[0] = i < n ? i : 0;  // all NaN: 0
    }
}
"""


def sample_argmax_cuda(logits) -> int:
    """The index of the largest of logits (V,) on the GPU (NaNs are skipped)"""
    _check_f32("sample_argmax", logits=logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sample_argmax: logits must be (V,) with V > 0, got {logits.shape}")
    result = _CUDA.scratch("sample", 1, np.int32)
    fn = _CUDA.kernel(_SAMPLE_SRC, "sample_argmax_kernel")
    fn((1,), (1024,), (result, logits, np.int32(logits.size)))
    return int(result.get()[0])


def sample_cuda(logits, temperature: float, top_p: float, coin: float) -> int:
    """The next token from logits (V,) on the GPU; only the id comes back to the host.

    Greedy when temperature == 0, else softmax(logits / temperature) sampled with coin (uniform in [0, 1),
    drawn by the host sampler's generator), restricted to the top-p nucleus when top_p < 1: the same
    steps as llama31's sample_topp/sample_mult on the host (in float64, so the same coin gives the same
    token up to rounding). Repetition penalty, top-k and min-p are not done here.
    """
    if temperature == 0.0:
        return sample_argmax_cuda(logits)
    _check_f32("sample", logits=logits)
    if logits.ndim != 1:
        raise ValueError(f"sample: logits must be (V,), got {logits.shape}")
    z = logits.astype(np.float64) / temperature
    probs = cupy.exp(z - z.max())
    probs /= probs.sum()
    if top_p >= 1.0:
        return min(int(cupy.searchsorted(cupy.cumsum(probs), cupy.asarray([coin]), side="right")[0]), probs.size - 1)
    order = cupy.argsort(-probs)  # cupy's sort is stable (radix sort): ties keep index order, as on the host
    cumulative = cupy.cumsum(probs[order])
    last = cupy.minimum(cupy.searchsorted(cumulative, cupy.asarray([top_p])), probs.size - 1)  # nucleus end
    # the first sorted index whose cumulative probability passes coin * (mass of the nucleus)
    chosen = cupy.minimum(cupy.searchsorted(cumulative, coin * cumulative[last], side="right"), last)
    return int(order[chosen][0])


# -----------------------------------------------------------------------------
# CUDA graph of a decode step
# Launching ~15 kernels per layer costs more host time than an 8B decode step takes on an H100; a captured
# graph replays them with one launch.


class CudaGraphStep:
    """One decode step of T rows captured once as a CUDA graph and replayed at every position.

    fn(tokens, positions, slots) must do the whole step with device work only, reading the rows' tokens,
    positions and slots from the three int32 (T,) cupy arrays it is given (the kernels that take per-row ids
    accept such arrays): no host copies, no allocations, no synchronisation; e.g.
    lambda tokens, positions, slots: forward(model, state, tokens, positions, slots, slice(0, 1)).
    The first call runs fn eagerly (that compiles kernels, allocates scratch and computes the step), then
    captures it; later calls copy the new ids in and replay the graph. The graph keeps the addresses of
    every buffer fn touched (weights, run state), so make one per run state and row count.
    """

    def __init__(self, fn, T: int = 1):
        _require_cupy("CudaGraphStep")
        self.fn = fn
        self.args = cupy.zeros((3, T), dtype=np.int32)  # tokens, positions, slots, read by the captured kernels
        self.stream = cupy.cuda.Stream(non_blocking=True)  # capture needs a stream other than the default
        self.graph = None
        self.result = None

    def __call__(self, tokens, positions, slots):
        """Run the step for the rows (T,) of tokens at (slots, positions); returns what fn returned (device
        arrays that each replay overwrites)."""
        caller = cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())  # after earlier work, e.g. the prefill that filled the cache
        with self.stream:
            self.args.set(np.array([tokens, positions, slots], dtype=np.int32), stream=self.stream)
            if self.graph is None:
                self.result = self.fn(self.args[0], self.args[1], self.args[2])
                self.stream.begin_capture()
                try:
                    self.fn(self.args[0], self.args[1], self.args[2])
                finally:
                    graph = self.stream.end_capture()
                self.graph = graph
            else:
                self.graph.launch(self.stream)
        caller.wait_event(self.stream.record())  # later work on the caller's stream sees the results
        return self.result


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


def zeros_aligned(shape, dtype=np.float32) -> np.ndarray:
    """Zeros in fresh anonymous memory: page-aligned, where numpy aligns to 16 and a 64-byte vector load from
    its buffers straddles two cache lines 3 times in 4 (measured: SmolLM2 decode 10% faster aligned); and in
    4 KB pages, where numpy asks Linux for transparent huge pages on large arrays, whose first touch here
    stalled on compaction (SmolLM2's first forward after load: 145-313 ms, 29 ms without huge pages)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype, int(np.prod(shape))).reshape(shape)


# numba's "omp" threading layer (libgomp) keeps a team of threads per thread that calls a parallel kernel; once
# the teams outnumber the cores, its workers sleep between parallel regions instead of spinning, and a second
# calling thread (a server's scheduler, after load() ran the kernels on the main thread) decoded SmolLM2 at
# 26.5 ms a token instead of 6.0 (measured). So every numba kernel runs on this one thread.
_KERNEL_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama31-kernels")


def on_kernel_thread(fn, *args):
    """fn(*args) run on the numba kernels' one thread: its result, or its exception raised here."""
    return _KERNEL_THREAD.submit(fn, *args).result()


def _on_this_thread(fn, *args):
    return fn(*args)


def ops_for(backend: str) -> types.SimpleNamespace:
    """The op functions of one backend by op name, plus `xp` (the array module of its buffers), `zeros`, and
    `run(fn, *args)`, which calls fn where this backend's kernels must run."""
    suffix = BACKENDS[backend]
    xp, zeros = (cupy, cupy.zeros) if backend == "cupy" else (np, zeros_aligned)
    run = on_kernel_thread if backend == "numba" else _on_this_thread
    return types.SimpleNamespace(xp=xp, zeros=zeros, run=run, **{op: globals()[op + suffix] for op in OPS})


def set_threads(n: int):
    """Threads for the numba kernels (by default numba uses every core)."""
    if numba is None:
        raise RuntimeError("--threads needs numba: pip install numba")
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS} on this machine, got {n}")
    numba.set_num_threads(n)  # numba's setting is per calling thread: here and on the kernel thread
    on_kernel_thread(numba.set_num_threads, n)


if numba is not None:
    from numba.core import event as numba_event

    class _CompileListener(numba_event.Listener):
        """Adds the seconds of each compile to seconds[kernel name]; what a kernel calls (other kernels,
        numba's own helpers) compiles inside that compile and counts in its time."""

        def __init__(self, seconds: dict, on_first):
            self.seconds, self.on_first, self.starts = seconds, on_first, []

        def on_start(self, event):
            if self.on_first is not None:
                self.on_first()
                self.on_first = None
            self.starts.append(time.perf_counter())

        def on_end(self, event):
            start = self.starts.pop()
            if not self.starts:
                name = event.data["dispatcher"].py_func.__name__
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def numba_compiles(on_first=None):
    """Within the block, the numba kernels that compile (loading one from numba's disk cache is no compile):
    yields a dict kernel name -> seconds, filled as compiles end; on_first() runs as the first one begins."""
    seconds = {}
    if numba is None:
        yield seconds
        return
    with numba_event.install_listener("numba:compile", _CompileListener(seconds, on_first)):
        yield seconds


# -----------------------------------------------------------------------------
# Self-check
# `python kernels.py`: every op of every backend here once against its reference at SmolLM2-135M's sizes, a
# line each with the max difference, pass/fail, the time of a call and, for the ops that stream memory,
# the bandwidth that time means (bytes that must be read / time). The assertions live in tests/.


def _check_calls(rng, backend):
    """(label, op, arguments, bytes the op must read or 0) at SmolLM2-135M's sizes, decode (T 1) and prefill."""
    D, H, KV, Dh, F, S, V = 576, 9, 3, 64, 1536, 1024, 4096
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    cos, sin = f32(S, Dh // 2), f32(S, Dh // 2)
    cache_types = ("f32",) if backend == "cupy" else ("f32", "f16", "q8_0")
    calls = []
    for T in (1, 37):
        positions, slots = np.arange(S - T - 100, S - 100), np.ones(T, np.int64)
        for kind in KINDS:
            w = quantize(f32(F, D), kind)
            weight_bytes = w.data.nbytes + (0 if w.scales is None else w.scales.nbytes)
            calls.append((f"matmul {kind} T={T}", "matmul", dict(out=f32(T, F), x=f32(T, D), w=w), weight_bytes))
            calls.append((f"embed {kind} T={T}", "embed", dict(out=f32(T, D), w=quantize(f32(V, D), kind),
                                                                tokens=rng.integers(0, V, T)), 0))
        calls += [
            (f"rmsnorm T={T}", "rmsnorm", dict(out=f32(T, D), x=f32(T, D), weight=f32(D), eps=1e-5), 0),
            (f"rope T={T}", "rope", dict(x=f32(T, H, Dh), positions=positions, cos=cos, sin=sin), 0),
            (f"swiglu T={T}", "swiglu", dict(out=f32(T, F), h1=f32(T, F), h3=f32(T, F)), 0),
            (f"add T={T}", "add", dict(x=f32(T, D), y=f32(T, D)), 0),
        ]
        for cache_type in cache_types:
            k_cache, v_cache = (quantize(f32(2, S, KV, Dh), cache_type) for _ in range(2))
            cache_bytes = 2 * sum(a.nbytes for a in k_cache if a is not None) * positions[-1] // (2 * S)
            calls.append((f"attention {cache_type} cache T={T} over {positions[-1] + 1} keys", "attention",
                          dict(out=f32(T, H * Dh), q=f32(T, H, Dh), k=f32(T, KV, Dh), v=f32(T, KV, Dh),
                               k_cache=k_cache, v_cache=v_cache, slots=slots, positions=positions), cache_bytes))
    return calls


def _check_one(backend, op, args, repeats=20):
    """(max |out - ref|, passed, seconds per call) of one op call on `backend` against <op>_ref."""
    xp = cupy if backend == "cupy" else np

    def copy(a):  # float arrays and weights afresh on the backend's device; token ids and sizes as they are
        if isinstance(a, QWeight):
            return QWeight(xp.array(a.data), None if a.scales is None else xp.array(a.scales))
        return xp.array(a) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a

    written = "out" if "out" in args else "x"  # rope and add work in place
    ref_args = {name: QWeight(*(None if b is None else b.copy() for b in a)) if isinstance(a, QWeight)
                else a.copy() if isinstance(a, np.ndarray) else a for name, a in args.items()}
    if op == "matmul" and backend == "numba" and args["w"].kind in QUANTIZED:
        ref_args["x"] = quantize_activations_ref(args["x"])  # what the int8 matmul computes with
    globals()[op + "_ref"](**ref_args)
    ref = ref_args[written]
    fn = globals()[op + BACKENDS[backend]]
    dev = {name: copy(a) for name, a in args.items()}
    fn(**dev)
    got = dev[written].get() if backend == "cupy" else dev[written].copy()  # before the timed calls rewrite it
    atol, rtol = TOLERANCE[op]
    passed = bool(np.all(np.abs(got - ref) <= atol + rtol * np.abs(ref)))
    start = time.perf_counter()
    for _ in range(repeats):
        fn(**dev)
    if backend == "cupy":
        cupy.cuda.Device().synchronize()
    return float(np.max(np.abs(got - ref))), passed, (time.perf_counter() - start) / repeats


def main() -> int:
    rng = np.random.default_rng(0)
    failed = 0
    for backend in available_backends()[1:]:  # numba, cupy: each against the numpy reference
        for label, op, args, nbytes in _check_calls(rng, backend):
            diff, passed, seconds = _check_one(backend, op, args)
            failed += not passed
            speed = f"  {nbytes / seconds / 1e9:6.1f} GB/s" if nbytes else ""
            print(f"{backend:5s}  {label:36s}  max|diff| {diff:8.2e}  {'pass' if passed else 'FAIL'}  "
                  f"{seconds * 1e6:8.1f} us{speed}")
    if len(available_backends()) == 1:
        print("kernels: only the numpy reference is available here (pip install numba)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
