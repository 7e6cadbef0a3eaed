"""convert_weights: Llama checkpoints (Meta .pth, Hugging Face safetensors, GGUF) -> one flat llama31 file.

    python convert_weights.py SRC OUT [--quant f32|f16|bf16|q8_0|q4_0] [--rope-factor F] [--no-tokenizer]

Input, detected from what SRC is:
  1. Meta's original checkpoint folder: params.json + consolidated.NN.pth (+ tokenizer.model). Several
     shards are model-parallel slices, merged while streaming: column-parallel weights (wq wk wv w1 w3
     output) and the token embedding are concatenated on axis 0, row-parallel ones (wo w2) on axis 1,
     norms are replicated. This is the rule of meta-llama/llama-models `checkpoint.py: reshard_mp` and of
     tinygrad's `examples/llama3.py: concat_weights`; llama2.c's `export.py` puts tok_embeddings on
     axis 1, which is the Llama 2 rule (Llama 3 shards the embedding by vocab rows). With more shards
     than key/value heads (405B in 16 shards, 8 kv heads) each shard holds a copy of its kv head
     (reshard_mp's repeat_qk_qv): shard s holds head s // (shards / KV); the copies are checked equal.
     A .pth is a zip of a pickle and raw storages: the pickle is read by a restricted unpickler that
     accepts only torch's tensor-rebuild records (anything else is refused, so no code from the file
     ever runs) and every storage is numpy.memmap-ed at its offset in the zip; torch is not needed.
  2. A Hugging Face folder: config.json + model.safetensors or model-0000N-of-0000M.safetensors
     (+ tokenizer.json or original/tokenizer.model). HF permutes the rows of wq/wk for its rotate-half
     RoPE; the converter undoes it (the inverse of `permute` in transformers' convert_llama_weights_to_hf).
  3. A GGUF file of the llama architecture, tensors in F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K,
     the tokenizer in its metadata. GGUF keeps wq/wk in Meta's layout (llama.cpp's converter undid HF's
     permutation). A GGUF Q8_0 tensor written as q8_0, or Q4_0 as q4_0, is copied bit-exact; every other
     pair is dequantized to float32 and quantized again (Q4_1 or K-quants -> q8_0 is nearly lossless:
     q8_0's step is 1/16 of a 4-bit step).
RoPE scaling: Meta's params.json says only `use_scaled_rope`; Llama 3.1 uses factor 8, Llama 3.2 1B/3B
factor 32 (their HF config.json says so), so the factor is taken from config.json where there is one, from
the model's shape otherwise (dim >= 4096: 8, else 32), from GGUF's rope_freqs tensor, and --rope-factor
overrides it (1 = no scaling). A tokenizer is optional: without one the file runs on token ids.
Output: ONE little-endian file, written to a temporary name and renamed at the end (an interrupted
conversion never leaves a truncated file under the final name), streamed a block of rows at a time, so
memory stays bounded whatever the model size. The reader is `llama31.load_weights`; the format constants
(MAGIC, VERSION, PREAMBLE, ALIGN, GROUP_SIZE) and the ordered tensor table live in llama31.py.

File layout (version 1):

    | offset | size         | type  | field        | meaning                                                |
    | ------ | ------------ | ----- | ------------ | ------------------------------------------------------ |
    | 0      | 4            | bytes | magic        | b"LL31"                                                |
    | 4      | 4            | u32   | version      | 1; bump on any layout change (the reader refuses others) |
    | 8      | 8            | u64   | header_bytes | length of the UTF-8 JSON header that follows           |
    | 16     | header_bytes | JSON  | header       | {"config": ..., "tokenizer": ... or null, "tensors": [...]} |
    | ...    | pad          | zeros |              | up to data_offset = round_up(16 + header_bytes, 64)    |
    | ...    | ...          | raw   | tensor data  | every array starts at a multiple of 64 from file start |
    The file ends at the last array's end rounded up to 64 (zero padding): the reader checks that size.

    header["config"]: llama31.Config.to_dict(): dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim,
        norm_eps, rope_theta, max_seq_len, rope_scaling (null or {factor, low_freq_factor,
        high_freq_factor, original_max_position_embeddings}), tie_embeddings (bool: no `output` tensor,
        tok_embeddings is the classifier). head_dim is derived: dim // n_heads.
    header["tokenizer"]: tokenizer.Tokenizer.to_dict() (rebuilt by tokenizer.load), or null.
    header["tensors"]: in file order, one entry per tensor:
        {"name": "wq", "kind": "q8_0", "shape": [L, H*Dh, D],
         "arrays": [{"dtype": "int8", "shape": [L, H*Dh, D], "offset": ABSOLUTE_FILE_OFFSET, "nbytes": n},
                    {"dtype": "float16", "shape": [L, H*Dh, D // 32], "offset": ..., "nbytes": ...}]}

Weight kinds (kernels.QWeight; a matrix of logical shape (..., N, K), PyTorch Linear layout (out, in)):

    | kind | arrays                                              | element (n, k)                      |
    | ---- | --------------------------------------------------- | ----------------------------------- |
    | f32  | float32 (..., N, K)                                 | data[n, k]                          |
    | f16  | float16 (..., N, K)                                 | data[n, k]                          |
    | bf16 | uint16 (..., N, K): the bfloat16 bits               | float32 from bits (data << 16)      |
    | q8_0 | int8 (..., N, K), float16 scales (..., N, K // 32)  | scales[n, k // 32] * data[n, k]     |
    | q4_0 | uint8 (..., N, K // 2), float16 scales (as q8_0)    | scales[n, k // 32] * (nibble - 8)   |
    q4_0 packs a group of 32 into 16 bytes: byte j holds element j (low nibble) and element j + 16 (high).
    Quantized kinds use groups of G = 32 weights along K with one float16 scale: exactly ggml's Q8_0/Q4_0
    block, so GGUF tensors carry over bit-exact and the bytes per weight (1.0625 and 0.5625) equal
    llama.cpp's; 32 is also small enough that one outlier spoils few weights. kernels.quantize follows
    ggml's reference quantizers (round half away from zero). A matrix whose K is not a multiple of 32
    is stored f16, and the converter says so. Norm weights are always f32; matrices take --quant.

Tensor table (llama31.tensor_table, file order; names are Meta's; per-layer tensors are stacked on a
leading L axis; wq/wk rows in Meta's layout: RoPE rotates adjacent pairs (x[2i], x[2i+1]) of each head).
Source keys all end in ".weight"; per-layer ones start with layers.l. (Meta), model.layers.l. (HF) or
blk.l. (GGUF):

    | name           | shape         | Meta key             | HF key                        | GGUF key      |
    | -------------- | ------------- | -------------------- | ----------------------------- | ------------- |
    | tok_embeddings | (V, D)        | tok_embeddings       | model.embed_tokens            | token_embd    |
    | attention_norm | (L, D)        | attention_norm       | input_layernorm               | attn_norm     |
    | wq             | (L, H*Dh, D)  | attention.wq         | self_attn.q_proj (permuted)   | attn_q        |
    | wk             | (L, KV*Dh, D) | attention.wk         | self_attn.k_proj (permuted)   | attn_k        |
    | wv             | (L, KV*Dh, D) | attention.wv         | self_attn.v_proj              | attn_v        |
    | wo             | (L, D, H*Dh)  | attention.wo         | self_attn.o_proj              | attn_output   |
    | ffn_norm       | (L, D)        | ffn_norm             | post_attention_layernorm      | ffn_norm      |
    | w1 (gate)      | (L, F, D)     | feed_forward.w1      | mlp.gate_proj                 | ffn_gate      |
    | w2 (down)      | (L, D, F)     | feed_forward.w2      | mlp.down_proj                 | ffn_down      |
    | w3 (up)        | (L, F, D)     | feed_forward.w3      | mlp.up_proj                   | ffn_up        |
    | norm           | (D,)          | norm                 | model.norm                    | output_norm   |
    | output         | (V, D)        | output (absent: tied)| lm_head                       | output        |
    Arrays are written in table order, data before scales, each at the next multiple of 64 bytes.

Version history:
    1: first version (JSON header, absolute 64-byte-aligned offsets, kinds f32/f16/bf16/q8_0/q4_0).
"""

import argparse
import collections
import glob
import json
import math
import mmap
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

import kernels
import llama31
from kernels import QWeight
import tokenizer as tokenizers
from llama31 import ALIGN, GROUP_SIZE, MAGIC, PREAMBLE, VERSION, Config, RopeScaling

PER_LAYER = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")  # stacked on axis L
CHUNK_ELEMENTS = 1 << 23  # weights read, converted and written per step (32 MB as float32): bounds memory
QUANTS = tuple(kernels.KINDS)  # f32 f16 bf16 q8_0 q4_0

# -----------------------------------------------------------------------------
# Checkpoint tensors
# Lazy views of one weight in a source file: `shape`, `rows(a, b)` -> float32, and for GGUF `stored(kind)`.


def _row_shape(shape: tuple) -> tuple:
    """A 1-D weight is read as one row: (D,) -> (1, D)."""
    return (1, shape[0]) if len(shape) == 1 else tuple(shape)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


_NP_DTYPE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # bf16 travels as uint16 bits


class _Mapped:
    """An f32/f16/bf16 array stored at `offset` in a file, memory-mapped one block of rows at a time.

    `strides` (in elements) describe a non-contiguous view of a torch storage of `span` elements.
    """

    def __init__(self, path, offset, dtype, shape, strides=None, span=None):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)
        self.strides, self.span = strides, span

    def rows(self, a: int, b: int) -> np.ndarray:
        n, k = _row_shape(self.shape)
        dt = np.dtype(_NP_DTYPE[self.dtype])
        if self.strides is None:
            # map only rows a..b: the pages of one block are all this process ever holds of the file
            block = np.memmap(self.path, dtype=dt, mode="r", offset=self.offset + a * k * dt.itemsize,
                              shape=(b - a, k))
        else:
            storage = np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(self.span,))
            view = np.lib.stride_tricks.as_strided(
                storage, _row_shape(self.shape), [s * dt.itemsize for s in _row_shape(self.strides)])
            block = view[a:b]
        return _bf16_bits_to_f32(block) if self.dtype == "bf16" else block.astype(np.float32)

    def stored(self, kind, a, b):
        return None  # always converted from float32: exact for f32/f16/bf16 stored as themselves


class _Concat:
    """Model-parallel shards of one weight, concatenated on `axis` (0: rows, 1: columns)."""

    def __init__(self, parts, axis, where):
        shapes = [_row_shape(p.shape) for p in parts]
        other = 1 - axis
        if len({s[other] for s in shapes}) != 1:
            raise ValueError(f"{where}: shards have shapes {shapes}, which do not line up on axis {axis}; "
                             f"the shards are not slices of one model")
        self.parts, self.axis = parts, axis
        total = sum(s[axis] for s in shapes)
        self.shape = (total, shapes[0][1]) if axis == 0 else (shapes[0][0], total)

    def rows(self, a, b):
        if self.axis == 1:
            return np.concatenate([p.rows(a, b) for p in self.parts], axis=1)
        blocks, start = [], 0
        for p in self.parts:
            n = p.shape[0]
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                blocks.append(p.rows(lo - start, hi - start))
            start += n
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

    def stored(self, kind, a, b):
        return None


class _Replicated:
    """A weight every shard holds a copy of (norms; kv heads when shards outnumber them); copies must agree."""

    def __init__(self, copies, where):
        if len({tuple(c.shape) for c in copies}) != 1:
            raise ValueError(f"{where}: replicated weight has different shapes in different shards: "
                             f"{[c.shape for c in copies]}")
        self.copies, self.where, self.shape = copies, where, copies[0].shape

    def rows(self, a, b):
        first = self.copies[0].rows(a, b)
        for i, c in enumerate(self.copies[1:], 1):
            if not np.array_equal(first, c.rows(a, b)):
                raise ValueError(f"{self.where}: copy {i} differs from copy 0, but model-parallel shards must "
                                 f"hold identical copies of it; the checkpoint's shards do not belong together")
        return first

    def stored(self, kind, a, b):
        return None


class _Unpermuted:
    """An HF wq/wk with its rows put back in Meta's order (each head's pairs (2i, 2i+1) adjacent again)."""

    def __init__(self, src, n_heads):
        self.src, self.n_heads, self.shape = src, n_heads, src.shape
        self.head_dim = src.shape[0] // n_heads

    def rows(self, a, b):
        Dh = self.head_dim
        h0, h1 = a // Dh, -(-b // Dh)  # the heads rows a..b fall in
        w = self.src.rows(h0 * Dh, h1 * Dh)  # HF rows of head h: all first halves of pairs, then second halves
        # Meta row 2i + c of a head is HF row c * Dh/2 + i: the inverse of HF's
        # w.view(H, Dh // 2, 2, K).transpose(1, 2).reshape(H * Dh, K)
        w = w.reshape(h1 - h0, 2, Dh // 2, -1).transpose(0, 2, 1, 3).reshape((h1 - h0) * Dh, -1)
        return w[a - h0 * Dh:b - h0 * Dh]

    def stored(self, kind, a, b):
        return None


# -----------------------------------------------------------------------------
# Meta .pth
# params.json + consolidated.NN.pth, read without torch: a restricted unpickler over memory-mapped storages.


# The unpickler's records are immutable tuples, so a pickle's BUILD opcode cannot alter them after checks.
class _StorageType(NamedTuple):
    """What the unpickler hands out for torch.<X>Storage: only a dtype tag, nothing callable."""

    dtype: str


class _StorageRef(NamedTuple):
    dtype: str
    key: str  # the storage's entry in the zip: <archive>/data/<key>
    numel: int


class _PthTensor(NamedTuple):
    storage: _StorageRef
    storage_offset: int  # elements
    shape: tuple
    strides: tuple  # elements


def _is_int_tuple(t) -> bool:
    return isinstance(t, tuple) and all(isinstance(i, int) and i >= 0 for i in t)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor's elements are, runs nothing."""
    if not (isinstance(storage, _StorageRef) and isinstance(storage_offset, int) and storage_offset >= 0
            and _is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"malformed tensor record (size {size!r}, stride {stride!r})")
    return _PthTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stands in for torch._utils._rebuild_parameter: an nn.Parameter is just its tensor here."""
    if not isinstance(data, _PthTensor):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


# The only globals a torch.save'd state dict of bf16/f16/f32 tensors refers to.
_PTH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "BFloat16Storage"): _StorageType("bf16"),
    ("torch", "HalfStorage"): _StorageType("f16"),
    ("torch", "FloatStorage"): _StorageType("f32"),
}


class _RefusedGlobal(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict of tensors; any other global the pickle names is refused, never imported."""

    def find_class(self, module, name):
        if (module, name) not in _PTH_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return _PTH_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        # torch writes each storage as ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent record {str(pid)[:80]}")
        return _StorageRef(pid[1].dtype, pid[2], pid[4])


def _zip_data_offset(f, info: zipfile.ZipInfo, path: str) -> int:
    """Where an uncompressed zip entry's bytes start: after its local header, whose extra field torch pads."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: entry {info.filename} is compressed; torch.save stores tensors uncompressed, "
                         f"so this file was repacked: re-save it with torch.save")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: zip entry {info.filename} has no local header: corrupt or truncated file")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pth(path: str) -> dict:
    """The tensors of one torch.save'd state dict, as lazy memory-mapped arrays; torch is not imported."""
    # zipfile raises its own errors and builtin ones (RuntimeError: encrypted) on damaged archives, is_zipfile too
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a zip file: either truncated, or torch's legacy (pre-1.6) format; "
                             f"re-save it with a current torch.save")
        return _read_pth_zip(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError,
            zlib.error) as e:
        raise ValueError(f"{path}: corrupt zip archive ({type(e).__name__}: {e}); re-save it with "
                         f"torch.save") from None


def _read_pth_zip(path: str) -> dict:
    """read_pth's reading of the archive: the pickle, then where each tensor's storage starts."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the zip, found {len(pickles)}: "
                             f"not a torch.save file")
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: storages are big-endian; only little-endian checkpoints are supported")
        try:
            state = _RestrictedUnpickler(zf.open(pickles[0])).load()
        except _RefusedGlobal as e:
            if str(e).startswith("torch.") and str(e).endswith("Storage"):  # a dtype we do not read, not code
                raise ValueError(f"{path}: tensors are stored as {e}; only BFloat16Storage, HalfStorage and "
                                 f"FloatStorage are read (quantized checkpoints are not supported)") from None
            raise ValueError(
                f"{path}: refused to load: its pickle asks for {e}, which a checkpoint of bf16/f16/f32 tensors "
                f"never needs (only torch's tensor records are allowed); nothing from the file was run. Only "
                f"convert checkpoints from a source you trust") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
                KeyError, struct.error) as e:
            raise ValueError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and not any(isinstance(v, _PthTensor) for v in state.values()):
            state = state.get("model", state)  # some trainers nest the weights under "model"
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _PthTensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{path}: expected a state dict of name -> tensor, found {type(state).__name__} "
                             f"holding other things")
        offsets = {}
        tensors = {}
        for name, t in state.items():
            s = t.storage
            entry = f"{prefix}data/{s.key}"
            if entry not in offsets:
                try:
                    info = zf.getinfo(entry)
                except KeyError:
                    raise ValueError(f"{path}: tensor {name}: storage {entry} is missing from the zip") from None
                offsets[entry] = (_zip_data_offset(f, info, path), info.file_size)
            data_offset, entry_size = offsets[entry]
            itemsize = np.dtype(_NP_DTYPE[s.dtype]).itemsize
            extent = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.strides)) + 1
            if s.numel * itemsize > entry_size or (math.prod(t.shape) and extent > s.numel):
                raise ValueError(f"{path}: tensor {name} reaches past its storage ({entry_size} bytes): "
                                 f"corrupt or truncated checkpoint")
            contiguous = all(t.strides[i] == math.prod(t.shape[i + 1:]) for i in range(len(t.shape))
                             if t.shape[i] > 1)
            if contiguous:
                tensors[name] = _Mapped(path, data_offset + t.storage_offset * itemsize, s.dtype, t.shape)
            else:
                tensors[name] = _Mapped(path, data_offset + t.storage_offset * itemsize, s.dtype, t.shape,
                                        strides=t.strides, span=s.numel - t.storage_offset)
    return tensors


_META_KEYS = {  # params.json keys this converter understands (Llama 3 / 3.1 / 3.2 text models)
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}
META_NAMES = {
    "tok_embeddings": "tok_embeddings.weight", "attention_norm": "layers.{l}.attention_norm.weight",
    "wq": "layers.{l}.attention.wq.weight", "wk": "layers.{l}.attention.wk.weight",
    "wv": "layers.{l}.attention.wv.weight", "wo": "layers.{l}.attention.wo.weight",
    "ffn_norm": "layers.{l}.ffn_norm.weight", "w1": "layers.{l}.feed_forward.w1.weight",
    "w2": "layers.{l}.feed_forward.w2.weight", "w3": "layers.{l}.feed_forward.w3.weight",
    "norm": "norm.weight", "output": "output.weight"}


def _merge_shards(shards: list[dict], n_kv_heads: int, where: str) -> dict:
    """One lazy tensor per key from model-parallel shards (see the module docstring for the rule)."""
    if len(shards) == 1:
        return shards[0]
    keys = list(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            raise ValueError(f"{where}: shard {i} has other tensors than shard 0 (e.g. "
                             f"{sorted(set(s) ^ set(keys))[:3]}); the shards do not belong together")
    n = len(shards)
    merged = {}
    for key in keys:
        parts = [s[key] for s in shards]
        at = f"{where}: {key}"
        if len(parts[0].shape) == 1:  # norms (and Llama 2's rope.freqs): every shard holds all of it
            merged[key] = _Replicated(parts, at)
        elif key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):  # row-parallel: split columns
            merged[key] = _Concat(parts, 1, at)
        elif key.endswith(("attention.wk.weight", "attention.wv.weight")) and n > n_kv_heads:
            # more shards than kv heads: shard s holds a copy of kv head s // r (llama-models' repeat_qk_qv)
            if n % n_kv_heads:
                raise ValueError(f"{at}: {n} shards cannot share {n_kv_heads} kv heads evenly")
            r = n // n_kv_heads
            merged[key] = _Concat([_Replicated(parts[i * r:(i + 1) * r], at) for i in range(n_kv_heads)], 0, at)
        else:  # column-parallel (wq wk wv w1 w3 output) and the vocab-parallel embedding: split rows
            merged[key] = _Concat(parts, 0, at)
    return merged


def read_meta_checkpoint(folder: str, notices: list) -> tuple[Config, dict, str | None]:
    """Config, tensors (Meta names) and tokenizer path of a params.json + consolidated.*.pth folder."""
    where = os.path.join(folder, "params.json")
    params = _read_json(where)
    unknown = sorted(set(params) - _META_KEYS)
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not part of a Llama 3.x text model (MoE, vision and "
                         f"quantized checkpoints are not supported); known keys: {sorted(_META_KEYS)}")
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not paths:
        raise FileNotFoundError(f"{folder}: has params.json but no consolidated.NN.pth weights")
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    tensors = _merge_shards([read_pth(p) for p in paths], n_kv_heads, folder)
    for key in (META_NAMES["tok_embeddings"], "layers.0.feed_forward.w1.weight"):
        if key not in tensors:
            raise ValueError(f"{paths[0]}: tensor {key} is missing: not a Llama checkpoint")
    vocab_size = tensors[META_NAMES["tok_embeddings"]].shape[0]
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ValueError(f"{where}: vocab_size {params['vocab_size']} but tok_embeddings has {vocab_size} rows")
    rope_scaling = None
    if params.get("use_scaled_rope"):
        factor = 8.0 if params["dim"] >= 4096 else 32.0
        rope_scaling = RopeScaling(factor=factor)
        notices.append(f"params.json says use_scaled_rope but not the factor: using {factor:g} "
                       f"(Llama 3.1 uses 8; 3.2 1B/3B, dim < 4096, use 32); --rope-factor overrides it")
    cfg = _config(where, dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab_size, hidden_dim=tensors["layers.0.feed_forward.w1.weight"].shape[0],
                  norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                  max_seq_len=params.get("max_seq_len") or (131072 if rope_scaling else 8192),
                  rope_scaling=rope_scaling, tie_embeddings=META_NAMES["output"] not in tensors)
    out = _gather(tensors, META_NAMES, cfg, folder, ignore={"rope.freqs"})  # rope.freqs: Llama 2's table
    tok = os.path.join(folder, "tokenizer.model")
    return cfg, out, tok if os.path.isfile(tok) else None


# -----------------------------------------------------------------------------
# Hugging Face safetensors
# config.json + *.safetensors: a little-endian u64 header length, a JSON header, then raw arrays.

_SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
HF_NAMES = {
    "tok_embeddings": "model.embed_tokens.weight", "attention_norm": "model.layers.{l}.input_layernorm.weight",
    "wq": "model.layers.{l}.self_attn.q_proj.weight", "wk": "model.layers.{l}.self_attn.k_proj.weight",
    "wv": "model.layers.{l}.self_attn.v_proj.weight", "wo": "model.layers.{l}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{l}.post_attention_layernorm.weight",
    "w1": "model.layers.{l}.mlp.gate_proj.weight", "w2": "model.layers.{l}.mlp.down_proj.weight",
    "w3": "model.layers.{l}.mlp.up_proj.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}


def read_safetensors(path: str) -> dict:
    """The tensors of one .safetensors file as lazy memory-mapped arrays."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: header length {n} does not fit the {size}-byte file: not safetensors, "
                             f"or truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} is {t.get('dtype')}; supported: "
                             f"{sorted(_SAFETENSORS_DTYPES)} (quantized HF checkpoints are not)")
        dtype = _SAFETENSORS_DTYPES[t["dtype"]]
        begin, end = t["data_offsets"]
        if end - begin != math.prod(t["shape"]) * np.dtype(_NP_DTYPE[dtype]).itemsize or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name}: bytes {begin}..{end} do not match shape {t['shape']} "
                             f"or lie past the end of the file: corrupt or truncated")
        tensors[name] = _Mapped(path, 8 + n + begin, dtype, t["shape"])
    return tensors


def _hf_rope(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and Llama 3.1 scaling from config.json (hub: rope_scaling; transformers 5: rope_parameters)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{where}: rope type {kind!r} is not supported (only Llama 3.1's 'llama3' scaling "
                         f"or none)")
    return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def read_hf_checkpoint(folder: str, notices: list) -> tuple[Config, dict, str | None]:
    """Config, tensors (un-permuted to Meta's layout) and tokenizer path of an HF Llama folder."""
    where = os.path.join(folder, "config.json")
    hf = _read_json(where)
    if hf.get("model_type") != "llama":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r}; only 'llama' models are supported")
    for key, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                       ("quantization_config", None), ("num_local_experts", None)):
        if hf.get(key, plain) != plain:
            raise ValueError(f"{where}: {key} = {hf[key]!r} is not supported (a Llama 3 model has {plain!r})")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                         f"({dim // n_heads}); such models are not supported")
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"{folder}: has config.json but no *.safetensors weights (.bin pickles are "
                                f"not read: convert them with transformers' save_pretrained first)")
    tensors = {}
    for p in paths:
        for name, t in read_safetensors(p).items():
            if name in tensors:
                raise ValueError(f"{folder}: tensor {name} is in two safetensors files")
            tensors[name] = t
    theta, rope_scaling = _hf_rope(hf, where)
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    tied = hf.get("tie_word_embeddings")  # absent: tied if there is no lm_head (untied but missing: an error)
    tied = HF_NAMES["output"] not in tensors if tied is None else bool(tied)
    cfg = _config(where, dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=hf["vocab_size"], hidden_dim=hf["intermediate_size"],
                  norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=theta,
                  max_seq_len=hf.get("max_position_embeddings", 8192), rope_scaling=rope_scaling,
                  tie_embeddings=tied)
    ignore = {HF_NAMES["output"]} if tied else set()  # a tied lm_head saved anyway is the embedding again
    ignore |= {f"model.layers.{l}.self_attn.rotary_emb.inv_freq" for l in range(cfg.n_layers)}  # old HF
    out = _gather(tensors, HF_NAMES, cfg, folder, ignore=ignore)
    out["wq"] = [_Unpermuted(t, n_heads) for t in out["wq"]]
    out["wk"] = [_Unpermuted(t, n_kv_heads) for t in out["wk"]]
    tok = None
    for name in ("tokenizer.json", os.path.join("original", "tokenizer.model"), "tokenizer.model"):
        if os.path.isfile(os.path.join(folder, name)):
            tok = os.path.join(folder, name)
            break
    return cfg, out, tok


# -----------------------------------------------------------------------------
# GGUF
# llama.cpp's single-file format: header, typed metadata, tensor infos, then aligned tensor data.

GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _ggml_f16(blocks, start):
    """The float16 at bytes start..start+2 of every block, as float32 (..., 1)."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs):
    """(..., 16) bytes -> (..., 32): element j is byte j's low nibble, element j+16 its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _dequant_q8_0(b):  # block of 32: f16 d, 32 x int8
    return _ggml_f16(b, 0) * b[..., 2:].view(np.int8)


def _dequant_q4_0(b):  # block of 32: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    return _ggml_f16(b, 0) * (_nibbles(b[..., 2:]).astype(np.float32) - 8)


def _dequant_q4_1(b):  # block of 32: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
    return _ggml_f16(b, 0) * _nibbles(b[..., 4:]) + _ggml_f16(b, 2)


def _dequant_q5_0(b):  # block of 32: f16 d, u32 of fifth bits, 16 bytes of nibbles; x = d * (q - 16)
    high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little")  # (..., 32): bit j belongs to element j
    return _ggml_f16(b, 0) * ((_nibbles(b[..., 6:]) | (high << 4)).astype(np.float32) - 16)


def _dequant_q5_1(b):  # block of 32: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles; x = d * q + m
    high = np.unpackbits(b[..., 4:8], axis=-1, bitorder="little")
    return _ggml_f16(b, 0) * (_nibbles(b[..., 8:]) | (high << 4)) + _ggml_f16(b, 2)


def _k_scales(s):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32)[..., None], mn.astype(np.float32)[..., None]  # (..., 8, 1)


def _dequant_q4_k(b):  # block of 256 = 8 x 32: f16 d, f16 dmin, 12 bytes scales, 128 bytes nibbles
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)  # 32 bytes hold sub-blocks 2c (low) and 2c+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    x = _ggml_f16(b, 0)[..., None] * sc * q - _ggml_f16(b, 2)[..., None] * mn
    return x.reshape(*b.shape[:-1], 256)


def _dequant_q5_k(b):  # block of 256: f16 d, f16 dmin, 12 bytes scales, 32 bytes fifth bits, 128 bytes nibbles
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # bit i: sub-block i
    x = _ggml_f16(b, 0)[..., None] * sc * (q | ((qh & 1) << 4)) - _ggml_f16(b, 2)[..., None] * mn
    return x.reshape(*b.shape[:-1], 256)


def _dequant_q6_k(b):  # block of 256: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, f16 d
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64)  # two halves of 128 elements
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 32)
    low = np.concatenate([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], -1)
    high = np.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=-1)
    q = ((low | (high << 4)).astype(np.float32) - 32).reshape(*b.shape[:-1], 16, 16)
    scales = b[..., 192:208].view(np.int8).astype(np.float32)[..., None]  # one per 16 elements
    return (_ggml_f16(b, 208)[..., None] * scales * q).reshape(*b.shape[:-1], 256)


# ggml type id: (name, weights per block, bytes per block, dequantize (..., blocks, bytes) -> (..., blocks, w))
_GGML_TYPES = {
    0: ("F32", 1, 4, None), 1: ("F16", 1, 2, None), 30: ("BF16", 1, 2, None),
    2: ("Q4_0", 32, 18, _dequant_q4_0), 3: ("Q4_1", 32, 20, _dequant_q4_1), 6: ("Q5_0", 32, 22, _dequant_q5_0),
    7: ("Q5_1", 32, 24, _dequant_q5_1), 8: ("Q8_0", 32, 34, _dequant_q8_0), 12: ("Q4_K", 256, 144, _dequant_q4_k),
    13: ("Q5_K", 256, 176, _dequant_q5_k), 14: ("Q6_K", 256, 210, _dequant_q6_k)}
_GGML_PLAIN = {0: "f32", 1: "f16", 30: "bf16"}
_GGML_EXACT = {(8, "q8_0"), (2, "q4_0")}  # ggml blocks that are our kinds byte for byte (d, then the quants)


class _GGUFTensor:
    """A GGUF tensor (rows of ggml blocks) at `offset`, mapped one block of rows at a time."""

    def __init__(self, path, offset, ggml_type, shape):
        self.path, self.offset, self.type, self.shape = path, offset, ggml_type, tuple(shape)
        _, self.block, self.block_bytes, self.dequant = _GGML_TYPES[ggml_type]

    def _raw(self, a, b):
        n, k = _row_shape(self.shape)
        row_bytes = k // self.block * self.block_bytes
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset + a * row_bytes,
                        shape=(b - a, k // self.block, self.block_bytes))
        return np.array(raw)  # copy, so the map is released when this block is done

    def rows(self, a, b):
        if self.type in _GGML_PLAIN:
            return _Mapped(self.path, self.offset, _GGML_PLAIN[self.type], self.shape).rows(a, b)
        raw = self._raw(a, b)
        return self.dequant(raw).reshape(b - a, -1).astype(np.float32)

    def stored(self, kind, a, b):
        """The rows as a QWeight of `kind` if this tensor already is that kind byte for byte, else None."""
        if (self.type, kind) not in _GGML_EXACT:
            return None
        raw = self._raw(a, b)  # (rows, K // 32, block bytes): f16 scale, then the 32 quants
        scales = np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0]
        data = np.ascontiguousarray(raw[..., 2:]).reshape(b - a, -1)
        return QWeight(data.view(np.int8) if kind == "q8_0" else data, scales)


class _Reader:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: GGUF header ends early at byte {self.pos}: truncated file")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self):
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: GGUF string of {n} bytes at byte {self.pos} runs past the end")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: GGUF string at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype):
        if vtype in _GGUF_SCALARS:
            v = self.take(_GGUF_SCALARS[vtype])
            return float(str(np.float32(v))) if vtype == 6 else v  # f32 as written, e.g. 1e-05 not 9.99e-06
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _GGUF_SCALARS and etype != 7:
                dt = np.dtype(_GGUF_SCALARS[etype])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise ValueError(f"{self.path}: GGUF array at byte {self.pos} runs past the end")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}: corrupt file")


def read_gguf(path: str) -> tuple[dict, dict]:
    """(metadata dict, tensors by GGUF name as lazy _GGUFTensor) of a GGUF v2/v3 file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm, path)
        magic, version = r.take("<4s"), r.take("<I")
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}{' (big-endian file?)' if version > 0xFFFF else ''}; "
                             f"versions 2 and 3, little-endian, are supported")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.take("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"{path}: tensor {name} has {n_dims} dimensions: corrupt GGUF")
            dims = [r.take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, r.take("<I"), r.take("<Q")))
        header_end = r.pos
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a positive multiple of 8")
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in _GGML_TYPES:
            raise ValueError(f"{path}: tensor {name} has ggml type {ggml_type}, not one this converter reads "
                             f"({', '.join(t[0] for t in _GGML_TYPES.values())}); requantize the GGUF to Q8_0 "
                             f"with llama.cpp's llama-quantize, or convert from the HF checkpoint")
        tname, block, block_bytes, _ = _GGML_TYPES[ggml_type]
        shape = tuple(reversed(dims))  # GGUF lists the innermost (contiguous) dimension first
        if shape[-1] % block:
            raise ValueError(f"{path}: tensor {name} {shape}: rows of {shape[-1]} are not whole {tname} blocks")
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > size:
            raise ValueError(f"{path}: tensor {name} ends at byte {data_start + offset + nbytes} but the file has "
                             f"{size}: truncated GGUF")
        tensors[name] = _GGUFTensor(path, data_start + offset, ggml_type, shape)
    return meta, tensors


GGUF_NAMES = {
    "tok_embeddings": "token_embd.weight", "attention_norm": "blk.{l}.attn_norm.weight",
    "wq": "blk.{l}.attn_q.weight", "wk": "blk.{l}.attn_k.weight", "wv": "blk.{l}.attn_v.weight",
    "wo": "blk.{l}.attn_output.weight", "ffn_norm": "blk.{l}.ffn_norm.weight", "w1": "blk.{l}.ffn_gate.weight",
    "w2": "blk.{l}.ffn_down.weight", "w3": "blk.{l}.ffn_up.weight", "norm": "output_norm.weight",
    "output": "output.weight"}


def _rope_scaling_from_factors(factors: np.ndarray, cfg_plain: Config, where: str) -> RopeScaling:
    """The Llama 3.1 RopeScaling whose per-frequency divisors are llama.cpp's rope_freqs tensor."""
    base = llama31.rope_frequencies(cfg_plain)
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        rs = RopeScaling(factor=factor)
        scaled = llama31.rope_frequencies(Config(**{**vars(cfg_plain), "rope_scaling": rs}))
        if factors.shape == base.shape and np.allclose(factors, base / scaled, rtol=1e-3):
            return rs
    raise ValueError(f"{where}: rope_freqs.weight (first {np.round(factors[:3], 4).tolist()}, last "
                     f"{np.round(factors[-3:], 4).tolist()}) matches no Llama 3.1 scaling (factor 8 or 32, low 1, "
                     f"high 4, original 8192); pass --rope-factor to choose one")


def read_gguf_checkpoint(path: str, notices: list,
                         rope_factor: float | None = None) -> tuple[Config, dict, dict | None]:
    """Config, tensors and tokenizer metadata of a llama-architecture GGUF file (rope_factor: --rope-factor)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    if meta.get("llama.expert_count", 0):
        raise ValueError(f"{path}: a mixture-of-experts model ({meta['llama.expert_count']} experts): "
                         f"not supported")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type = {scaling_type!r} is not supported (Llama 3.1's "
                         f"scaling is stored as a rope_freqs tensor)")
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length",
                "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon"):
        if key not in meta:
            raise ValueError(f"{path}: metadata key {key} is missing: not a complete llama GGUF")
    for name in ("token_embd.weight", "blk.0.ffn_gate.weight"):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name} is missing: not a complete llama GGUF")
    dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if meta.get(key, head_dim) != head_dim:
            raise ValueError(f"{path}: {key} = {meta[key]} but embedding_length / head_count = {head_dim}; "
                             f"models with a separate head size are not supported")
    fields = dict(dim=dim, n_layers=meta["llama.block_count"], n_heads=n_heads,
                  n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
                  vocab_size=tensors["token_embd.weight"].shape[0],
                  hidden_dim=tensors["blk.0.ffn_gate.weight"].shape[0],
                  norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
                  rope_theta=meta.get("llama.rope.freq_base", 10000.0),
                  max_seq_len=meta.get("llama.context_length", 8192), rope_scaling=None,
                  tie_embeddings="output.weight" not in tensors)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    if rope_freqs is not None and rope_factor is None:  # with --rope-factor, convert() sets the scaling
        plain = _config(path, **fields)
        fields["rope_scaling"] = _rope_scaling_from_factors(rope_freqs.rows(0, 1)[0], plain, path)
    cfg = _config(path, **fields)
    tok = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return cfg, _gather(tensors, GGUF_NAMES, cfg, path), tok if "tokenizer.ggml.model" in tok else None


# -----------------------------------------------------------------------------
# Reading any source
# Detect the kind of SRC, then return one Checkpoint: config, tensors per table name, tokenizer source.


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _config(where: str, **fields) -> Config:
    try:
        return Config(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: unsupported model configuration: {e}") from None


def _gather(available: dict, names: dict, cfg: Config, where: str, ignore=()) -> dict:
    """Per table name, the list of source tensors (one per layer for PER_LAYER names), checked complete."""
    out, used = {}, set()
    for name, shape, _ in llama31.tensor_table(cfg):
        keys = [names[name].format(l=l) for l in range(cfg.n_layers)] if name in PER_LAYER else [names[name]]
        missing = [k for k in keys if k not in available]
        if missing:
            raise ValueError(f"{where}: tensor {missing[0]} is missing"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the config "
                             f"implies {len(keys)} tensors for {name}: incomplete checkpoint")
        expected = shape[1:] if name in PER_LAYER else shape
        for k in keys:
            if tuple(available[k].shape) != tuple(expected):
                raise ValueError(f"{where}: tensor {k} has shape {tuple(available[k].shape)}, the config implies "
                                 f"{tuple(expected)}")
        out[name] = [available[k] for k in keys]
        used.update(keys)
    extra = sorted(set(available) - used - set(ignore))
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                         f"({len(extra)} in all): not a plain Llama checkpoint (biases, adapters, "
                         f"vision or MoE weights are not supported)")
    return out


def read_checkpoint(src: str, notices: list, rope_factor: float | None = None) -> tuple[Config, dict, object, str]:
    """(config, tensors, tokenizer source, description) of a Meta folder, an HF folder or a GGUF file."""
    try:
        if os.path.isdir(src):
            if os.path.isfile(os.path.join(src, "config.json")):
                return (*read_hf_checkpoint(src, notices), "Hugging Face safetensors")
            if os.path.isfile(os.path.join(src, "params.json")):
                n = len(glob.glob(os.path.join(src, "consolidated.*.pth")))
                return (*read_meta_checkpoint(src, notices), f"Meta .pth, {n} shard{'s' * (n != 1)}")
        elif os.path.isfile(src):
            with open(src, "rb") as f:
                if f.read(4) == GGUF_MAGIC:
                    return (*read_gguf_checkpoint(src, notices, rope_factor), "GGUF")
        elif not os.path.exists(src):
            raise FileNotFoundError(f"{src}: no such file or folder")
    except KeyError as e:  # a required config key or metadata entry
        raise ValueError(f"{src}: the model's config lacks the required key {e}") from None
    raise ValueError(f"{src}: not a checkpoint this converter reads: give a Meta folder (params.json + "
                     f"consolidated.NN.pth), a Hugging Face folder (config.json + *.safetensors) or a .gguf file")


def _with_rope_factor(cfg: Config, factor: float) -> Config:
    """--rope-factor: Llama 3.1 scaling with this factor (other constants kept); 1 means no scaling."""
    base = vars(cfg.rope_scaling or RopeScaling())
    rs = None if factor == 1 else RopeScaling(**{**base, "factor": float(factor)})
    return Config(**{**vars(cfg), "rope_scaling": rs})


def _load_tokenizer(source, where: str, vocab_size: int, notices: list) -> dict | None:
    """The tokenizer's to_dict() for the header, or None (with a notice): the file then runs on token ids."""
    if source is None:
        notices.append(f"{where} has no tokenizer (tokenizer.model, tokenizer.json or GGUF tokenizer.*): "
                       f"the output file runs on token ids")
        return None
    try:
        tok = tokenizers.load(source)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: cannot read the tokenizer ({e}); pass --no-tokenizer to convert without "
                         f"one (the file then runs on token ids)") from None
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} "
                         f"embeddings: they do not belong together; pass --no-tokenizer to convert without it")
    return tok.to_dict()


# -----------------------------------------------------------------------------
# Writing
# Plan the whole tensor table (kinds, shapes, offsets) from the config first, write preamble + header, then
# stream every tensor into its precomputed place, a block of rows at a time.


def plan_tensors(cfg: Config, quant: str, notices: list) -> list[dict]:
    """Header entries in file order (offsets still 0): kind, shape and arrays of every tensor."""
    entries = []
    for name, shape, is_matrix in llama31.tensor_table(cfg):
        kind = quant if is_matrix else "f32"
        if kind in kernels.QUANTIZED and shape[-1] % GROUP_SIZE:
            notices.append(f"{name} {shape}: inner size {shape[-1]} is not a multiple of the group size "
                           f"{GROUP_SIZE}, so it is stored f16 instead of {quant}")
            kind = "f16"
        arrays = [{"dtype": dtype, "shape": list(arr_shape), "offset": 0,
                   "nbytes": math.prod(arr_shape) * np.dtype(dtype).itemsize}
                  for dtype, arr_shape in kernels.array_layout(kind, shape, GROUP_SIZE)]
        entries.append({"name": name, "kind": kind, "shape": list(shape), "arrays": arrays})
    return entries


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build_header(cfg: Config, tokenizer: dict | None, entries: list[dict]) -> tuple[bytes, int]:
    """(preamble + JSON header + zero padding, file size), with every array's absolute offset filled in."""
    data_offset = ALIGN
    while True:  # offsets are in the header, whose length moves them: iterate to the fixed point (2-3 rounds)
        offset = data_offset
        for entry in entries:
            for arr in entry["arrays"]:
                arr["offset"] = offset
                offset = _round_up(offset + arr["nbytes"])
        header = json.dumps({"config": cfg.to_dict(), "tokenizer": tokenizer, "tensors": entries},
                            ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        needed = _round_up(struct.calcsize(PREAMBLE) + len(header))
        if needed == data_offset:
            break
        data_offset = needed
    head = struct.pack(PREAMBLE, MAGIC, VERSION, len(header)) + header
    return head + bytes(data_offset - len(head)), offset


class _Progress:
    """One line per tensor on a text stream: tensors done, bytes, rate, ETA; None stays silent."""

    def __init__(self, stream, total_bytes):
        self.stream, self.total, self.done, self.start = stream, total_bytes, 0, time.perf_counter()

    def say(self, text):
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def tensor(self, i, n, entry, err):
        """err: None for a bit-exact copy, else (max abs error, max |w|) of the tensor's conversion."""
        self.done += sum(a["nbytes"] for a in entry["arrays"])
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        if err is None:
            quality = "copied bit-exact"
        else:  # the conversion's max abs error, and as a fraction of the tensor's largest weight
            quality = f"max err {err[0]:.1e} ({100 * err[0] / max(err[1], 1e-30):.2f}%)"
        self.say(f"[{i + 1:2d}/{n}] {entry['name']:<14} {str(tuple(entry['shape'])):<20} {entry['kind']:<4} "
                 f"{quality:<24}| {self.done / 1e6:8.1f} / {self.total / 1e6:.1f} MB {rate / 1e6:6.1f} MB/s "
                 f"ETA {eta:4.0f} s")


def write_tensors(f, entries: list[dict], tensors: dict, progress: _Progress):
    """Stream each tensor into its planned arrays; per tensor, report the max abs error of the conversion."""
    for i, entry in enumerate(entries):
        kind, err, amax, copied = entry["kind"], 0.0, 0.0, True
        for l, src in enumerate(tensors[entry["name"]]):  # one source per layer (or one for the whole tensor)
            n, k = _row_shape(src.shape)
            step = max(1, CHUNK_ELEMENTS // k)
            for a in range(0, n, step):
                b = min(n, a + step)
                q = src.stored(kind, a, b)
                if q is None:
                    w = src.rows(a, b)  # (b - a, K) float32
                    q = kernels.quantize(w, kind, GROUP_SIZE)
                    block_err = float(np.max(np.abs(kernels.dequantize(q) - w)))
                    if not math.isfinite(block_err):
                        raise ValueError(f"tensor {entry['name']} (layer {l}, rows {a}..{b}) holds NaN or inf "
                                         f"values: the checkpoint is damaged")
                    err, amax, copied = max(err, block_err), max(amax, float(np.max(np.abs(w)))), False
                for arr, part in zip(entry["arrays"], (q.data, q.scales)):
                    assert part.dtype == arr["dtype"] and part.shape == (b - a, arr["shape"][-1]), \
                        f"{entry['name']}: {part.dtype=} {part.shape=} for {arr=}"
                    row_bytes = arr["shape"][-1] * part.itemsize  # one row of this array
                    f.seek(arr["offset"] + (l * n + a) * row_bytes)
                    f.write(np.ascontiguousarray(part).data)
        progress.tensor(i, len(entries), entry, None if copied else (err, amax))


def write_model(out: str, cfg: Config, tokenizer: dict | None, entries: list[dict], tensors: dict,
                progress: _Progress | None = None):
    """Write the file under a temporary name beside OUT and rename it at the end (atomic on POSIX).
    progress: None writes silently."""
    progress = progress or _Progress(None, 0)
    head, size = build_header(cfg, tokenizer, entries)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise IsADirectoryError(f"{out}: is a folder; give the output file's name, e.g. {out}/model.q8_0.bin")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{out}: folder {folder} does not exist")
    free = shutil.disk_usage(folder).free
    if free < size:
        raise OSError(f"{out}: needs {size / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            f.truncate(size)  # the file has its final size from the start; tensors fill it in
            write_tensors(f, entries, tensors, progress)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is an ordinary file
        os.replace(tmp, out)
    except BaseException:  # including KeyboardInterrupt: never leave a partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert(src: str, out: str, quant: str = "q8_0", rope_factor: float | None = None, progress=None,
            tokenizer: bool = True) -> Config:
    """Convert a Meta folder, HF folder or GGUF file at src into one llama31 model file at out.

    Args:
        quant: kind of the weight matrices: f32, f16, bf16, q8_0 or q4_0 (norms are always f32).
        rope_factor: Llama 3.1 RoPE scaling factor to record instead of the detected one (1: none).
        progress: text stream for notices and progress lines (None: sys.stderr); io.StringIO() to silence.
        tokenizer: embed the checkpoint's tokenizer if it has one (False: the file runs on token ids).
    Returns the model's Config as written.
    """
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not one of {list(QUANTS)}")
    if rope_factor is not None and not rope_factor >= 1:
        raise ValueError(f"rope factor {rope_factor} must be >= 1 (1 = no scaling)")
    start = time.perf_counter()
    report = _Progress(sys.stderr if progress is None else progress, 0)
    notices = []
    cfg, tensors, tok_source, description = read_checkpoint(os.fspath(src), notices, rope_factor)
    if rope_factor is not None:
        cfg = _with_rope_factor(cfg, rope_factor)
        notices.append(f"--rope-factor {rope_factor:g}: rope_scaling = {cfg.rope_scaling}")
    if tokenizer:
        tok = _load_tokenizer(tok_source, src, cfg.vocab_size, notices)
    else:
        tok = None
        notices.append("no tokenizer embedded, as asked: the output file runs on token ids")
    entries = plan_tensors(cfg, quant, notices)
    report.total = sum(a["nbytes"] for e in entries for a in e["arrays"])
    report.say(f"{src}: {description}; {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}, "
               f"rope scaling {cfg.rope_scaling.factor if cfg.rope_scaling else 'none'} -> {quant}")
    for text in notices:
        report.say(f"notice: {text}")
    write_model(os.fspath(out), cfg, tok, entries, tensors, report)
    report.say(f"wrote {out}: {os.path.getsize(out) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    return cfg


# -----------------------------------------------------------------------------
# CLI
# `python convert_weights.py SRC OUT`: errors as one `error: ...` line on stderr and exit code 1.


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_weights", description="Convert a Llama checkpoint (Meta .pth folder, Hugging Face "
        "safetensors folder, or GGUF file) into one llama31 model file.",
        epilog="example: python convert_weights.py ~/models/Meta-Llama-3.1-8B-Instruct llama31-8b.q8_0.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Meta folder (params.json + consolidated.NN.pth), HF folder (config.json + "
                   "*.safetensors) or a .gguf file")
    p.add_argument("out", help="the model file to write (replaced atomically if it exists)")
    p.add_argument("--quant", choices=QUANTS, default="q8_0", help="kind of the weight matrices (default q8_0: "
                   "int8 with one f16 scale per 32 weights; q4_0: 4-bit; f32/f16/bf16: unquantized)")
    p.add_argument("--rope-factor", type=float, help="Llama 3.1 RoPE scaling factor, >= 1, overriding the "
                   "detected one (Llama 3.1: 8, Llama 3.2 1B/3B: 32; 1 = no scaling)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not embed the tokenizer (the file then "
                   "runs on token ids)")
    args = p.parse_args(argv)
    if args.rope_factor is not None and not args.rope_factor >= 1:
        p.error(f"--rope-factor must be >= 1, got {args.rope_factor}")
    try:
        convert(args.src, args.out, quant=args.quant, rope_factor=args.rope_factor, progress=sys.stderr,
                tokenizer=not args.no_tokenizer)
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
