"""The CUDA backend: every CUDA source compiles with nvcc for sm_90 (no GPU needed, CI runs it), the
launchers refuse host arrays with a clear error, and, where cupy and a GPU are present (tests marked
`cuda`), each <op>_cuda matches its numpy <op>_ref on fresh random inputs with sizes that do not divide
the kernels' tiles and outputs poisoned with NaN, the full model matches the numpy backend, and a
replayed CUDA graph matches eager launches.
"""

import inspect
import re
import shutil
import subprocess

import numpy as np
import pytest

import kernels
from kernels import QWeight

HAS_GPU = "cupy" in kernels.available_backends()
if HAS_GPU:
    import cupy

def on_gpu(test):
    """Mark a test `cuda` and skip it, saying why, where cupy or a GPU is absent."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_GPU, reason="needs cupy and an NVIDIA GPU")(test))


KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def cuda_sources() -> dict:
    return {name: src for name, src in vars(kernels).items() if re.fullmatch(r"_[A-Z0-9_]+_SRC", name)}


# -----------------------------------------------------------------------------
# Without a GPU


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    sources = cuda_sources()
    assert {"_RMSNORM_SRC", "_MATMUL_SRC", "_EMBED_SRC", "_ROPE_SRC", "_ATTENTION_SRC", "_SWIGLU_SRC",
            "_ADD_SRC", "_SAMPLE_SRC"} <= set(sources)
    for name, src in sources.items():
        cu = tmp_path / f"{name}.cu"
        cu.write_text(kernels._CUDA_PREAMBLE + src)
        result = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(tmp_path / f"{name}.cubin"),
                                 str(cu)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name} does not compile with nvcc:\n{result.stderr}"


def test_cuda_sources_compile_with_nvrtc():
    """The run-time compiler CuPy uses (NVRTC, no implicit CUDA headers) accepts every source too."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    program = getattr(compiler, "_NVRTCProgram", None)  # CuPy's own NVRTC wrapper: private, so skip if moved
    if program is None:
        pytest.skip("this CuPy has no cupy.cuda.compiler._NVRTCProgram")
    for name, src in cuda_sources().items():
        try:
            prog = program(kernels._CUDA_PREAMBLE + src, f"{name}.cu")
        except Exception as e:  # noqa: BLE001 (libnvrtc missing: CuPy raises its loader's own error types)
            pytest.skip(f"NVRTC cannot be loaded here: {type(e).__name__}")
        prog.compile(("-std=c++17", "-arch=compute_90"))  # raises CompileException with the log on error


def test_every_kernel_a_launcher_names_is_defined():
    """Each "<name>_kernel" string in the launchers is an extern "C" function of the sources."""
    defined = set()
    for src in cuda_sources().values():
        defined |= set(re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+_kernel)', src))
        defined |= {f"matmul_{kind}_kernel" for kind in KINDS if f"MATVEC_KERNEL(matmul_{kind}_kernel" in src}
    launchers = inspect.getsource(kernels)
    named = set(re.findall(r'"(\w+_kernel)"', launchers)) | {f"matmul_{kind}_kernel" for kind in KINDS}
    assert named <= defined, f"launchers name kernels that no source defines: {sorted(named - defined)}"


def test_cuda_backend_has_every_op():
    for op in kernels.OPS:
        assert callable(getattr(kernels, f"{op}_cuda", None)), f"{op}_cuda is missing"


def test_cuda_launchers_reject_host_arrays():
    x = np.zeros((1, 32), np.float32)
    with pytest.raises((ValueError, RuntimeError), match="rmsnorm"):
        kernels.rmsnorm_cuda(x.copy(), x, np.ones(32, np.float32), 1e-5)
    with pytest.raises((ValueError, RuntimeError), match="matmul"):
        kernels.matmul_cuda(np.zeros((1, 4), np.float32), x, kernels.quantize(np.ones((4, 32)), "q8_0"))


# -----------------------------------------------------------------------------
# On the GPU: each launcher against its numpy reference


def to_gpu(w: QWeight) -> QWeight:
    return QWeight(cupy.asarray(w.data), None if w.scales is None else cupy.asarray(w.scales))


def poisoned(shape):
    return cupy.full(shape, np.nan, dtype=np.float32)


def print_max_error(label, got, ref, atol, rtol):
    """Print the largest |got - ref| and how much of the tolerance atol + rtol * |ref| it uses: a passing
    test's margin, which tests/gpu_check.py reads from the captured output (as it reads the seed)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return  # the assertion that follows says so
    err = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    used = np.divide(err, bound, out=np.where(err > 0, np.inf, 0.0), where=bound > 0)
    print(f"max error {label}: {err.max(initial=0.0):.2e} abs, {used.max(initial=0.0):.2g} of tolerance")


def assert_close(op, got, ref, scale=1.0):
    atol, rtol = kernels.TOLERANCE[op]
    got = cupy.asnumpy(got) if HAS_GPU and isinstance(got, cupy.ndarray) else got
    print_max_error(op, got, ref, atol * scale, rtol * scale)
    assert np.isfinite(got).all(), f"{op}: unwritten (NaN) or non-finite outputs"
    np.testing.assert_allclose(got, ref, atol=atol * scale, rtol=rtol * scale, err_msg=op)


@pytest.fixture
def rng():
    """Fresh random inputs every run; the seed is printed, so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@on_gpu
@pytest.mark.parametrize("T, D", [(1, 333), (5, 4096), (3, 50)])
def test_rmsnorm_and_fused_add(rng, T, D):
    x, y = rng.standard_normal((2, T, D)).astype(np.float32)
    weight = rng.standard_normal(D).astype(np.float32)
    out = poisoned((T, D))
    kernels.rmsnorm_cuda(out, cupy.asarray(x), cupy.asarray(weight), 1e-5)
    assert_close("rmsnorm", out, kernels.rmsnorm_ref(np.empty_like(x), x, weight, 1e-5))

    xd, out = cupy.asarray(x), poisoned((T, D))
    kernels.add_rmsnorm_cuda(out, xd, cupy.asarray(y), cupy.asarray(weight), 1e-5)
    summed = kernels.add_ref(x.copy(), y)
    assert_close("add", xd, summed)
    assert_close("rmsnorm", out, kernels.rmsnorm_ref(np.empty_like(x), summed, weight, 1e-5))


def random_weight(rng, kind, N, K, zero_group=True):
    w = (rng.standard_normal((N, K)) * 0.5).astype(np.float32)
    if zero_group and K >= 32:
        w[N // 2, :32] = 0.0  # an all-zero quantization group (scale 0)
    return kernels.quantize(w, kind)


def rounded(a: np.ndarray, kind: str) -> np.ndarray:
    """a as the 16-bit operand the prefill GEMM uses for a weight of `kind` (f32: unchanged)"""
    if kind == "f32":
        return a
    if kind == "bf16":
        return kernels.dequantize(kernels.quantize(a, "bf16"))
    return a.astype(np.float16).astype(np.float32)


# N not a multiple of the 4 rows of a block, K not of the 128 threads' chunks; K = 50 and 6 (float kinds
# only) take the scalar fallback, whose rows are not 16-byte aligned
MATMUL_CASES = [(kind, N, K) for kind in KINDS for N, K in [(37, 96), (300, 1056), (5, 32), (41, 50), (7, 6)]
                if kind not in kernels.QUANTIZED or K % 32 == 0]


@on_gpu
@pytest.mark.parametrize("kind, N, K", MATMUL_CASES)
@pytest.mark.parametrize("T", [1, 3, 9])
def test_matmul(rng, kind, N, K, T):
    w = random_weight(rng, kind, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = poisoned((T, N))
    kernels.matmul_cuda(out, cupy.asarray(x), to_gpu(w))
    if T <= kernels.MATVEC_MAX_T:  # float32 weight streaming
        ref = kernels.matmul_ref(np.empty((T, N), np.float32), x, w)
    else:  # tensor cores on 16-bit operands: the reference on the same rounded operands
        ref = rounded(x, kind) @ rounded(kernels.dequantize(w), kind).T
    assert_close("matmul", out, ref, scale=10.0)


@on_gpu
def test_matmul_rejects_bad_inputs(rng):
    w = to_gpu(random_weight(rng, "q8_0", 8, 64))
    x = cupy.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="matmul"):
        kernels.matmul_cuda(cupy.zeros((1, 9), np.float32), x, w)
    with pytest.raises(ValueError, match="float32"):
        kernels.matmul_cuda(cupy.zeros((1, 8), np.float32), x.astype(np.float16), w)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matmul_cuda(cupy.zeros((1, 8), np.float32), cupy.zeros((64, 1), np.float32).T, w)


@on_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_embed(rng, kind):
    V, D = 53, 96 if kind in kernels.QUANTIZED else 50
    w = random_weight(rng, kind, V, D)
    tokens = rng.integers(0, V, size=11)
    tokens[3] = tokens[7]
    out = poisoned((11, D))
    kernels.embed_cuda(out, to_gpu(w), tokens)
    assert_close("embed", out, kernels.embed_ref(np.empty((11, D), np.float32), w, tokens))
    out = poisoned((11, D))
    kernels.embed_cuda(out, to_gpu(w), cupy.asarray(tokens, dtype=np.int32))  # tokens already on the GPU
    assert_close("embed", out, kernels.embed_ref(np.empty((11, D), np.float32), w, tokens))
    with pytest.raises(ValueError, match="embed"):
        kernels.embed_cuda(poisoned((1, D)), to_gpu(w), np.array([V]))


@on_gpu
@pytest.mark.parametrize("n_heads, Dh, positions", [(4, 16, [0]), (32, 128, [99]), (3, 10, list(range(20, 27))),
                                                    (8, 64, [87, 3, 3, 50, 99, 0, 12, 13, 14, 15, 16, 17, 40])])
@pytest.mark.parametrize("device_ids", [False, True])
def test_rope(rng, n_heads, Dh, positions, device_ids):
    S, T = 100, len(positions)
    x = rng.standard_normal((T, n_heads, Dh)).astype(np.float32)
    angles = rng.uniform(-10, 10, size=(S, Dh // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    xd = cupy.asarray(x)
    p = cupy.asarray(positions, dtype=np.int32) if device_ids else np.array(positions)
    kernels.rope_cuda(xd, p, cupy.asarray(cos), cupy.asarray(sin))
    assert_close("rope", xd, kernels.rope_ref(x.copy(), np.array(positions), cos, sin))
    if not device_ids:
        with pytest.raises(ValueError, match="rope"):
            kernels.rope_cuda(xd, np.full(T, S), cupy.asarray(cos), cupy.asarray(sin))


ATTENTION_CASES = [  # H, KV, Dh, S, rows' slots, rows' positions (3 slots)
    (4, 2, 16, 64, [0], [0]),  # first token
    (4, 2, 16, 64, [2], [63]),  # last cache row
    (32, 8, 128, 3000, [1], [2500]),  # Llama 8B heads, decode split over the keys
    (9, 3, 64, 1000, [0], [999]),  # SmolLM2-like GQA (n_rep 3), splits
    (6, 3, 10, 50, [1] * 7, list(range(20, 27))),  # Dh % 4 != 0, prefill continuing a cache
    (8, 2, 64, 100, [0] * 40, list(range(40))),  # prefill from 0: several row blocks, causal mask inside a tile
    (4, 4, 32, 700, [2] * 33, list(range(600, 633))),  # no GQA, prefill late in a long cache
    (2, 1, 128, 20000, [0], [19000]),  # many splits
    (9, 3, 64, 1000, [2, 0, 1], [5, 700, 999]),  # decode rows of three sequences
    (8, 2, 64, 300, [1, 0, 0, 0, 0, 0, 2], [77, 10, 11, 12, 13, 14, 250]),  # decode, a prefill chunk, decode
]


@on_gpu
@pytest.mark.parametrize("H, KV, Dh, S, slots, positions", ATTENTION_CASES)
@pytest.mark.parametrize("device_ids", [False, True])
def test_attention(rng, H, KV, Dh, S, slots, positions, device_ids):
    T = len(slots)
    slots, positions = np.array(slots), np.array(positions)
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    k, v = rng.standard_normal((2, T, KV, Dh)).astype(np.float32)
    # rows no call wrote hold garbage that the causal mask must ignore
    k_cache, v_cache = (rng.standard_normal((2, 3, S, KV, Dh)) * 3).astype(np.float32)
    ref_k, ref_v = QWeight(k_cache.copy()), QWeight(v_cache.copy())
    ref = kernels.attention_ref(np.empty((T, H * Dh), np.float32), q, k, v, ref_k, ref_v, slots, positions)
    kc, vc, out = QWeight(cupy.asarray(k_cache)), QWeight(cupy.asarray(v_cache)), poisoned((T, H * Dh))
    ids = (cupy.asarray(slots, dtype=np.int32), cupy.asarray(positions, dtype=np.int32)) if device_ids else (
        slots, positions)
    kernels.attention_cuda(out, cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), kc, vc, *ids)
    assert_close("attention", out, ref, scale=10.0)
    np.testing.assert_array_equal(cupy.asnumpy(kc.data), ref_k.data)
    np.testing.assert_array_equal(cupy.asnumpy(vc.data), ref_v.data)


@on_gpu
def test_attention_rejects_bad_shapes():
    z = lambda *s: cupy.zeros(s, np.float32)  # noqa: E731
    one = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="head dim"):
        kernels.attention_cuda(z(1, 2 * 256), z(1, 2, 256), z(1, 1, 256), z(1, 1, 256), QWeight(z(1, 8, 1, 256)),
                               QWeight(z(1, 8, 1, 256)), *one)
    with pytest.raises(ValueError, match="attention"):
        kernels.attention_cuda(z(1, 64), z(1, 4, 16), z(1, 2, 16), z(1, 2, 16), QWeight(z(1, 8, 2, 16)),
                               QWeight(z(1, 8, 2, 16)), np.zeros(1, np.int64), np.full(1, 8))
    with pytest.raises(ValueError, match="float32 caches"):
        half = QWeight(cupy.zeros((1, 8, 2, 16), np.float16))
        kernels.attention_cuda(z(1, 64), z(1, 4, 16), z(1, 2, 16), z(1, 2, 16), half, half, *one)


@on_gpu
@pytest.mark.parametrize("shape", [(1, 1000), (9, 331)])
def test_swiglu_and_add(rng, shape):
    h1, h3 = (rng.standard_normal((2, *shape)) * 5).astype(np.float32)
    h1[0, :3] = [-200.0, 200.0, 0.0]  # exp overflow must give silu = -0, not NaN
    out = poisoned(shape)
    kernels.swiglu_cuda(out, cupy.asarray(h1), cupy.asarray(h3))
    assert_close("swiglu", out, kernels.swiglu_ref(np.empty_like(h1), h1, h3))
    inplace = cupy.asarray(h1)
    kernels.swiglu_cuda(inplace, inplace, cupy.asarray(h3))  # out aliases h1, as in forward
    assert_close("swiglu", inplace, kernels.swiglu_ref(np.empty_like(h1), h1, h3))
    x = cupy.asarray(h1)
    kernels.add_cuda(x, cupy.asarray(h3))
    assert_close("add", x, kernels.add_ref(h1.copy(), h3))


@on_gpu
def test_sample_argmax(rng):
    for V in (1, 31, 128256):
        logits = rng.standard_normal(V).astype(np.float32)
        assert kernels.sample_argmax_cuda(cupy.asarray(logits)) == int(np.argmax(logits))
    logits = np.zeros(5000, np.float32)
    logits[[4000, 17, 2500]] = 3.0  # ties: the lowest index, like np.argmax
    assert kernels.sample_argmax_cuda(cupy.asarray(logits)) == 17


@on_gpu
@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.0, 1.0), (0.3, 0.5)])
def test_sample_matches_host_sampler(rng, temperature, top_p):
    llama31 = pytest.importorskip("llama31")
    logits = (rng.standard_normal(1000) * 3).astype(np.float32)
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    for coin in rng.uniform(0, 1, size=20):
        host = llama31.sample_topp(probs, top_p, coin) if top_p < 1 else llama31.sample_mult(probs, coin)
        assert kernels.sample_cuda(cupy.asarray(logits), temperature, top_p, coin) == host
    assert kernels.sample_cuda(cupy.asarray(logits), 0.0, top_p, 0.5) == int(np.argmax(logits))


# -----------------------------------------------------------------------------
# On the GPU: CUDA graph replay and the whole model


@on_gpu
def test_cuda_graph_step_matches_eager(rng):
    """A small decode step (embed, q/k/v projection, RoPE, attention) captured once and replayed at
    positions 0..11 gives what the numpy references give step by step."""
    V, H, KV, Dh, S = 50, 4, 2, 16, 12
    D = H * Dh
    angles = rng.uniform(0, 6, size=(S, Dh // 2))
    host = dict(emb=random_weight(rng, "q8_0", V, D, zero_group=False), cos=np.cos(angles).astype(np.float32),
                wq=random_weight(rng, "q4_0", D, D), wk=random_weight(rng, "bf16", KV * Dh, D),
                wv=random_weight(rng, "q8_0", KV * Dh, D), sin=np.sin(angles).astype(np.float32),
                x=np.zeros((1, D), np.float32), q=np.zeros((1, D), np.float32), k=np.zeros((1, KV * Dh), np.float32),
                v=np.zeros((1, KV * Dh), np.float32), kc=QWeight(np.zeros((2, S, KV, Dh), np.float32)),
                vc=QWeight(np.zeros((2, S, KV, Dh), np.float32)), att=np.zeros((1, D), np.float32))
    dev = {name: to_gpu(a) if isinstance(a, QWeight) else cupy.asarray(a) for name, a in host.items()}

    def step(ops, b, tokens, positions, slots):
        ops.embed(b["x"], b["emb"], tokens)
        for name in "qkv":
            ops.matmul(b[name], b["x"], b["w" + name])
        q, k, v = b["q"].reshape(1, H, Dh), b["k"].reshape(1, KV, Dh), b["v"].reshape(1, KV, Dh)
        ops.rope(q, positions, b["cos"], b["sin"])
        ops.rope(k, positions, b["cos"], b["sin"])
        ops.attention(b["att"], q, k, v, b["kc"], b["vc"], slots, positions)
        return b["att"]

    numpy_ops, cupy_ops = kernels.ops_for("numpy"), kernels.ops_for("cupy")
    graph = kernels.CudaGraphStep(lambda tokens, positions, slots: step(cupy_ops, dev, tokens, positions, slots))
    for pos, token in enumerate(rng.integers(0, V, size=S)):
        got = graph([int(token)], [pos], [1])  # slot 1 of 2
        ref = step(numpy_ops, host, np.array([token]), np.array([pos]), np.array([1]))
        assert_close("attention", got, ref, scale=100.0)
    assert graph.graph is not None


@on_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_full_model_logits_match_numpy(tiny_files, kind):
    llama31 = pytest.importorskip("llama31")
    ids = list(range(1, 40, 3))  # 13 tokens: the prefill GEMM path (16-bit operands)
    ref = llama31.load(tiny_files[kind], backend="numpy", ctx=64).logits(ids)
    got = llama31.load(tiny_files[kind], backend="cupy", ctx=64).logits(ids)
    # prefill rounds activations to 16 bits on the GPU: compare as a whole, 1e-2 relative
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    limit = 1e-5 if kind == "f32" else 1e-2
    print(f"max error prefill_logits: {rel:.2e} relative, {rel / limit:.2g} of tolerance")
    assert rel < limit, f"{kind}: relative difference {rel:.2e}"

    # decode (T = 1, float32 weight streaming) after one-token "prefills": tight
    np_model = llama31.load(tiny_files[kind], backend="numpy", ctx=64)
    cp_model = llama31.load(tiny_files[kind], backend="cupy", ctx=64)
    np_state, cp_state = np_model.new_state(), cp_model.new_state()
    for pos, token in enumerate(ids[:6]):
        a = np_model.decode(np_state, token)
        b = cp_model.host(llama31.forward(cp_model, cp_state, np.array([token]), np.array([pos]), np.zeros(1, np.int64),
                                          slice(None)))
        print_max_error("decode_logits", b, a, 1e-3, 1e-3)
        np.testing.assert_allclose(b, a, atol=1e-3, rtol=1e-3)


@on_gpu
def test_full_model_graph_decode_matches_eager(tiny_files):
    """Model.decode (a captured CUDA graph, replayed) gives the logits of eager forward calls."""
    llama31 = pytest.importorskip("llama31")
    model = llama31.load(tiny_files["q8_0"], backend="cupy", ctx=64)
    eager, replayed = model.new_state(), model.new_state()
    for pos, token in enumerate([5, 9, 2, 77, 31, 8, 100, 3]):
        a = model.host(llama31.forward(model, eager, np.array([token]), np.array([pos]), np.zeros(1, np.int64),
                                       slice(None))).copy()
        b = model.host(model.decode(replayed, token)).copy()
        assert replayed.lengths[0] == pos + 1 and replayed.graph is not None
        print_max_error("graph_logits", b, a, 1e-5, 1e-5)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
