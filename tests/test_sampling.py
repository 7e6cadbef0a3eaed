"""Sampling, RoPE frequencies and Config validation: the parts of llama31.py that need no model file."""

import math

import numpy as np
import pytest

import llama31


def meta_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's llama-models apply_scaling, written as its per-frequency loop, in float64."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(new_freqs)


@pytest.mark.parametrize("factor,dim,n_heads", [(8.0, 4096, 32), (32.0, 2048, 32), (8.0, 64, 1)])
def test_rope_frequencies_match_meta_scaling(factor, dim, n_heads):
    cfg = llama31.Config(dim=dim, n_heads=n_heads, n_kv_heads=n_heads,
                         rope_scaling=llama31.RopeScaling(factor=factor))
    Dh = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (np.arange(0, Dh, 2) / Dh))
    expected = meta_apply_scaling(plain, factor, 1.0, 4.0, 8192)
    ours = llama31.rope_frequencies(cfg)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=2e-6)
    # the scaling really changes the low frequencies and leaves the high ones alone
    assert ours[0] == pytest.approx(plain[0], rel=1e-6) and ours[-1] == pytest.approx(plain[-1] / factor, rel=1e-5)


def test_plain_rope_without_scaling():
    cfg = llama31.Config(dim=128, n_heads=2, n_kv_heads=2, rope_theta=10000.0, rope_scaling=None)
    np.testing.assert_allclose(llama31.rope_frequencies(cfg), 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=2e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        llama31.Config(n_heads=32, n_kv_heads=5)
    with pytest.raises(ValueError, match="unknown keys"):
        llama31.Config.from_dict({**llama31.Config().to_dict(), "ffn_dim_multiplier": 1.3})
    cfg = llama31.Config(dim=64, n_heads=4, n_kv_heads=2)
    assert llama31.Config.from_dict(cfg.to_dict()) == cfg
    assert (cfg.head_dim, cfg.kv_dim, cfg.n_rep) == (16, 32, 2)


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    assert llama31.sample(llama31.Sampler(temperature=0.0), logits, []) == int(np.argmax(logits))


def test_same_seed_same_tokens(logits):
    draw = lambda seed: [llama31.sample(s, logits, []) for s in [llama31.Sampler(1.0, seed=seed)] for _ in range(50)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_and_tiny_top_p_are_greedy(logits):
    best = int(np.argmax(logits))
    assert all(llama31.sample(llama31.Sampler(2.0, top_k=1, top_p=1.0, seed=s), logits, []) == best for s in range(20))
    assert all(llama31.sample(llama31.Sampler(2.0, top_p=1e-6, seed=s), logits, []) == best for s in range(20))


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    sampler = llama31.Sampler(temperature=1.0, top_p=0.85, seed=0)
    counts = np.bincount([llama31.sample(sampler, logits, []) for _ in range(4000)], minlength=4)
    assert counts[3] == 0  # 0.5 + 0.3 + 0.15 >= 0.85: the last token is outside the nucleus
    assert counts[2] > 0
    np.testing.assert_allclose(counts[:3] / counts.sum(), probs[:3] / probs[:3].sum(), atol=0.03)


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.6, 0.3, 0.06, 0.04])).astype(np.float32)
    sampler = llama31.Sampler(temperature=1.0, top_p=1.0, min_p=0.2, seed=0)  # keep p >= 0.2 * 0.6 = 0.12
    drawn = {llama31.sample(sampler, logits, []) for _ in range(2000)}
    assert drawn == {0, 1}


def test_repetition_penalty_lowers_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0, -1.1], dtype=np.float32)
    greedy_penalised = llama31.Sampler(temperature=0.0, repetition_penalty=1.5)
    assert llama31.sample(greedy_penalised, logits, [0]) == 1  # 2.0 / 1.5 < 1.9
    # a negative logit is multiplied, so the penalty lowers it too: -1.0 * 1.5 falls below -1.1
    only_negative = np.array([-1.0, -1.1], dtype=np.float32)
    assert llama31.sample(greedy_penalised, only_negative, [0]) == 1


def test_top_p_below_one_over_n_keeps_the_top_token():
    # near-uniform: every token is below the pre-filter's bound (1 - top_p) / (n - 1) when top_p < 1/n
    probs = np.full(256, 1 / 256) + np.linspace(0, 1e-6, 256)
    probs /= probs.sum()
    assert llama31.sample_topp(probs, 1 / 512, 0.3) == 255
    sampler = llama31.Sampler(temperature=4004.0, top_p=1 / 512, seed=0)  # hypothesis found this one
    logits = np.random.default_rng(0).normal(size=256).astype(np.float32)
    assert llama31.sample(sampler, logits, []) == int(np.argmax(logits))
