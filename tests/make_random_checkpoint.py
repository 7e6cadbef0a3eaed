"""Random-weight Llama checkpoints in Meta, Hugging Face and GGUF format, for tests and benchmarks.

    PYTHONPATH=. python tests/make_random_checkpoint.py OUT_DIR [--shape llama-3.2-1b] [--format meta|hf|gguf]
                                           [--shards N] [--seed S]

Importable (the tests and benchmarks use it): SHAPES, random_weights(cfg, seed),
build_meta_checkpoint(path, shape, shards=1, seed=0), build_hf_checkpoint(path, shape, seed=0),
build_gguf(path, shape, seed=0, matrix_type="F32"), hf_model(weights, cfg) (transformers' reference).
Weights are float32 values that bfloat16 holds exactly, so every format stores the same numbers.
torch, transformers and gguf are test-only dependencies: only this file (and tests) import them.

Benchmark recipe (numbers in the converter's notes):
    PYTHONPATH=. python tests/make_random_checkpoint.py /tmp/r1b --shape llama-3.2-1b
    /usr/bin/time -v python convert_weights.py /tmp/r1b /tmp/r1b.q8_0.bin
"""

import argparse
import json
import os
import sys

import numpy as np

import llama31
from convert_weights import GGUF_NAMES, META_NAMES, PER_LAYER
from llama31 import Config, RopeScaling

SHAPES = {
    # tiny: every K a multiple of 32; dim < 4096, so Meta's use_scaled_rope means factor 32
    "tiny": Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128,
                   rope_theta=500000.0, max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0),
                   tie_embeddings=False),
    "llama-3.2-1b": Config(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                           rope_theta=500000.0, max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0),
                           tie_embeddings=True),
    "llama-3.2-3b": Config(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                           rope_theta=500000.0, max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0),
                           tie_embeddings=True),
    "llama-3.1-8b": Config(),
}


_ROW_PARALLEL = {"wo", "w2"}  # split on axis 1 across model-parallel shards; norms replicated; the rest axis 0


def shape_config(shape) -> Config:
    return SHAPES[shape] if isinstance(shape, str) else shape


def _bf16_round(w: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), still float32."""
    bits = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def meta_keys(cfg: Config):
    """(Meta key, our name, layer or None) for every tensor of a checkpoint of this config, in table order."""
    for name, _, _ in llama31.tensor_table(cfg):
        if name in PER_LAYER:
            for l in range(cfg.n_layers):
                yield META_NAMES[name].format(l=l), name, l
        else:
            yield META_NAMES[name], name, None


def random_weights(shape, seed: int = 0, bf16_exact: bool = True) -> dict:
    """Meta-named float32 weights of a Llama model, scaled so activations stay O(1).

    bf16_exact: round to values bfloat16 holds (what Meta/HF checkpoints store), else full float32.
    """
    cfg = shape_config(shape)
    rng = np.random.default_rng(seed)
    table = {name: s for name, s, _ in llama31.tensor_table(cfg)}
    weights = {}
    for key, name, l in meta_keys(cfg):
        s = table[name][1:] if l is not None else table[name]
        if name in ("attention_norm", "ffn_norm", "norm"):
            w = 1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)
        elif name == "tok_embeddings":
            w = rng.standard_normal(s, dtype=np.float32)
        else:  # a matrix (N, K): unit-variance outputs for unit-variance inputs; the classifier a bit sharper
            scale = (3.0 if name == "output" else 1.0) / np.sqrt(s[-1])
            w = rng.standard_normal(s, dtype=np.float32) * np.float32(scale)
        weights[key] = _bf16_round(w) if bf16_exact else w
    return weights


def shard_weights(weights: dict, cfg: Config, shards: int) -> list[dict]:
    """Meta's model-parallel split: columns (axis 0) for wq wk wv w1 w3 output tok_embeddings, rows (axis 1)
    for wo w2, norms replicated; with more shards than kv heads, shard s gets a copy of kv head s // r."""
    out = [{} for _ in range(shards)]
    names = {key: name for key, name, _ in meta_keys(cfg)}
    for key, w in weights.items():
        name = names[key]
        if w.ndim == 1:
            parts = [w] * shards
        elif name in ("wk", "wv") and shards > cfg.n_kv_heads:
            r = shards // cfg.n_kv_heads
            heads = np.split(w, cfg.n_kv_heads, axis=0)
            parts = [heads[s // r] for s in range(shards)]
        else:
            parts = np.split(w, shards, axis=1 if name in _ROW_PARALLEL else 0)
        for s, p in enumerate(parts):
            out[s][key] = p
    return out


def meta_params(cfg: Config) -> dict:
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": 256, "ffn_dim_multiplier": 1.3, "norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None}


def build_meta_checkpoint(path, shape="tiny", shards: int = 1, seed: int = 0, weights: dict | None = None,
                          params: dict | None = None) -> dict:
    """Write params.json + consolidated.NN.pth (bf16 storages, torch.save) to folder path; return the weights."""
    import torch

    cfg = shape_config(shape)
    weights = random_weights(cfg, seed) if weights is None else weights
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(meta_params(cfg) if params is None else params, f)
    for s, part in enumerate(shard_weights(weights, cfg, shards)):
        # clone: each tensor gets its own storage, as in Meta's files (a view would save its whole base)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).clone() for k, v in part.items()}
        torch.save(state, os.path.join(path, f"consolidated.{s:02d}.pth"))
    return weights


def hf_config(cfg: Config, **overrides):
    from transformers import LlamaConfig

    rope = None
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", **vars(cfg.rope_scaling)}
    kw = dict(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope,
              max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
              bos_token_id=None, eos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's wq/wk rows -> HF's rotate-half order (transformers' convert_llama_weights_to_hf `permute`)."""
    n, k = w.shape
    return w.reshape(n_heads, n // n_heads // 2, 2, k).transpose(0, 2, 1, 3).reshape(n, k)


def hf_state_dict(weights: dict, cfg: Config) -> dict:
    """The same weights under HF names, wq/wk permuted, as torch float32 tensors."""
    import torch

    rename = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
    sub = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
           "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
    out = {}
    for key, w in weights.items():
        if key in rename:
            name = rename[key]
        else:
            layer, rest = key[len("layers."):].split(".", 1)
            rest = rest[:-len(".weight")]
            name = f"model.layers.{layer}.{sub[rest]}.weight"
        if key.endswith("attention.wq.weight"):
            w = hf_permute(w, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = hf_permute(w, cfg.n_kv_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def hf_model(weights: dict, shape="tiny", attn_implementation: str = "eager"):
    """transformers' LlamaForCausalLM in float32 holding these (Meta-named) weights: the reference."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = shape_config(shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(cfg, attn_implementation=attn_implementation)).float().eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(weights, cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, f"{missing=} {unexpected=}"
    if cfg.tie_embeddings:
        model.tie_weights()
    return model


def reference_logits(model, ids) -> np.ndarray:
    """transformers' logits (T, V) float32 for one sequence of ids."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| over max |ref|: one number per comparison, insensitive to tiny reference values."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def build_hf_checkpoint(path, shape="tiny", seed: int = 0, weights: dict | None = None, dtype: str = "bf16",
                        max_shard_size: str | None = None) -> dict:
    """Write an HF folder (config.json + safetensors, sharded with an index if max_shard_size) with
    LlamaForCausalLM.save_pretrained; return the (Meta-named) weights."""
    import torch

    cfg = shape_config(shape)
    weights = random_weights(cfg, seed) if weights is None else weights
    model = hf_model(weights, cfg)
    model = model.to({"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype])
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return weights


def llama_cpp_rope_factors(cfg: Config) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for a Llama 3.1 config (convert_hf_to_gguf.py: generate_extra_tensors)."""
    rs = cfg.rope_scaling
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    factors = []
    for freq in base:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            factors.append(1 / ((1 - smooth) / rs.factor + smooth))
    return np.array(factors, dtype=np.float32)


_K_QUANT_SCALES = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}  # bytes, f16 fields


def _random_k_blocks(qtype: str, shape: tuple, seed: int) -> np.ndarray:
    """Random K-quant blocks (256 weights each) whose float16 scale fields are small and finite."""
    block_bytes, f16_at = _K_QUANT_SCALES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, block_bytes), dtype=np.uint8)
    for at in f16_at:
        d = (rng.uniform(0.5, 1.5, blocks.shape[:2]) / 64 / np.sqrt(shape[1])).astype(np.float16)
        blocks[..., at:at + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(shape[0], -1)


def build_gguf(path, shape="tiny", seed: int = 0, weights: dict | None = None, matrix_type: str = "F32",
               types: dict | None = None, rope_freqs: bool = True, tokenizer: dict | None = None,
               metadata: dict | None = None, arch: str = "llama") -> dict:
    """Write a llama GGUF with gguf.GGUFWriter (Meta's wq/wk layout, as llama.cpp writes it).

    matrix_type: ggml type of every matrix (F32 F16 BF16 Q8_0 Q4_0 Q4_1 ...); types: per-our-name overrides.
    K-quants (Q4_K Q5_K Q6_K), which gguf cannot quantize to, get random blocks instead of the weights.
    rope_freqs: store Llama 3.1 scaling as llama.cpp does (a rope_freqs.weight tensor of divisors).
    Returns the weights as the GGUF holds them: dequantized with gguf's own reference, float32.
    """
    import gguf

    cfg = shape_config(shape)
    weights = random_weights(cfg, seed) if weights is None else weights
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    if tokenizer:
        w.add_tokenizer_model(tokenizer["model"])
        w.add_tokenizer_pre(tokenizer.get("pre", "default"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_merges(tokenizer["merges"])
        w.add_token_types(tokenizer.get("token_type", [1] * len(tokenizer["tokens"])))
        if "eos" in tokenizer:
            w.add_eos_token_id(tokenizer["eos"])
    if rope_freqs and cfg.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(cfg))
    held = {}
    for key, name, l in meta_keys(cfg):
        value = weights[key]
        gname = GGUF_NAMES[name].format(l=l)
        qtype = "F32" if value.ndim == 1 else types.get(name, matrix_type)
        if qtype == "F32":
            w.add_tensor(gname, value)
            held[key] = value
        elif qtype == "F16":
            w.add_tensor(gname, value.astype(np.float16))
            held[key] = value.astype(np.float16).astype(np.float32)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            if qtype in _K_QUANT_SCALES:  # gguf can't quantize to K-quants: random blocks with sane scales
                data = _random_k_blocks(qtype, value.shape, seed)
            else:
                data = gguf.quants.quantize(value, t)
            w.add_tensor(gname, data, raw_dtype=t)
            held[key] = gguf.quants.dequantize(data, t).reshape(value.shape).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a random-weight Llama checkpoint (test/benchmark input).")
    p.add_argument("out", help="output folder (meta, hf) or file (gguf)")
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES),
                   help="model shape (default llama-3.2-1b)")
    p.add_argument("--format", default="meta", choices=["meta", "hf", "gguf"],
                   help="checkpoint format (default meta)")
    p.add_argument("--shards", type=int, default=1, help="Meta model-parallel shards (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    if args.format == "meta":
        build_meta_checkpoint(args.out, args.shape, shards=args.shards, seed=args.seed)
    elif args.format == "hf":
        build_hf_checkpoint(args.out, args.shape, seed=args.seed, max_shard_size="2GB")
    else:
        build_gguf(args.out, args.shape, seed=args.seed, matrix_type="Q8_0")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
