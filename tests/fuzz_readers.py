"""Coverage-guided fuzzing of the file readers with atheris (libFuzzer), and the replay of inputs that failed.

Each target takes the bytes of one file and hands them to a reader. A reader may refuse a file only with
ValueError or OSError (which the CLIs print as one `error:` line); any other exception, a hang or a signal
is a bug.
    model      llama31.load (preamble, JSON header, config, tensor table, the embedded tokenizer), then logits
    gguf       convert_weights.convert of a GGUF file (header, metadata, tensor infos, tokenizer, weights)
    pth        convert_weights.read_pth of a torch.save file (zip, restricted unpickler), then every tensor
    tokenizer  tokenizer.load of a file (to_dict JSON, HF tokenizer.json, Meta's ranks, SentencePiece),
               then encode, decode and the chat template

From the repository root:
    PYTHONPATH=. python tests/fuzz_readers.py gguf -max_total_time=600     # ten minutes on one target
    PYTHONPATH=. python tests/fuzz_readers.py all -runs=2000 -seed=1       # tests/test_fuzz.py's budget
Options are libFuzzer's (-runs, -max_total_time, -seed, -max_len, ...). Each run starts from seed files
built here (small valid files of each kind) and from tests/fuzz_corpus/<target>/. A failing input is saved
as crash-<sha1> in the current folder: fix the reader, then move the file to tests/fuzz_corpus/<target>/,
which keeps every input that ever failed; tests/test_fuzz.py replays them all on every run.
"""

import io
import json
import os
import sys
import tempfile
import warnings

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(TESTS, "fuzz_corpus")
TARGETS = ("model", "gguf", "pth", "tokenizer")
REFUSALS = (ValueError, OSError)  # how a reader may say no to a file

try:
    import atheris
except ImportError:
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["llama31", "convert_weights", "tokenizer"]):
        import convert_weights
        import llama31
        import tokenizer
else:
    import convert_weights
    import llama31
    import tokenizer


# -----------------------------------------------------------------------------
# Targets
# One function per reader: the file's bytes in, nothing out; REFUSALS are fine, anything else propagates.


def _model(path: str, out_dir: str):
    model = llama31.load(path, backend="numpy", ctx=4)
    model.logits([0])
    if model.tokenizer is not None and model.tokenizer.has_chat_template:
        model.tokenizer.encode_dialog([{"role": "user", "content": "Hi"}])


def _gguf(path: str, out_dir: str):
    convert_weights.convert(path, os.path.join(out_dir, "out.bin"), quant="q8_0", progress=io.StringIO())


def _pth(path: str, out_dir: str):
    for t in convert_weights.read_pth(path).values():
        if len(t.shape) in (1, 2):  # the converter reads rows only of tensors whose shape the config allows
            t.rows(0, t.shape[0] if len(t.shape) == 2 else 1)


def _tokenizer(path: str, out_dir: str):
    tok = tokenizer.load(path)
    ids = tok.encode("Hello, wörld! 123 <|im_start|>", bos=False)
    tok.decode(list(range(min(tok.vocab_size, 64))) + ids)
    if tok.has_chat_template:
        tok.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


READERS = {"model": _model, "gguf": _gguf, "pth": _pth, "tokenizer": _tokenizer}


def run_one(target: str, data: bytes, work_dir: str):
    """Write data as a file in work_dir and read it with the target's reader; raise what is not a refusal."""
    path = os.path.join(work_dir, "input")
    with open(path, "wb") as f:
        f.write(data)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # garbage weights overflow: numpy warns, which is fine
        try:
            READERS[target](path, work_dir)
        except REFUSALS:
            pass
        finally:
            for name in os.listdir(work_dir):  # a fresh file every time: no old mapping sees new bytes
                os.unlink(os.path.join(work_dir, name))


# -----------------------------------------------------------------------------
# Seeds
# Small valid files of each kind, so that mutations start inside the formats rather than at random bytes.

NANO = llama31.Config(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=12, hidden_dim=32, max_seq_len=64,
                      rope_scaling=llama31.RopeScaling(factor=8.0), tie_embeddings=False)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NANO_TOKENIZER = {  # byte-level BPE as GGUF metadata holds it: 12 tokens, 4 merges, ChatML
    "model": "gpt2",
    "pre": "smollm",
    "tokens": ["a", "b", "c", "d", "Ġ", "ab", "abc", "Ġa", "Ġab", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "merges": ["a b", "ab c", "Ġ a", "Ġa b"],
    "token_type": [1] * 9 + [3] * 3,
    "eos": 11,
}


def build_seeds(folder: str) -> dict:
    """Write seed files for every target into folder/<target>/; return {target: folder}."""
    from make_random_checkpoint import build_gguf

    dirs = {t: os.path.join(folder, t) for t in TARGETS}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    metadata = {"tokenizer.chat_template": CHATML}
    for kind in ("F32", "Q8_0"):
        path = os.path.join(dirs["gguf"], f"nano.{kind}.gguf")
        build_gguf(path, NANO, matrix_type=kind, tokenizer=NANO_TOKENIZER, metadata=metadata)
        for quant in ("f32", "q4_0"):
            convert_weights.convert(path, os.path.join(dirs["model"], f"nano.{kind}.{quant}.bin"), quant=quant,
                                    progress=io.StringIO())
    _write_pth_seeds(dirs["pth"])
    gguf_meta, _ = convert_weights.read_gguf(os.path.join(dirs["gguf"], "nano.F32.gguf"))
    tok = tokenizer.load({k: v for k, v in gguf_meta.items() if k.startswith("tokenizer.")})
    with open(os.path.join(dirs["tokenizer"], "nano.json"), "w") as f:
        json.dump(tok.to_dict(), f)
    with open(os.path.join(dirs["tokenizer"], "tokenizer.json"), "w") as f:
        json.dump(_hf_tokenizer_json(), f)
    with open(os.path.join(dirs["tokenizer"], "tokenizer.model"), "w") as f:  # Meta's ranks: 256 bytes + 2
        import base64
        ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    return dirs


def _write_pth_seeds(folder: str):
    import torch

    state = {"tok_embeddings.weight": torch.arange(6, dtype=torch.bfloat16).reshape(3, 2),
             "norm.weight": torch.ones(2, dtype=torch.float16),
             "output.weight": torch.zeros(2, 3, dtype=torch.float32).t()}  # a strided (transposed) view
    torch.save(state, os.path.join(folder, "consolidated.00.pth"))
    torch.save({"model": {"w": torch.ones(1, 2)}}, os.path.join(folder, "nested.pth"))


def _hf_tokenizer_json() -> dict:
    vocab = {t: i for i, t in enumerate(NANO_TOKENIZER["tokens"][:9])}
    added = [{"id": 9 + i, "content": t, "special": True} for i, t in enumerate(NANO_TOKENIZER["tokens"][9:])]
    return {"model": {"type": "BPE", "vocab": vocab, "merges": NANO_TOKENIZER["merges"]},
            "added_tokens": added,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
            "post_processor": None}


# -----------------------------------------------------------------------------
# Main
# `python tests/fuzz_readers.py TARGET|all [libFuzzer options]`: seeds, then libFuzzer on the target.


def fuzz(target: str, options: list[str], scratch: str) -> int:
    """Run libFuzzer on one target in a child process (libFuzzer exits when done); return its exit status."""
    import subprocess

    corpus = os.path.join(CORPUS, target)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", target, *options,
           os.path.join(scratch, "seeds", target), *([corpus] if os.path.isdir(corpus) else [])]
    return subprocess.run(cmd).returncode


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if atheris is None:
        print("error: fuzzing needs atheris: pip install atheris", file=sys.stderr)
        return 1
    if argv[:1] == ["--child"]:  # one target under libFuzzer, on the corpus folders given
        target = argv[1]
        with tempfile.TemporaryDirectory() as work_dir:
            atheris.Setup([sys.argv[0], *argv[2:]], lambda data: run_one(target, data, work_dir))
            atheris.Fuzz()  # exits the process
    if not argv or argv[0] not in (*TARGETS, "all"):
        print(f"usage: python tests/fuzz_readers.py {{{','.join(TARGETS)},all}} [libFuzzer options]",
              file=sys.stderr)
        return 1
    targets = TARGETS if argv[0] == "all" else (argv[0],)
    with tempfile.TemporaryDirectory() as scratch:
        build_seeds(os.path.join(scratch, "seeds"))
        for target in targets:
            status = fuzz(target, argv[1:], scratch)
            if status:
                print(f"fuzz_readers: target {target} failed (exit {status}); the input is the crash-* file "
                      f"above", file=sys.stderr)
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
