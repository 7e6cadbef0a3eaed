"""Shared fixtures: tiny random Llama checkpoints (Meta, HF, GGUF), their conversions, transformers' reference.

The builders live in make_random_checkpoint.py (also a script, for benchmark-sized checkpoints). Every
fixture is built once per session from a fixed seed; nothing is downloaded. Run from the repository root:
    python -m pytest tests
"""

import io
import pathlib

import pytest

import convert_weights
from make_random_checkpoint import SHAPES, build_hf_checkpoint, build_meta_checkpoint, hf_model, random_weights

TINY = SHAPES["tiny"]  # dim 64, 2 layers, 4 heads, 2 kv heads, hidden 128, vocab 256, RoPE factor 32
KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")


@pytest.fixture(scope="session")
def tiny_weights() -> dict:
    """Meta-named float32 weights (bf16-exact) of the tiny model, seed 0."""
    return random_weights(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_meta_dir(tmp_path_factory, tiny_weights) -> str:
    """A one-shard Meta checkpoint folder of the tiny model (bf16 storages, use_scaled_rope)."""
    path = tmp_path_factory.mktemp("meta") / "tiny"
    build_meta_checkpoint(path, TINY, shards=1, weights=tiny_weights)
    return str(path)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_meta_dir) -> dict:
    """The tiny Meta checkpoint converted to each weight kind: {kind: path of the llama31 file}."""
    folder = tmp_path_factory.mktemp("converted")
    files = {}
    for kind in KINDS:
        files[kind] = str(folder / f"tiny.{kind}.bin")
        convert_weights.convert(tiny_meta_dir, files[kind], quant=kind, progress=io.StringIO())
    return files


@pytest.fixture(scope="session")
def tiny_model_file(tiny_files) -> str:
    """A converted tiny model (f32 weights, no tokenizer) for tests of the loader, forward and CLI."""
    return tiny_files["f32"]


@pytest.fixture(scope="session")
def tiny_reference(tiny_weights):
    """transformers' LlamaForCausalLM (float32, eager attention, rope_type llama3) on the tiny weights."""
    pytest.importorskip("transformers")
    return hf_model(tiny_weights, TINY)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_weights) -> str:
    """The same tiny weights as an HF folder: bf16 safetensors in 3 shards with an index."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "tiny"
    build_hf_checkpoint(path, TINY, weights=tiny_weights, max_shard_size="100KB")
    return str(path)


@pytest.fixture(scope="session")
def llama3_path():
    """Meta's Llama 3 tokenizer.model as the llama-models package ships it (skips without it)."""
    llama_models = pytest.importorskip("llama_models")
    path = pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"llama-models ships no {path}")
    return path
