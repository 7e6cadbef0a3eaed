"""The flat model file: converter -> loader round trip, the layout rules, and bad files.

A bad file (truncated, wrong magic, newer version, missing tensor, a header that lies about sizes) must
give one line naming the problem, from llama31.load_weights and from the CLI: never a traceback, a
segfault or garbage output.
"""

import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import convert_weights
import kernels
import llama31
from conftest import KINDS, TINY
from make_random_checkpoint import meta_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE_SIZE = struct.calcsize(llama31.PREAMBLE)


def _layer_weights(weights: dict, name: str) -> np.ndarray:
    """Our stacked tensor `name` from the Meta-named weights: (L, ...) for layer tensors, else as is."""
    keys = [key for key, n, _ in meta_keys(TINY) if n == name]
    return np.stack([weights[k] for k in keys]) if name in convert_weights.PER_LAYER else weights[keys[0]]


# -----------------------------------------------------------------------------
# Round trip and layout


@pytest.mark.parametrize("kind", KINDS)
def test_layout_follows_the_spec(kind, tiny_files):
    path = tiny_files[kind]
    raw = open(path, "rb").read()
    magic, version, header_bytes = struct.unpack(llama31.PREAMBLE, raw[:PREAMBLE_SIZE])
    assert (magic, version) == (b"LL31", 1)
    header = json.loads(raw[PREAMBLE_SIZE:PREAMBLE_SIZE + header_bytes])
    assert set(header) == {"config", "tokenizer", "tensors"} and header["tokenizer"] is None
    assert llama31.Config.from_dict(header["config"]) == TINY
    data_offset = -(-(PREAMBLE_SIZE + header_bytes) // 64) * 64
    assert raw[PREAMBLE_SIZE + header_bytes:data_offset] == bytes(data_offset - PREAMBLE_SIZE - header_bytes)
    table = llama31.tensor_table(TINY)
    assert [e["name"] for e in header["tensors"]] == [name for name, _, _ in table]
    position = data_offset
    for entry, (name, shape, is_matrix) in zip(header["tensors"], table):
        assert entry["shape"] == list(shape)
        assert entry["kind"] == (kind if is_matrix else "f32")
        layout = kernels.array_layout(entry["kind"], shape, llama31.GROUP_SIZE)
        assert [(a["dtype"], tuple(a["shape"])) for a in entry["arrays"]] == layout
        for arr in entry["arrays"]:
            assert arr["offset"] % 64 == 0 and arr["offset"] >= position, f"{name} overlaps or is misaligned"
            assert arr["nbytes"] == int(np.prod(arr["shape"])) * np.dtype(arr["dtype"]).itemsize
            position = arr["offset"] + arr["nbytes"]
    assert len(raw) == -(-position // 64) * 64


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_values(kind, tiny_files, tiny_weights):
    cfg, tokenizer, w = llama31.load_weights(tiny_files[kind])
    assert cfg == TINY and tokenizer is None
    for name, _, is_matrix in llama31.tensor_table(cfg):
        stored, source = getattr(w, name), _layer_weights(tiny_weights, name)
        if not is_matrix:
            np.testing.assert_array_equal(stored, source, err_msg=name)
            continue
        expected = kernels.quantize(source, kind, llama31.GROUP_SIZE)  # bit-exact: the same quantizer
        np.testing.assert_array_equal(stored.data, expected.data, err_msg=name)
        if expected.scales is not None:
            np.testing.assert_array_equal(stored.scales, expected.scales, err_msg=name)
    # zero-copy: every weight is a view whose chain of bases ends in the file's memory map
    base = w.wq.data
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) and not w.wq.data.flags.writeable


def test_docstring_tensor_table_is_the_code_table():
    doc = convert_weights.__doc__
    rows = re.findall(r"^\s+\| (\w+)(?: \(\w+\))?\s+\| \(", doc, flags=re.M)
    assert rows == [name for name, _, _ in llama31.tensor_table(llama31.Config(tie_embeddings=False))]
    assert f'b"{llama31.MAGIC.decode()}"' in doc and f"| {llama31.VERSION}; bump" in doc


# -----------------------------------------------------------------------------
# Bad files: one line naming the problem


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _edit_header(raw: bytes, edit) -> bytes:
    """The file with its JSON header edited in place (padded with spaces to the same length, so offsets hold)."""
    n = struct.unpack(llama31.PREAMBLE, raw[:PREAMBLE_SIZE])[2]
    header = json.loads(raw[PREAMBLE_SIZE:PREAMBLE_SIZE + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, "this edit makes the header longer; pick one that does not"
    return raw[:PREAMBLE_SIZE] + new.ljust(n) + raw[PREAMBLE_SIZE + n:]


def _entry(header, name):
    return next(e for e in header["tensors"] if e["name"] == name)


def _set(d, key, value):
    d[key] = value


def _shift_offset(header, name, by):
    _entry(header, name)["arrays"][0]["offset"] += by


BAD_FILES = {  # case: (raw bytes of a good f32 file -> bad bytes, what the one-line error must say)
    "empty": (lambda raw: b"", "too short to be a llama31 model file"),
    "truncated in the preamble": (lambda raw: raw[:10], "too short to be a llama31 model file"),
    "truncated in the header": (lambda raw: raw[:200], "header claims .* truncated file"),
    "truncated in the data": (lambda raw: raw[:len(raw) // 2], "truncated or padded"),
    "truncated by one byte": (lambda raw: raw[:-1], "truncated or padded"),
    "padded": (lambda raw: raw + bytes(64), "truncated or padded"),
    "wrong magic": (lambda raw: b"LL30" + raw[4:], "bad magic b'LL30', expected b'LL31'"),
    "newer version": (lambda raw: raw[:4] + struct.pack("<I", llama31.VERSION + 1) + raw[8:],
                      f"format version {llama31.VERSION + 1}, this llama31 reads version {llama31.VERSION}; "
                      f"upgrade llama31"),
    "older version": (lambda raw: raw[:4] + struct.pack("<I", 0) + raw[8:], "format version 0.*convert_weights"),
    "header longer than the file": (lambda raw: raw[:8] + struct.pack("<Q", 1 << 40) + raw[16:],
                                    "header claims 1099511627776 bytes"),
    "corrupt JSON": (lambda raw: raw[:PREAMBLE_SIZE] + b"x" + raw[PREAMBLE_SIZE + 1:], "JSON header is corrupt"),
    "missing tensor": (lambda raw: _edit_header(raw, lambda h: h["tensors"].pop(5)), "tensor wo is missing"),
    "lying nbytes": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "wq")["arrays"][0], "nbytes", 64)),
                     "tensor wq: array .* does not match kind f32"),
    "lying shape": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "w1"), "shape", [2, 64, 128])),
                    r"tensor w1 has shape \[2, 64, 128\], the config implies \[2, 128, 64\]"),
    "lying array shape": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "w1")["arrays"][0], "shape",
                                                                       [2, 64, 128])),
                          "tensor w1: array .* does not match kind f32"),
    "lying config": (lambda raw: _edit_header(raw, lambda h: _set(h["config"], "n_layers", 3)),
                     "truncated or padded|tensor .* has shape"),
    "invalid config": (lambda raw: _edit_header(raw, lambda h: _set(h["config"], "n_kv_heads", 3)),
                       "bad config in header: config: n_heads 4 is not divisible by n_kv_heads 3"),
    "unknown config key": (lambda raw: _edit_header(raw, lambda h: _set(h["config"], "eps",
                                                                         h["config"].pop("norm_eps"))),
                           r"bad config in header: config: unknown keys \['eps'\]"),
    "offset past the end": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "norm")["arrays"][0], "offset",
                                                                         len(raw) - 64)),
                            "truncated or padded"),  # the size check sees it first
    "misaligned offset": (lambda raw: _edit_header(raw, lambda h: _shift_offset(h, "wk", 4)),
                          "tensor wk: bytes .* are misaligned"),
    "unknown kind": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "wv"), "kind", "q2k")),
                     "tensor wv has unknown kind 'q2k'"),
    "norm stored as a matrix kind": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "norm"), "kind",
                                                                                  "f16")),
                                     "tensor norm: array .* does not match kind f16"),
    "array without offset": (lambda raw: _edit_header(raw, lambda h: _entry(h, "wq")["arrays"][0].pop("offset")),
                             "tensor wq"),
    "offset not a number": (lambda raw: _edit_header(raw, lambda h: _set(_entry(h, "wq")["arrays"][0], "offset",
                                                                         "64")),
                            "tensor wq"),
    "tensors not a list": (lambda raw: _edit_header(raw, lambda h: _set(h, "tensors", {"wq": 1})), "tensor"),
}


BAD_CASES = sorted(BAD_FILES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_gives_one_line_naming_the_problem(case, tiny_model_file, tmp_path):
    spoil, message = BAD_FILES[case]
    path = _write(tmp_path / "bad.bin", spoil(open(tiny_model_file, "rb").read()))
    with pytest.raises(ValueError) as info:
        llama31.load_weights(path)
    text = str(info.value)
    assert re.search(message, text), f"{case}: {text}"
    assert text.startswith(path) and "\n" not in text


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_in_the_cli_is_one_error_line(case, tiny_model_file, tmp_path, capsys):
    spoil, message = BAD_FILES[case]
    path = _write(tmp_path / "bad.bin", spoil(open(tiny_model_file, "rb").read()))
    assert llama31.main(["-m", path, "--backend", "numpy", "1 2 3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err)


@pytest.mark.parametrize("case", ["truncated in the data", "newer version", "lying nbytes"])
def test_bad_file_cli_process_exits_1_without_traceback(case, tiny_model_file, tmp_path):
    spoil, _ = BAD_FILES[case]
    path = _write(tmp_path / "bad.bin", spoil(open(tiny_model_file, "rb").read()))
    r = subprocess.run([sys.executable, "llama31.py", "-m", path, "--backend", "numpy", "hi"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_good_file_runs_on_token_ids_without_tokenizer(tiny_model_file, capsys):
    assert llama31.main(["-m", tiny_model_file, "--backend", "numpy", "-t", "0", "-n", "4", "1 2 3"]) == 0
    out, _ = capsys.readouterr()
    assert len(out.split()) == 4 and all(0 <= int(t) < TINY.vocab_size for t in out.split())
