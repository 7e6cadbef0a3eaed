"""bench.py's random models: the GGUF that llama.cpp runs and the llama31 file converted from it hold the same
weights, bit for bit, and describe the same model (RoPE scaling included)."""

import numpy as np
import pytest

import bench
import kernels
import llama31
from make_random_checkpoint import SHAPES

BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}  # ggml block: f16 scale, then 32 int8 or 16 bytes of nibbles


@pytest.mark.parametrize("quant", kernels.QUANTIZED)
def test_random_gguf_holds_the_weights_llama31_runs(tmp_path, monkeypatch, quant):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny", SHAPES["tiny"].to_dict())
    path = bench.random_gguf("tiny", quant, str(tmp_path))
    cfg, _, weights = llama31.load_weights(bench.convert_gguf(path, quant, tokenizer=False))
    assert cfg == SHAPES["tiny"]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, ours in (("blk.{l}.ffn_down.weight", weights.w2), ("blk.{l}.attn_q.weight", weights.wq)):
        for l in range(cfg.n_layers):
            n = ours.data.shape[1]
            blocks = np.asarray(tensors[name.format(l=l)].data).reshape(n, -1, BLOCK_BYTES[quant])
            np.testing.assert_array_equal(blocks[..., :2].copy().view(np.float16)[..., 0], ours.scales[l])
            np.testing.assert_array_equal(blocks[..., 2:].reshape(n, -1), ours.data[l].view(np.uint8))
    w = kernels.dequantize(weights.w1.layer(0))
    assert 0.015 < w.std() < 0.025  # the std random_blocks draws for
