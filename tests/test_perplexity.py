"""Perplexity by llama-perplexity's rule, on the tiny random model: the rule on a hand-checked case (chunk
boundaries, BOS replacement, which positions count), batching, KL divergence, and every bad input.
SmolLM2 against transformers and llama.cpp under the same rule is in test_smollm2.py."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import llama31
from conftest import TINY

BOS = 1


def nll_by_hand(logits: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target] in float64, one row at a time."""
    z = logits.astype(np.float64)
    return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[target])


def test_chunks_drop_the_tail_and_start_with_bos():
    tokens = [BOS] + list(range(10, 29))  # 20 tokens: two chunks of 8, a tail of 4
    chunks = llama31.perplexity_chunks(tokens, 8, BOS)
    assert chunks.tolist() == [[BOS, 10, 11, 12, 13, 14, 15, 16], [BOS, 18, 19, 20, 21, 22, 23, 24]]
    kept = llama31.perplexity_chunks(tokens, 8, None)  # a tokenizer that adds no BOS: tokens stay
    assert kept.tolist() == [tokens[:8], tokens[8:16]]
    with pytest.raises(ValueError, match="20 tokens, fewer than two chunks of 16"):
        llama31.perplexity_chunks(tokens, 16, BOS)
    with pytest.raises(ValueError, match="ctx 2 scores no token"):
        llama31.perplexity_chunks(tokens, 2, BOS)


def test_scoring_rule_on_a_hand_checked_case(tiny_model_file):
    """ctx 8: each chunk is run alone from position 0, and positions 4, 5, 6 predict tokens 5, 6, 7."""
    model = llama31.load(tiny_model_file, backend="numpy")
    tokens = [BOS] + [int(t) for t in np.random.default_rng(0).integers(3, TINY.vocab_size, 19)]
    done = []
    got = llama31.perplexity(model, tokens, ctx=8, bos_id=BOS, progress=lambda *a: done.append(a))
    nll = []
    for chunk in ([BOS] + tokens[1:8], [BOS] + tokens[9:16]):  # token 8 is replaced by BOS; 16..19 dropped
        logits = model.logits(chunk)  # a fresh context
        nll += [nll_by_hand(logits[p], chunk[p + 1]) for p in (4, 5, 6)]
    nll = np.array(nll)
    ppl = np.exp(nll.mean())
    assert (got["n_tokens"], got["n_chunks"], got["ctx"]) == (6, 2, 8)
    np.testing.assert_allclose(got["ppl"], ppl, rtol=1e-6)
    np.testing.assert_allclose(got["err"], ppl * np.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / 5), rtol=1e-5)
    assert [d[:2] for d in done] == [(1, 2), (2, 2)]  # a running value per chunk
    np.testing.assert_allclose([d[2] for d in done], [np.exp(nll[:3].mean()), ppl], rtol=1e-6)
    model.tokenizer = SimpleNamespace(add_bos=True, bos_id=BOS)  # BOS by default where the tokenizer adds it
    assert llama31.perplexity(model, tokens, ctx=8)["ppl"] == got["ppl"]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_batching_does_not_change_the_figures(tiny_model_file, backend):
    """Many chunks as cache slots of one call (ctx 16 < 128 rows a call), or calls that cut chunks apart."""
    if backend == "numba":
        pytest.importorskip("numba")
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, TINY.vocab_size, 16 * 9 + 5)]
    model = llama31.load(tiny_model_file, backend=backend)
    batched = llama31.perplexity(model, tokens, ctx=16)
    model.prefill_chunk = 7  # 7-row calls: chunks split across calls, two chunks in one call
    cut = llama31.perplexity(model, tokens, ctx=16)
    one_at_a_time = []
    for chunk in llama31.perplexity_chunks(tokens, 16, None):
        logits = model.logits(chunk)
        one_at_a_time += [nll_by_hand(logits[p], chunk[p + 1]) for p in range(8, 15)]
    assert batched["n_tokens"] == cut["n_tokens"] == len(one_at_a_time) == 9 * 7
    np.testing.assert_allclose([batched["ppl"], cut["ppl"]], np.exp(np.mean(one_at_a_time)), rtol=1e-5)


def test_kl_divergence_and_top1_agreement(tiny_files):
    tokens = [BOS] + [int(t) for t in np.random.default_rng(2).integers(3, TINY.vocab_size, 16 * 3)]
    f32 = llama31.load(tiny_files["f32"], backend="numpy")
    q4 = llama31.load(tiny_files["q4_0"], backend="numpy")
    same = llama31.perplexity(f32, tokens, ctx=16, bos_id=BOS, base=f32)
    assert abs(same["kld"]) < 1e-9 and same["top1"] == 1.0
    got = llama31.perplexity(q4, tokens, ctx=16, bos_id=BOS, base=f32)
    kld, top1 = [], []
    for chunk in llama31.perplexity_chunks(tokens, 16, BOS):
        for log_p, log_b in zip(*(llama31.log_softmax64(m.logits(chunk)[8:15]) for m in (q4, f32))):
            kld.append(float((np.exp(log_b) * (log_b - log_p)).sum()))
            top1.append(log_p.argmax() == log_b.argmax())
    assert min(kld) >= 0 and got["kld"] > 0
    np.testing.assert_allclose([got["kld"], got["kld_p99"]], [np.mean(kld), np.percentile(kld, 99)], rtol=1e-6)
    assert got["top1"] == np.mean(top1)
    assert got["ppl"] == llama31.perplexity(q4, tokens, ctx=16, bos_id=BOS)["ppl"]  # the base changes no nll


def test_text_is_read_raw_with_one_trailing_newline_dropped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("naïve\r\n text\n\n".encode())
    assert llama31.read_text(str(path)) == "naïve\r\n text\n"
    for content, message in [(b"", "the file is empty"), (b"GGUF\0\0\0", "a binary file"),
                             (b"caf\xe9", "not UTF-8 text")]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            llama31.read_text(str(path))


def run_cli(*args):
    return subprocess.run([sys.executable, "llama31.py", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs_are_one_line_errors(tmp_path, tiny_model_file):
    text = tmp_path / "t.txt"
    text.write_text("some words " * 50)
    for args, message in [
        (["--perplexity", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["-m", tiny_model_file, "--perplexity", str(text)], "has no tokenizer, and perplexity reads text"),
        (["-m", tiny_model_file, "--perplexity", str(text), "--ctx", "200000"], "allows 1..131072"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    for args, message in [(["--kl-base", tiny_model_file, "hi"], "--kl-base goes with --perplexity"),
                          (["--perplexity", str(text), "hi"], "give one of: a prompt")]:
        result = run_cli(*args)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr
