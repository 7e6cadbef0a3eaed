"""The Numba backend: each <op>_numba against its numpy <op>_ref on fresh random inputs, with sizes that do
not divide the kernels' blocks (16-row blocks, 4-token tiles, 16-lane vectors, 32-key softmax steps), every
weight kind, all-zero quantization groups, positions at both ends of the cache, GQA ratios 1 and 3, and
outputs poisoned with NaN so that an element a kernel forgets to write fails. Tolerances are
kernels.TOLERANCE; the int8 matmul (q8_0/q4_0) is held to matmul_ref on the same int8-rounded activations,
and every kind's matmul row t is bit-identical whatever else is in the batch (the serving engine's need).
Also: the backend table without numba, and the whole model on numba against the numpy backend.
"""

import platform
import threading

import numpy as np
import pytest

import kernels
import llama31

needs_numba = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")
KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def poisoned(*shape):
    return np.full(shape, np.nan, np.float32)


def assert_close(out, ref, op):
    atol, rtol = kernels.TOLERANCE[op]
    err = np.abs(out - ref)
    bad = ~(err <= atol + rtol * np.abs(ref))  # NaN in out counts as bad
    assert not bad.any(), f"{op}: {bad.sum()} of {out.size} elements off, max |diff| {np.nanmax(err):.3g}"


def random_weight(rng, kind, N, K, group_size=32):
    w = rng.standard_normal((N, K)).astype(np.float32)
    if kind in kernels.QUANTIZED and K >= 2 * group_size:
        w[: N // 2, group_size:2 * group_size] = 0  # all-zero groups: scale 0
    return kernels.quantize(w, kind, group_size)


# -----------------------------------------------------------------------------
# ops


@needs_numba
@pytest.mark.parametrize("T, D", [(1, 576), (3, 37), (2, 1)])
def test_rmsnorm(rng, T, D):
    x, weight = rng.standard_normal((T, D)).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    out = poisoned(T, D)
    kernels.rmsnorm_numba(out, x, weight, 1e-5)
    assert_close(out, kernels.rmsnorm_ref(np.empty_like(out), x, weight, 1e-5), "rmsnorm")


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 3, 4, 9, 23])
@pytest.mark.parametrize("N", [1, 37, 70])
def test_matmul(rng, kind, T, N):
    K = 96 if kind in kernels.QUANTIZED else 37  # quantized K is a multiple of 32; float K need not be of 16
    w = random_weight(rng, kind, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0, :32] = 0  # an all-zero activation block
    out = poisoned(T, N)
    kernels.matmul_numba(out, x, w)
    seen = kernels.quantize_activations_ref(x) if kind in kernels.QUANTIZED else x
    assert_close(out, kernels.matmul_ref(np.empty_like(out), seen, w), "matmul")


@needs_numba
@pytest.mark.parametrize("kind", kernels.QUANTIZED)
@pytest.mark.parametrize("T", [1, 5, 12])
def test_matmul_read_only_weights(rng, kind, T):
    """Model files are memory-mapped read-only (a separate numba specialisation)."""
    w = random_weight(rng, kind, 50, 256)
    for a in w:
        a.setflags(write=False)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    out = poisoned(T, 50)
    kernels.matmul_numba(out, x, w)
    assert_close(out, kernels.matmul_ref(np.empty_like(out), kernels.quantize_activations_ref(x), w), "matmul")


@needs_numba
@pytest.mark.parametrize("kind", kernels.QUANTIZED)
def test_matmul_and_embed_reject_other_group_sizes(rng, kind):
    w = kernels.quantize(rng.standard_normal((8, 128)).astype(np.float32), kind, group_size=64)
    with pytest.raises(ValueError, match="group size 64"):
        kernels.matmul_numba(poisoned(1, 8), rng.standard_normal((1, 128)).astype(np.float32), w)
    with pytest.raises(ValueError, match="group size 64"):
        kernels.embed_numba(poisoned(1, 128), w, np.array([0]))


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
def test_embed(rng, kind):
    V, D = 50, (64 if kind in kernels.QUANTIZED else 37)
    w = random_weight(rng, kind, V, D)
    tokens = np.array([0, 7, V - 1, 7], dtype=np.int64)
    out = poisoned(len(tokens), D)
    kernels.embed_numba(out, w, tokens)
    np.testing.assert_array_equal(out, kernels.embed_ref(np.empty_like(out), w, tokens))


@needs_numba
def test_embed_rejects_token_out_of_range(rng):
    w = kernels.quantize(rng.standard_normal((10, 32)).astype(np.float32), "q8_0")
    with pytest.raises(IndexError):
        kernels.embed_numba(poisoned(1, 32), w, np.array([10]))


@needs_numba
@pytest.mark.parametrize("positions", [[0], [17, 18, 19], [19], [3, 0, 19, 7, 7]])
def test_rope(rng, positions):
    S, n_heads, Dh = 20, 3, 6  # the last row of the table, rows in any order, repeated positions
    angles = rng.uniform(0, 100, (S, Dh // 2)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    x = rng.standard_normal((len(positions), n_heads, Dh)).astype(np.float32)
    got = x.copy()
    kernels.rope_numba(got, np.array(positions), cos, sin)
    assert_close(got, kernels.rope_ref(x.copy(), np.array(positions), cos, sin), "rope")


def random_cache(rng, kind, n_slots, S, KV, Dh):
    """A cache QWeight (n_slots, S, KV, Dh) of random contents (rows no call wrote must be ignored)"""
    return kernels.quantize(rng.standard_normal((n_slots, S, KV, Dh)).astype(np.float32), kind)


def copy_cache(c):
    return kernels.QWeight(c.data.copy(), None if c.scales is None else c.scales.copy())


def prefill_rows(slot, start, n):
    """(slots, positions) of n rows that continue the sequence in `slot` at position `start`"""
    return [slot] * n, list(range(start, start + n))


ATTENTION_BATCHES = {  # name: (rows' slots, rows' positions)
    "first token": ([0], [0]),
    "decode, 71 keys: two 32-key steps and a partial one": ([0], [70]),
    "prefill chunk straddling a step": prefill_rows(0, 27, 5),
    "the last positions of the cache": prefill_rows(1, 297, 3),
    "decode over 3 splits (split 128)": ([1], [299]),
    "prefill chunk across a split boundary": prefill_rows(0, 120, 13),
    "tiles of 4, 4 and 1 tokens": prefill_rows(2, 40, 9),
    "prefill into an empty cache": prefill_rows(1, 0, 37),
    "decode rows of 3 sequences": ([2, 0, 1], [5, 130, 299]),
    "decode rows, then a prefill chunk, then decode": ([2, 1, 0, 0, 0, 0, 0, 2], [7, 77, 10, 11, 12, 13, 14, 60]),
}


@needs_numba
@pytest.mark.parametrize("batch", ATTENTION_BATCHES)
@pytest.mark.parametrize("H, KV, Dh", [(4, 4, 64), (9, 3, 64), (8, 2, 80), (3, 1, 16)])
@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
def test_attention(rng, batch, H, KV, Dh, cache_type):
    """Rows of several sequences (cache slots) at their own positions: the numba kernel against the
    reference, and the cache contents written alike (bit for bit)."""
    if cache_type == "q8_0" and Dh % 32:
        pytest.skip("q8_0 caches group each head by 32")
    slots, positions = (np.array(a) for a in ATTENTION_BATCHES[batch])
    T, S = len(slots), 300
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    k, v = rng.standard_normal((2, T, KV, Dh)).astype(np.float32)
    k_cache, v_cache = (random_cache(rng, cache_type, 3, S, KV, Dh) for _ in range(2))
    ref_k, ref_v = copy_cache(k_cache), copy_cache(v_cache)
    ref = kernels.attention_ref(np.empty((T, H * Dh), np.float32), q, k, v, ref_k, ref_v, slots, positions)
    out = poisoned(T, H * Dh)
    kernels.attention_numba(out, q, k, v, k_cache, v_cache, slots, positions)
    assert_close(out, ref, "attention")
    for got, want in ((k_cache, ref_k), (v_cache, ref_v)):
        for a, b in zip(got, want):
            if a is not None:
                np.testing.assert_array_equal(a, b)


@needs_numba
@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
def test_attention_rows_do_not_depend_on_the_batch(rng, cache_type):
    """Each row's output is the same to the bit whether it comes alone (decode), in its prefill chunk, or
    in a batch with other sequences' rows: the kernel's splits are fixed cuts of each row's own keys."""
    H, KV, Dh, S = 9, 3, 64, 400
    k_all, v_all = rng.standard_normal((2, 2, S, KV, Dh)).astype(np.float32)  # two sequences' keys, values
    q_all = rng.standard_normal((2, S, H, Dh)).astype(np.float32)

    def run(rows):  # attention of rows [(slot, pos)] on fresh caches holding each slot's keys before them
        k_cache, v_cache = (kernels.quantize(np.zeros((2, S, KV, Dh), np.float32), cache_type) for _ in range(2))
        for s in range(2):  # store what precedes the rows (a prefill of those positions)
            n = min((p for slot, p in rows if slot == s), default=0)
            kernels.attention_numba(np.empty((n, H * Dh), np.float32), q_all[s, :n], k_all[s, :n], v_all[s, :n],
                                    k_cache, v_cache, np.full(n, s), np.arange(n))
        slots, positions = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        out = poisoned(len(rows), H * Dh)
        kernels.attention_numba(out, q_all[slots, positions], k_all[slots, positions], v_all[slots, positions],
                                k_cache, v_cache, slots, positions)
        return out

    chunk = [(0, p) for p in range(250, 262)]  # 12 rows across the split at 256
    batch = [(1, 390)] + chunk + [(1, 391), (1, 392)]
    together = run(batch)
    alone = np.concatenate([run(batch[:1]), run(chunk), run(batch[-2:])])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(run(chunk)[-1:], run(chunk[-1:]))


@needs_numba
def test_attention_rejects_positions_past_the_cache(rng):
    q, k = np.zeros((2, 2, 16), np.float32), np.zeros((2, 1, 16), np.float32)
    cache = kernels.quantize(np.zeros((2, 10, 1, 16), np.float32), "f32")
    for slots, positions in (([0, 0], [9, 10]), ([2, 2], [0, 1]), ([0, 0], [-1, 0])):
        with pytest.raises(ValueError, match="outside the cache"):
            kernels.attention_numba(poisoned(2, 32), q, k, k, cache, copy_cache(cache), np.array(slots),
                                    np.array(positions))


@needs_numba
@pytest.mark.parametrize("T, F", [(1, 1536), (4, 37)])
def test_swiglu_in_place(rng, T, F):
    h1 = (rng.standard_normal((T, F)) * 30).astype(np.float32)
    h1[0, :4] = [-100.0, 100.0, 0.0, -88.0]  # exp overflow, saturation, zero
    h3 = rng.standard_normal((T, F)).astype(np.float32)
    ref = kernels.swiglu_ref(np.empty_like(h1), h1, h3)
    kernels.swiglu_numba(h1, h1, h3)  # in place, as llama31.forward calls it
    assert_close(h1, ref, "swiglu")


@needs_numba
def test_exp_numba_is_within_2_ulp():
    x = np.linspace(-87, 88, 100_001, dtype=np.float32)
    got = kernels.numba.njit(lambda a: np.array([kernels._exp_numba(v) for v in a], dtype=np.float32))(x)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2.5e-7


@needs_numba
def test_add(rng):
    x, y = rng.standard_normal((2, 3, 37)).astype(np.float32)
    want = x + y
    kernels.add_numba(x, y)
    np.testing.assert_array_equal(x, want)


@needs_numba
def test_quantize_activations_ref_is_the_numba_rounding(rng):
    """The reference's int8 rounding is the kernel's, bit for bit, also at the halfway points."""
    x = rng.standard_normal((3, 4096)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = np.arange(32) - 15.5  # amax 15.5: d = 15.5 / 127, values at .5 steps of the grid
    xq, xd, xc = kernels._quantize_activations_numba(x, 8)
    np.testing.assert_array_equal(xq * np.repeat(xd, 32, axis=1), kernels.quantize_activations_ref(x))
    np.testing.assert_array_equal(xc, -8 * xq.reshape(3, -1, 32).sum(-1, dtype=np.int32))


@needs_numba
def test_self_check_passes(capsys):
    """`python kernels.py` checks every op of every backend here against its reference, a line each."""
    assert kernels.main() == 0
    lines = capsys.readouterr().out.splitlines()
    backends = kernels.available_backends()[1:]
    assert len(lines) == sum(len(kernels._check_calls(np.random.default_rng(0), b)) for b in backends)
    assert all(" pass " in line for line in lines)


ISA_INSTRUCTION = {"vnni": "vpdpbusd", "avx2": "vpmaddubsw", "portable": None}
RAGGED_T = (1, 2, 3, 5, 8, 13, 37, 130)  # every tile size (8, 4, 2, 1), in registers and repacked


_FRESH = {}  # isa -> the int8 matmul compiled with it (compiling takes seconds: once per isa and kind)


def int8_matmul_for(isa, monkeypatch):
    """The int8 matmul compiled afresh with kernels.DOT_ISA = isa (uncached), as matmul_numba calls it."""
    features = kernels.llvm_binding.get_host_cpu_features()
    if isa == "vnni" and kernels.DOT_ISA != "vnni" or isa == "avx2" and not features.get("avx2"):
        pytest.skip(f"this CPU cannot run the {isa} instructions")
    monkeypatch.setattr(kernels, "DOT_ISA", isa)  # read while compiling, at each weight kind's first call
    fresh = _FRESH.setdefault(isa, kernels.numba.njit(parallel=True, fastmath=kernels.EXACT_DIVISION)(
        kernels._matmul_int8_numba.py_func))

    def matmul(out, x, w):
        fresh(out, x, w.data, w.scales.view(np.int16), 2)
        return out
    return fresh, matmul


@needs_numba
@pytest.mark.parametrize("isa", ISA_INSTRUCTION)
@pytest.mark.parametrize("kind", kernels.QUANTIZED)
def test_int8_matmul_each_instruction_set(rng, monkeypatch, isa, kind):
    """Each way of emitting the int8 dot (the one this CPU gets, and the ones it can run) gives the same
    results through the instruction it names, bit for bit: the group sums are exact integers."""
    fresh, matmul = int8_matmul_for(isa, monkeypatch)
    w = random_weight(rng, kind, 37, 96)
    x = rng.standard_normal((13, 96)).astype(np.float32)
    x[2, 32:64] = 0  # an all-zero activation block
    got = matmul(poisoned(13, 37), x, w)
    assert_close(got, kernels.matmul_ref(np.empty_like(got), kernels.quantize_activations_ref(x), w), "matmul")
    monkeypatch.undo()
    usual = poisoned(13, 37)
    kernels.matmul_numba(usual, x, w)
    np.testing.assert_array_equal(got, usual)
    if ISA_INSTRUCTION[isa]:
        assert ISA_INSTRUCTION[isa] in "\n".join(fresh.inspect_asm().values())


@needs_numba
@pytest.mark.parametrize("isa", ISA_INSTRUCTION)
@pytest.mark.parametrize("kind", kernels.QUANTIZED)
def test_int8_matmul_is_batch_invariant(rng, monkeypatch, isa, kind):
    """Row t of a T-token call equals, bit for bit, the same activations alone (T = 1, the decode path),
    whatever T is and wherever the row sits: a request's output must not depend on its batch."""
    _, matmul = int8_matmul_for(isa, monkeypatch)
    w = random_weight(rng, kind, 40, 160)  # 3 slabs, the last one partial
    x = rng.standard_normal((max(RAGGED_T), 160)).astype(np.float32) * rng.uniform(0.1, 10, (max(RAGGED_T), 1))
    x = x.astype(np.float32)
    alone = np.concatenate([matmul(poisoned(1, 40), x[t:t + 1], w) for t in range(len(x))])
    for T in RAGGED_T:
        for start in (0, len(x) - T):
            np.testing.assert_array_equal(matmul(poisoned(T, 40), x[start:start + T], w), alone[start:start + T],
                                          err_msg=f"{kind} {isa}: T = {T} from row {start}")


@needs_numba
@pytest.mark.parametrize("kind", ("f32", "f16", "bf16"))
def test_float_matmul_is_batch_invariant(rng, kind):
    """The float kinds too: row t of any T-token call is the T = 1 call on that row, bit for bit."""
    w = random_weight(rng, kind, 40, 45)
    x = rng.standard_normal((max(RAGGED_T), 45)).astype(np.float32)
    alone = poisoned(len(x), 40)
    for t in range(len(x)):
        kernels.matmul_numba(alone[t:t + 1], x[t:t + 1], w)
    for T in RAGGED_T:
        for start in (0, len(x) - T):
            out = poisoned(T, 40)
            kernels.matmul_numba(out, x[start:start + T], w)
            np.testing.assert_array_equal(out, alone[start:start + T], err_msg=f"{kind}: T = {T} from row {start}")


# -----------------------------------------------------------------------------
# backend table


def test_numba_backend_has_every_op():
    ops = kernels.ops_for("numba")
    assert all(callable(getattr(ops, op)) for op in kernels.OPS)


def test_without_numba_the_numpy_path_runs_and_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "numba", None)
    assert "numba" not in kernels.available_backends()
    assert kernels.pick_backend("auto") == "numpy"
    assert "pip install numba" in kernels.backend_notice("numpy")
    with pytest.raises(RuntimeError, match="pip install numba"):
        kernels.pick_backend("numba")


@needs_numba
def test_backend_notice_is_silent_with_numba():
    assert kernels.backend_notice(kernels.pick_backend("auto")) is None


# -----------------------------------------------------------------------------
# whole model


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
def test_model_logits_match_numpy_backend(tiny_files, monkeypatch, kind):
    """Prefill (all logits of 11 tokens in chunks of 8 and 3) then 3 decode steps, on both backends; for
    q8_0/q4_0 the numpy backend's matmul sees the activations rounded to int8 blocks, as numba's does."""
    if kind in kernels.QUANTIZED:
        exact = kernels.matmul_ref
        monkeypatch.setattr(kernels, "matmul_ref", lambda out, x, w: exact(out, kernels.quantize_activations_ref(x), w))
    chunks = [[1, 5, 9, 200, 3, 3, 17, 255], [0, 42, 7], [4], [8], [15]]
    got, ref = [], []
    for backend, logits in (("numba", got), ("numpy", ref)):
        model = llama31.load(tiny_files[kind], backend=backend, ctx=32)
        state = model.new_state()
        pos = 0
        for chunk in chunks:
            positions, slots = np.arange(pos, pos + len(chunk)), np.zeros(len(chunk), np.int64)
            logits.append(llama31.forward(model, state, np.array(chunk), positions, slots, slice(None)).copy())
            pos += len(chunk)
    # int8 activations jump where a value crosses a rounding boundary, and numba's float16 KV cache moves values
    # across some: quantized kinds compare loosely (here 3-5% of the logits' spread; 6% against float32
    # activations), float kinds to the cache's rounding
    tol = 0.1 if kind in kernels.QUANTIZED else 1e-3
    for g, r in zip(got, ref):
        assert np.max(np.abs(g - r)) <= tol * np.std(r), f"{kind}: max diff {np.max(np.abs(g - r)):.3g}"


@needs_numba
def test_numba_kernels_run_on_one_thread_whoever_calls():
    """libgomp makes a second thread that runs parallel kernels 4x slower (kernels.on_kernel_thread): every
    caller's forward runs on the one kernel thread, not on the caller's own."""
    run = kernels.ops_for("numba").run
    threads = {run(threading.get_ident)}
    caller = threading.Thread(target=lambda: threads.add(run(threading.get_ident)))
    caller.start()
    caller.join()
    assert len(threads) == 1 and threading.get_ident() not in threads and caller.ident not in threads
    with pytest.raises(ZeroDivisionError):  # its exceptions reach the caller
        run(lambda: 1 / 0)
