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

# Numba kernels compile on first use and are cached in __pycache__ beside this file (cache=True). Their
# fast-math flags leave out "no NaNs/infs": softmax and silu meet exp overflow, and NaN must propagate.
NUMBA_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _njit(**options):
    """numba.njit(**options) with numpy's error model (x / 0 is inf or NaN, as in the references; Python's
    model checks every division, which stops LLVM vectorising loops that divide). Without numba, a
    stand-in whose functions raise with the install hint."""
    if numba is not None:
        return numba.njit(error_model="numpy", **options)

    def missing(fn):
        def raise_missing(*args, **kwargs):
            raise RuntimeError(f"kernels.{fn.__name__} needs numba, which is not installed: "
                               "pip install numba")
        return raise_missing
    return missing

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
# int64 and LLVM's auto-vectoriser reduces every 32-weight group horizontally; with these the q8_0 matvec
# is one pmaddwd + one fma per 32 weights (measured 28.7 vs 5.5 Gweights/s on one core). Conventions:
# arrays are C-contiguous and indexed flat (a.flat[i]); f16 bits travel as int16 and bf16 bits as uint16
# (numba has no float16), so the element type says how to decode a value.

if numba is not None:
    from llvmlite import ir
    from numba.core import types as nbt
    from numba.core.extending import intrinsic, models, register_model

    class _Vec(nbt.Type):
        """A value of `lanes` float32 or int16 lanes that stays in vector registers across loop turns."""

        def __init__(self, elt: str, lanes: int):
            self.elt, self.lanes = elt, lanes
            super().__init__(name=f"vec_{elt}x{lanes}")

    @register_model(_Vec)
    class _VecModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            elt = ir.FloatType() if fe_type.elt == "f32" else ir.IntType(16)
            super().__init__(dmm, fe_type, ir.VectorType(elt, fe_type.lanes))

    _F32X16 = _Vec("f32", 16)  # one vector of floats
    _I16X32 = _Vec("i16", 32)  # 32 small integers, the operands of pmaddwd
    _TILE = _Vec("f32", 64)  # 4 tokens x 16 lanes of accumulators (the prefill matmul tile)
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

    def _ir_hsum(builder, v):
        """Sum of the lanes of a float vector, folding halves: 16 -> 8 -> 4 -> 2 -> 1."""
        n = v.type.count
        while n > 1:
            n //= 2
            v = builder.fadd(builder.shuffle_vector(v, v, _ir_consts(_I32, range(n))),
                             builder.shuffle_vector(v, v, _ir_consts(_I32, range(n, 2 * n))))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    @intrinsic
    def _vzero(typingctx):
        """np.zeros(16, np.float32)"""
        def codegen(context, builder, sig, args):
            return ir.Constant(ir.VectorType(_F32, 16), [0.0] * 16)
        return _F32X16(), codegen

    @intrinsic
    def _vsum(typingctx, v):
        """v.sum(), folding halves: 16 -> 8 -> 4 -> 2 -> 1"""
        def codegen(context, builder, sig, args):
            return _ir_hsum(builder, args[0])
        return nbt.float32(_F32X16), codegen

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
        """a.flat[i:i+16] = v for a float32 array a"""
        if a.dtype != nbt.float32 or a.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            a, i, v = args
            data = context.make_array(sig.args[0])(context, builder, a).data
            builder.store(v, builder.bitcast(builder.gep(data, [i]), v.type.as_pointer()), align=4)
            return context.get_dummy_value()
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
    def _vload_i16(typingctx, a, i):
        """a.flat[i:i+32] as 32 int16: int8 (q8_0 weights, int8 activations), or for q4_0 packed bytes (uint8)
        the integers nibble - 8 of elements i..i+31 of the unpacked row (i % 32 == 0)."""
        if a.dtype not in (nbt.int8, nbt.uint8) or a.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            a, i = args
            i16x32 = ir.VectorType(_I16, 32)
            if a_dtype == nbt.int8:
                q = _ir_load(context, builder, sig.args[0], a, i, ir.VectorType(_I8, 32), 1)
                return builder.sext(q, i16x32)
            packed = _ir_load(context, builder, sig.args[0], a, builder.ashr(i, ir.Constant(i.type, 1)),
                              ir.VectorType(_I8, 16), 1)
            low = _ir_q4(builder, packed, _ir_const(packed.type, 0))  # elements 0..15
            high = _ir_q4(builder, packed, _ir_const(packed.type, 4))  # elements 16..31
            return builder.sext(builder.shuffle_vector(low, high, _ir_consts(_I32, range(32))), i16x32)
        a_dtype = a.dtype
        return _I16X32(a, nbt.intp), codegen

    @intrinsic
    def _vdot_i16(typingctx, acc, a, b, d):
        """acc + d * (a * b).reshape(16, 2).sum(1) in int32 then float32: x86's pmaddwd, then one fma"""
        def codegen(context, builder, sig, args):
            acc, a, b, d = args
            i32x32 = ir.VectorType(_I32, 32)
            p = builder.mul(builder.sext(a, i32x32), builder.sext(b, i32x32))
            pairs = builder.add(builder.shuffle_vector(p, p, _ir_consts(_I32, range(0, 32, 2))),
                                builder.shuffle_vector(p, p, _ir_consts(_I32, range(1, 32, 2))))
            scaled = builder.fmul(builder.sitofp(pairs, ir.VectorType(_F32, 16)), _ir_splat(builder, d, 16),
                                  flags=("fast",))
            return builder.fadd(acc, scaled, flags=("fast",))
        return _F32X16(_F32X16, _I16X32, _I16X32, nbt.float32), codegen

    @intrinsic
    def _tile_zero(typingctx):
        """Accumulators of a 4-token tile: np.zeros((4, 16), np.float32)"""
        def codegen(context, builder, sig, args):
            return ir.Constant(ir.VectorType(_F32, 64), [0.0] * 64)
        return _TILE(), codegen

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


# -----------------------------------------------------------------------------
# matmul
# The weight-streaming product that dominates decode time: every weight byte is read once per token.


def matmul_ref(out, x, w):
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T, W dequantized to float32 first"""
    out[:] = x @ dequantize(w).T
    return out


Q_BLOCK = 32  # numba kernels: the weight group size they take (ggml's block), and the int8 activation block


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def _quantize_activations_numba(x):
    """x (T, K) -> (xq (T, K) int8, xd (T, K//32) float32) with x ~ xq * xd per block of 32: ggml's
    quantize_row_q8_0 (d = amax / 127, round half away from zero), the scale kept in float32."""
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // Q_BLOCK), np.float32)
    for t in range(T):
        for b in range(K // Q_BLOCK):
            amax = np.float32(0)
            for i in range(b * Q_BLOCK, (b + 1) * Q_BLOCK):
                amax = max(amax, abs(x[t, i]))
            d = amax / np.float32(127)
            inv_d = np.float32(1) / d if d != 0 else np.float32(0)  # all-zero block: q = 0
            xd[t, b] = d
            for i in range(b * Q_BLOCK, (b + 1) * Q_BLOCK):
                v = x[t, i] * inv_d
                xq[t, i] = np.int8(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)))
    return xq, xd


@_njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _matvec_int8_numba(out, x, data, scales):
    """q8_0/q4_0 W (N, K) -> out (T, N) = x @ W.T with x quantized to int8 blocks, llama.cpp's decode dot:
    per 32 weights one int16 multiply-add of pairs and one fma by scale_w * scale_x. Threads take blocks
    of 16 row pairs; a pair is rows n and n + N/2, two memory streams, which keeps more reads in flight
    than one (measured 10-17% faster). Each weight byte is read once."""
    T, K = x.shape
    N, n_groups = scales.shape
    half = (N + 1) // 2
    xq, xd = _quantize_activations_numba(x)
    for blk in numba.prange((half + 15) // 16):
        for n in range(blk * 16, min(half, blk * 16 + 16)):
            m = min(n + half, N - 1)  # odd N: the last pair computes row N - 1 twice
            for t in range(T):
                acc_n, acc_m = _vzero(), _vzero()
                for g in range(n_groups):
                    xg = _vload_i16(xq, t * K + g * Q_BLOCK)
                    d_n = _scalar(scales, n * n_groups + g) * xd[t, g]
                    d_m = _scalar(scales, m * n_groups + g) * xd[t, g]
                    acc_n = _vdot_i16(acc_n, _vload_i16(data, n * K + g * Q_BLOCK), xg, d_n)
                    acc_m = _vdot_i16(acc_m, _vload_i16(data, m * K + g * Q_BLOCK), xg, d_m)
                out[t, n] = _vsum(acc_n)
                out[t, m] = _vsum(acc_m)


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


@_njit(cache=True)
def _padded_copy_numba(x, T, K):
    """x in a zeroed (T, K) float32 array: whole tiles and vectors, 64-byte aligned (numba's allocator)"""
    padded = np.zeros((T, K), np.float32)
    padded[:x.shape[0], :x.shape[1]] = x
    return padded


@_njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _matmul_tiles_numba(out, x, data, scales):
    """Any kind W (N, K) -> out (T, N) = x @ W.T for prefill (and float-kind decode): threads take blocks of
    16 rows, dequantize them to float32 once, then run 4-token x 2-row tiles of float32 fmas over them,
    so each loaded vector feeds 4 or 2 fmas. x is copied, zero-padded to whole tiles and vectors."""
    T, K = x.shape
    N = out.shape[1]
    Kp = (K + 15) // 16 * 16  # row length in whole vectors
    xs = _padded_copy_numba(x, (T + 3) // 4 * 4, Kp)
    for blk in numba.prange((N + 15) // 16):
        n0, rows = blk * 16, min(16, N - blk * 16)
        wf = np.zeros((16, Kp), np.float32)  # rows past N stay zero
        for r in range(rows):
            _dequantize_row_numba(wf[r], data, scales, n0 + r, K)
        for t0 in range(0, T, 4):
            for r in range(0, rows, 2):
                acc0, acc1 = _tile_zero(), _tile_zero()
                for k in range(0, Kp, 16):
                    acc0 = _tile_fma(acc0, _vload(wf, r * Kp + k), xs, t0 * Kp + k, Kp)
                    acc1 = _tile_fma(acc1, _vload(wf, (r + 1) * Kp + k), xs, t0 * Kp + k, Kp)
                sums0, sums1 = _tile_sums(acc0), _tile_sums(acc1)
                for j in range(min(4, T - t0)):
                    out[t0 + j, n0 + r] = sums0[j]
                    if r + 1 < rows:
                        out[t0 + j, n0 + r + 1] = sums1[j]


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
    """x (T, K), W (N, K) -> out (T, N) = x @ W.T. Decode (T = 1) of q8_0/q4_0 rounds x to int8 blocks, as
    llama.cpp does (compare against matmul_ref on the same int8 activations); all else is float32."""
    data, scales = _numba_arrays("matmul", w, x.shape[1])
    if scales is not None and x.shape[0] == 1:
        _matvec_int8_numba(out, x, data, scales)
    else:
        _matmul_tiles_numba(out, x, data, scales)


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


@_njit(fastmath=NUMBA_FASTMATH, cache=True)
def rope_numba(x, pos, cos, sin):
    """In place: x (T, n_heads, Dh) at positions pos..pos+T-1; cos, sin (S, Dh//2); one thread"""
    T, n_heads, Dh = x.shape
    if pos < 0 or pos + T > cos.shape[0]:
        raise ValueError("rope_numba: positions pos..pos+T-1 are outside the cos/sin tables")
    for t in range(T):
        for h in range(n_heads):
            for i in range(Dh // 2):
                c, s = cos[pos + t, i], sin[pos + t, i]
                x0, x1 = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = x0 * c - x1 * s
                x[t, h, 2 * i + 1] = x0 * s + x1 * c


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


ATTENTION_BLOCK = 32  # numba attention: keys per step of the online softmax


def attention_numba(out, q, k, v, k_cache, v_cache, pos):
    """q (T, H, Dh), k, v (T, KV, Dh) at positions pos..pos+T-1; caches (S, KV, Dh) -> out (T, H*Dh)"""
    if pos < 0 or pos + q.shape[0] > k_cache.shape[0]:
        raise ValueError(f"attention_numba: positions {pos}..{pos + q.shape[0] - 1} are outside the cache "
                         f"of {k_cache.shape[0]}")
    if q.shape[2] % 16:  # the kernel works in whole 16-float vectors; Llama heads are 64 or 128 wide
        attention_ref(out, q, k, v, k_cache, v_cache, pos)
    else:
        _attention_numba(out, q, k, v, k_cache, v_cache, pos)


@_njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _attention_numba(out, q, k, v, k_cache, v_cache, pos):
    """attention_numba for Dh % 16 == 0. Threads take (token, head) pairs; each streams its keys and values
    once, 32 keys a step: their scores, then the running output is rescaled by exp(old max - new max) and the
    step's exp-weighted values added (online softmax, arxiv.org/abs/1805.02867). Keys and values go four at
    a time, so that four fma chains overlap; past the step's last key the values loop repeats it, weight 0."""
    T, H, Dh = q.shape
    KV = k.shape[1]
    k_cache[pos:pos + T] = k
    v_cache[pos:pos + T] = v
    n_rep, row = H // KV, KV * Dh  # query heads per key/value head; floats per cache position
    scale = np.float32(1) / np.sqrt(np.float32(Dh))
    for th in numba.prange(T * H):
        t, h = th // H, th % H
        qo = (t * H + h) * Dh  # flat offset of this head's query in q and of its output in out
        kvo = (h // n_rep) * Dh  # GQA: offset of the key/value head it reads, within a cache row
        e = np.empty(ATTENTION_BLOCK, np.float32)  # a step's scores, then exp(score - max)
        m, l = np.float32(-np.inf), np.float32(0)  # running max, running sum of exp(score - m)
        for c in range(0, Dh, 16):
            _vstore(out, qo + c, _vzero())
        for p0 in range(0, pos + t + 1, ATTENTION_BLOCK):  # causal: keys 0..pos+t
            n = min(ATTENTION_BLOCK, pos + t + 1 - p0)
            for j in range(0, n - 3, 4):  # scores of four keys at a time: four fma chains, one folded sum
                acc = _tile_zero()
                for c in range(0, Dh, 16):
                    acc = _tile_fma(acc, _vload(q, qo + c), k_cache, (p0 + j) * row + kvo + c, row)
                s = _tile_sums(acc)
                e[j], e[j + 1], e[j + 2], e[j + 3] = s[0] * scale, s[1] * scale, s[2] * scale, s[3] * scale
            for j in range(n - n % 4, n):
                acc1 = _vzero()
                for c in range(0, Dh, 16):
                    acc1 = _vfma(acc1, _vload(q, qo + c), _vload(k_cache, (p0 + j) * row + kvo + c))
                e[j] = _vsum(acc1) * scale
            m_new = m
            for j in range(n):
                m_new = max(m_new, e[j])
            rescale = _exp_numba(m - m_new)
            for j in range(ATTENTION_BLOCK):  # the whole step, so that LLVM vectorises the exps
                e[j] = _exp_numba(e[j] - m_new) if j < n else np.float32(0)
            l *= rescale
            for j in range(n):
                l += e[j]
            m = m_new
            for c in range(0, Dh, 16):
                o0, o1, o2, o3 = _vscale(_vload(out, qo + c), rescale), _vzero(), _vzero(), _vzero()
                for j in range(0, n, 4):
                    v0 = (p0 + j) * row + kvo + c  # values of keys j..j+3 (the last key again past n)
                    v1, v2, v3 = (v0 + min(1, n - 1 - j) * row, v0 + min(2, n - 1 - j) * row,
                                  v0 + min(3, n - 1 - j) * row)
                    o0 = _vfma(o0, _vload(v_cache, v0), _vsplat(e[j]))
                    o1 = _vfma(o1, _vload(v_cache, v1), _vsplat(e[j + 1]))
                    o2 = _vfma(o2, _vload(v_cache, v2), _vsplat(e[j + 2]))
                    o3 = _vfma(o3, _vload(v_cache, v3), _vsplat(e[j + 3]))
                _vstore(out, qo + c, _vadd(_vadd(o0, o1), _vadd(o2, o3)))
        inv_l = np.float32(1) / l
        for c in range(0, Dh, 16):
            _vstore(out, qo + c, _vscale(_vload(out, qo + c), inv_l))


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


def zeros_aligned(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """np.zeros whose data starts at a multiple of `align` bytes. numpy aligns to 16, so a 64-byte vector
    load from its buffers straddles two cache lines 3 times in 4; the numba kernels' activation buffers
    and KV cache should come from here (measured: SmolLM2 decode 10% faster)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def ops_for(backend: str) -> types.SimpleNamespace:
    """The op functions of one backend by op name, plus `xp` (the array module of its buffers) and `zeros`."""
    suffix = BACKENDS[backend]
    xp, zeros = (cupy, cupy.zeros) if backend == "cupy" else (np, zeros_aligned)
    return types.SimpleNamespace(xp=xp, zeros=zeros, **{op: globals()[op + suffix] for op in OPS})


def set_threads(n: int):
    """Threads for the numba kernels (by default numba uses every core)."""
    if numba is None:
        raise RuntimeError("--threads needs numba: pip install numba")
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS} on this machine, got {n}")
    numba.set_num_threads(n)
