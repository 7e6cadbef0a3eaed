"""tests/gpu_check.py, the one-command GPU check, proven on the CPU by its dry run before a GPU minute is
spent: the files and the summary's structure, test_cuda.py planned into groups, a crashing group reported
as crashed while the later groups still run, a hanging group stopped by its timeout, failed shapes and max
errors read from the tests' output, and bench_gpu.py's step. One dry run (about a minute) serves them all.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bench_gpu
import gpu_check
import kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(completed process, output folder, summary) of a dry run with every injection."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    done = subprocess.run([sys.executable, "tests/gpu_check.py", str(out), "--dry-run", "--inject", "crash",
                           "--inject", "hang", "--inject", "fail"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert (out / "summary.json").exists(), f"no summary; stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done, out, json.loads((out / "summary.json").read_text())


def group(summary, name):
    return next(g for g in summary["groups"] if g["name"] == name)


def row(summary, test, kind="-"):
    return next(r for r in summary["kernels"] if r["test"] == test and r["kind"] == kind)


def test_files_and_summary_structure(dry_run):
    done, out, summary = dry_run
    assert done.returncode == 1  # the injected failures
    # what the device tool brings back: at most 8 files, plain names
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.json", "tests.jsonl"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert {"dry_run", "date", "environment", "steps", "test_cuda_plan", "groups", "kernels", "bench", "sanitizer",
            "ok", "seconds"} <= set(summary)
    assert summary["dry_run"] is True and summary["ok"] is False
    env = summary["environment"]
    assert env["probe_status"] == "ok" and env["trivial_launch"] == "ok" and env["add_kernel"].startswith("ok")
    assert env["python"] == sys.version.split()[0] and "numpy" in env
    assert [g["name"] for g in summary["groups"]] == ["no_gpu", "injected_crash", "injected_hang", "rmsnorm",
                                                       "matmul", "swiglu_add"]
    for g in summary["groups"]:
        assert {"status", "tests", "counts", "timeout_s", "runs"} <= set(g)
        assert sum(g["counts"].values()) == g["tests"]
    for r in summary["kernels"]:
        assert {"test", "kind", "status", "total", "counts", "max_error", "failed_cases"} <= set(r)
    assert summary["seconds"] < summary["budget_s"]
    # stdout ends with one line per test function and kind
    assert re.search(r"^pass +test_matmul +q4_0 +2/2 ", done.stdout, re.MULTILINE)
    # every test of the log's pytest processes is in tests.jsonl with a result
    results = [json.loads(line) for line in (out / "tests.jsonl").read_text().splitlines()]
    assert {r["nodeid"] for r in results if r["event"] == "result"} >= {
        f"tests/gpu_check_dry.py::test_rmsnorm[{case}]" for case in ("1-33", "3-50")}


def test_test_cuda_is_planned_into_groups(dry_run):
    _, _, summary = dry_run
    plan = summary["test_cuda_plan"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_cuda.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout
    assert sum(plan.values()) == collected.count("tests/test_cuda.py::")  # every test in exactly one group
    assert list(plan)[0] == "no_gpu" and {"matmul", "attention", "full_model"} <= set(plan)


def test_crash_is_reported_and_later_groups_run(dry_run):
    _, _, summary = dry_run
    crash = group(summary, "injected_crash")
    assert crash["status"] == "crashed"
    # abort[1] crashes the first process, the sticky error stops the second, the third runs the test that
    # passes before abort[2] (a broken test function's other cases go last) and crashes on abort[2]
    assert [(r["status"], r["tests"]) for r in crash["runs"]] == [("crashed", 1), ("failed", 1), ("crashed", 2)]
    assert crash["counts"] == {"crashed": 2, "failed": 1, "passed": 1}
    cases = row(summary, "test_injected_crash_abort")["failed_cases"]
    assert [c["params"] for c in cases] == [{"case": 1}, {"case": 2}]
    assert all(c["outcome"] == "crashed" and "SIGABRT" in c["message"] for c in cases)
    assert row(summary, "test_injected_crash_sticky")["status"] == "FAIL"
    for name in ("rmsnorm", "matmul", "swiglu_add"):  # the groups after it
        assert group(summary, name)["counts"].get("passed", 0) >= 2


def test_hang_is_stopped_by_its_timeout(dry_run):
    _, _, summary = dry_run
    hang = group(summary, "injected_hang")
    assert hang["status"] == "timeout" and hang["counts"] == {"hung": 1, "passed": 1}
    first = hang["runs"][0]
    assert first["status"] == "timeout" and hang["timeout_s"] <= first["seconds"] < hang["timeout_s"] + 10
    assert row(summary, "test_injected_hang")["status"] == "HANG"
    assert row(summary, "test_injected_hang_then_pass")["status"] == "pass"


def test_failed_shapes_and_max_errors(dry_run):
    _, _, summary = dry_run
    failed = row(summary, "test_matmul_injected_fail", "q8_0")
    assert failed["status"] == "FAIL" and failed["counts"] == {"passed": 1, "failed": 1}
    assert [c["params"] for c in failed["failed_cases"]] == [{"N": 7, "K": 64}]
    assert failed["max_error"]["label"] == "matmul" and failed["max_error"]["of_tolerance"] > 1
    assert "Mismatched elements" in failed["failed_cases"][0]["message"]
    for kind in kernels.KINDS:
        passed = row(summary, "test_matmul", kind)
        assert passed["status"] == "pass" and passed["total"] == 2
        assert passed["max_error"]["measure"] == "abs" and 0 <= passed["max_error"]["of_tolerance"] < 1


def test_bench_step(dry_run):
    _, _, summary = dry_run
    bench = summary["bench"]
    assert bench["time_limit_s"] > 0 and "usage:" not in " ".join(bench["lines"])  # its arguments parsed
    if "cupy" in kernels.available_backends():
        assert bench["status"] == "ok"
    else:
        assert bench["rc"] == 1 and bench["status"].startswith("no GPU")
    assert summary["sanitizer"]["status"] == "skipped" and summary["sanitizer"]["cases"]


def test_bench_time_limit_is_checked():
    assert bench_gpu.parse_args(["--time-limit", "5"]).deadline < float("inf")
    assert bench_gpu.parse_args([]).deadline == float("inf")
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--time-limit", "-1"])


def test_groups_by_name_pattern():
    items = [dict(nodeid=f"t::{name}", name=name, params={}, cuda=cuda) for name, cuda in [
        ("test_sources_compile", False), ("test_matmul", True), ("test_full_model_graph_decode", True),
        ("test_attention_batched_rows", True), ("test_something_new", True)]]
    plan = {name: [i["name"] for i in group] for name, _, group in gpu_check.plan_groups(items, gpu_check.GROUPS)}
    assert plan == {"no_gpu": ["test_sources_compile"], "matmul": ["test_matmul"],
                    "attention": ["test_attention_batched_rows"], "full_model": ["test_full_model_graph_decode"],
                    "other": ["test_something_new"]}
