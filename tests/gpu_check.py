"""gpu_check.py: the whole on-GPU check of the CUDA backend in one command, sized for a short GPU window.

    python3 tests/gpu_check.py OUTDIR            # on the GPU machine: at most about 7 minutes
    python tests/gpu_check.py OUTDIR --dry-run   # on any CPU: the same harness over numpy stand-ins

Quick diagnostics first, each step in a child process, so a crash or hang ends that step only:
1. probe: Python, numpy, numba, CuPy, torch, CUDA runtime, driver and NVRTC versions, nvidia-smi, the
   device's properties, a trivial kernel launch, then one of ours (add_cuda) against its reference;
2. collect tests/test_cuda.py and split it into groups by test function name (GROUPS): the tests without
   the `cuda` marker (the compile checks) first, then one group per kernel, the CUDA graph, the full model;
   a cuda test that no pattern names runs in "other", so renamed and new tests still run;
3. each group in its own pytest process under a timeout. A crash, a hang or a sticky CUDA error (after
   one, every launch of the process fails) ends that process; the rest of the group then runs in a fresh
   one, so one bad kernel cannot hide the others;
4. bench_gpu.py under a time limit;
5. compute-sanitizer memcheck on one small case per kernel (the failed one where a kernel failed), when
   time is left.
OUTDIR receives gpu_check.log (everything every step printed), tests.jsonl (a line per test started and
finished) and summary.json (versions, each step, each group, and a row per test function and weight kind:
pass/fail, the worst error and how much of its tolerance it used, the parameters of the cases that
failed). stdout ends with those rows as a table and the bench's table. Exit status 0 when all passed.

The tests report errors by printing "max error <op>: <value> <abs|relative>, <f> of tolerance" (and their
"seed N"); this file, loaded into each pytest process as a plugin (-p gpu_check), reads those lines from the
captured output. --dry-run runs the same steps on the CPU: numpy stands in for cupy in the probe,
tests/gpu_check_dry.py's stand-ins (tiny shapes, grouped the same way) run instead of test_cuda.py, whose
grouping is only planned, and bench_gpu.py gets a tiny configuration (without a GPU it stops at its cupy
check, after parsing its arguments). --inject adds stand-ins that crash, hang or fail, which
tests/test_gpu_check.py uses to prove that they are reported and that the later groups still run.
"""

import argparse
import faulthandler
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# What runs, in which order, for how long
# The budget keeps the whole check near 7 minutes: half of a 15-minute GPU window, under the 10 minutes
# one command may run there.

BUDGET_S = 420
PROBE_TIMEOUT_S = 90
COLLECT_TIMEOUT_S = 60
BENCH_RESERVE_S = 200  # no test group starts once only this much of the budget is left
BENCH_LIMIT_S = 150  # bench_gpu.py starts no measurement after this; it is killed 60 s later
SANITIZER_MIN_S = 45  # compute-sanitizer runs only if this much is left after the bench
MAX_RUNS = 4  # pytest processes per group: the first, then one more after each of three crashes or hangs

NO_GPU_GROUP = ("no_gpu", 90)  # tests without the cuda marker: nvcc and NVRTC compile every source
# A group's timeout holds for each of its processes: a hung test costs that much, then the rest reruns.
GROUPS = [  # (name, regex searched in a cuda test's function name, timeout s); first match wins; run in order
    ("rmsnorm", r"rmsnorm", 60),
    ("matmul", r"matmul", 90),
    ("embed", r"embed", 60),
    ("rope", r"rope", 60),
    ("attention", r"attention", 60),
    ("swiglu_add", r"swiglu|add", 60),
    ("sample", r"sample", 60),
    ("graph", r"graph_step", 60),
    ("full_model", r"model", 120),  # converts the tiny model to every kind on the CPU first
]
OTHER_GROUP = ("other", 90)  # cuda tests that no pattern names

# the dry run's injected stand-ins go first, so that the groups after them show the harness carries on
DRY_RUN_GROUPS = [("injected_crash", r"injected_crash", 60), ("injected_hang", r"injected_hang", 15)] + GROUPS
INJECTED = re.compile(r"injected_(crash|hang|fail)")

# torch.compile of 32 layers takes minutes per context, so the check's PyTorch peer runs eager; the
# README's table comes from bench_gpu.py run on its own
BENCH_ARGS = ["--no-compile"]
BENCH_DRY_RUN_ARGS = ["--kinds", "q8_0", "--contexts", "40", "--prefill", "16", "--steps", "4", "--rounds", "1",
                      "--layers", "1", "--no-torch"]

# what CUDA reports after a kernel faulted: the context is lost and every later call of the process fails
STICKY_CUDA_ERROR = re.compile(r"illegal memory access|illegal instruction|unspecified launch failure|"
                               r"misaligned address|hardware stack error|launch timed out", re.IGNORECASE)
MAX_ERROR_LINE = re.compile(r"^max error (\S+): (\S+) (\w+), (\S+) of tolerance$", re.MULTILINE)
SEED_LINE = re.compile(r"^seed (\d+)$", re.MULTILINE)


# -----------------------------------------------------------------------------
# The pytest side: loaded into every pytest process of the check with -p gpu_check
# It writes JSON lines the harness reads: the collected tests, and each test's start and result.


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check", "tests/gpu_check.py's recorder")
    group.addoption("--gpu-check-collect", metavar="PATH", help="write a JSON line per collected test")
    group.addoption("--gpu-check-results", metavar="PATH", help="append a JSON line per test started and finished")
    group.addoption("--gpu-check-stacks", metavar="PATH", help="write Python stacks here on a crash or SIGUSR1")
    group.addoption("--gpu-check-no-pool", action="store_true",
                    help="allocate with cudaMalloc, no memory pool, so compute-sanitizer knows each array's bounds")


def pytest_configure(config):
    config.pluginmanager.register(Recorder(config), "gpu_check_recorder")


class Recorder:
    """Writes the JSON lines; stops the session after a sticky CUDA error (later tests would fail for it)."""

    def __init__(self, config):
        self.collect_path = config.getoption("gpu_check_collect")
        results = config.getoption("gpu_check_results")
        self.results = open(results, "a") if results else None
        self.reports = {}  # nodeid -> reports of its phases so far
        self.session = None
        stacks = config.getoption("gpu_check_stacks")
        if stacks:  # the harness sends SIGUSR1 before it kills a hung process: the log then says where
            self.stacks = open(stacks, "w")
            faulthandler.enable(self.stacks, all_threads=True)
            faulthandler.register(signal.SIGUSR1, self.stacks, all_threads=True)
        if config.getoption("gpu_check_no_pool"):
            import cupy

            cupy.cuda.set_allocator(None)

    def write(self, record: dict):
        self.results.write(json.dumps(record) + "\n")
        self.results.flush()  # a crash a moment later must not lose it

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_finish(self, session):
        if self.collect_path:
            with open(self.collect_path, "w") as f:
                for item in session.items:
                    callspec = getattr(item, "callspec", None)
                    params = {k: _plain(v) for k, v in callspec.params.items()} if callspec else {}
                    f.write(json.dumps(dict(nodeid=item.nodeid, name=getattr(item, "originalname", item.name),
                                            params=params, cuda=item.get_closest_marker("cuda") is not None)) + "\n")

    def pytest_runtest_logstart(self, nodeid, location):
        if self.results:
            self.write(dict(event="start", nodeid=nodeid))

    def pytest_runtest_logreport(self, report):
        self.reports.setdefault(report.nodeid, []).append(report)
        if report.failed and STICKY_CUDA_ERROR.search(report.longreprtext):
            self.session.shouldstop = f"sticky CUDA error in {report.nodeid}: the rest runs in a new process"

    def pytest_runtest_logfinish(self, nodeid, location):
        reports = self.reports.pop(nodeid, [])
        if not self.results or not reports:
            return
        failed = [r for r in reports if r.failed]
        outcome = "failed" if failed else "skipped" if any(r.skipped for r in reports) else "passed"
        output = reports[-1].capstdout  # the last phase's report carries every phase's captured output
        errors = [dict(label=m[0], value=float(m[1]), measure=m[2], of_tolerance=float(m[3]))
                  for m in MAX_ERROR_LINE.findall(output)]
        seed = SEED_LINE.search(output)
        message = ""
        if failed:
            text = failed[0].longreprtext
            message = "\n".join(line for line in text.splitlines() if line.startswith("E ")) or text[-600:]
        elif outcome == "skipped":
            longrepr = next(r for r in reports if r.skipped).longrepr
            message = str(longrepr[-1] if isinstance(longrepr, tuple) else longrepr)
        self.write(dict(event="result", nodeid=nodeid, outcome=outcome, seconds=sum(r.duration for r in reports),
                        errors=errors, seed=seed and int(seed[1]), message=message[:1500],
                        sticky=bool(failed and STICKY_CUDA_ERROR.search(failed[0].longreprtext))))


def _plain(value):
    """A parameter value as JSON can hold it."""
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


# -----------------------------------------------------------------------------
# The probe: a child process that reports what the machine has, step by step
# Each answer is saved as soon as it is known, so a crash in the driver still leaves the ones before it.


_ADD_ONE_SRC = r"""
extern "C" __global__ void add_one(float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
"""


def probe(path: str, dry_run: bool):
    info = {"dry_run": dry_run}

    def note(key, fn):
        try:
            info[key] = fn()
        except Exception as e:  # noqa: BLE001 (a diagnostic: every failure is reported, none stops the probe)
            info[key] = f"error: {type(e).__name__}: {e}"
        print(f"{key}: {info[key]}", flush=True)
        Path(path).write_text(json.dumps(info))

    note("python", lambda: sys.version.split()[0])
    note("numpy", lambda: np.__version__)
    note("packages", _package_versions)
    note("nvidia_smi", _nvidia_smi)
    note("nvcc", lambda: _first_line(["nvcc", "--version"], last=True))
    note("compute_sanitizer", lambda: shutil.which("compute-sanitizer") or "not on PATH")
    import kernels

    note("backends", kernels.available_backends)
    if dry_run:
        note("device", lambda: "none: numpy stands in for cupy (dry run)")
        note("trivial_launch", lambda: _trivial_launch(np, launch=lambda x: x.__iadd__(1)))
        note("add_kernel", lambda: _our_add(kernels, np, kernels.add_ref))
        return
    if "cupy" not in info["backends"]:
        note("device", lambda: "none: cupy is missing or sees no GPU; the on-GPU tests will skip")
        return
    import cupy

    note("cuda_runtime", lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))
    note("cuda_driver", lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion()))
    note("nvrtc", lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    note("device", lambda: _device(cupy))
    kernel = cupy.RawKernel(_ADD_ONE_SRC, "add_one")
    note("trivial_launch", lambda: _trivial_launch(cupy, launch=lambda x: kernel((4,), (256,), (x, np.int32(x.size)))))
    note("add_kernel", lambda: _our_add(kernels, cupy, kernels.add_cuda))


def _package_versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("numba", "cupy-cuda13x", "cupy-cuda12x", "torch", "pytest", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _first_line(cmd, last=False) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not on PATH"
    lines = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    return (lines[-1] if last else lines[0]) if lines else "(no output)"


def _nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not on PATH"
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, flush=True)
    return _first_line(["nvidia-smi", "--format=csv,noheader", "--query-gpu=name,driver_version,memory.total,"
                        "memory.used,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,compute_mode"])


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _device(cupy) -> dict:
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = cupy.cuda.runtime.memGetInfo()
    return dict(name=name, compute_capability=f"{props['major']}.{props['minor']}",
                multiprocessors=props["multiProcessorCount"], memory_gib=round(total / 2**30, 1),
                free_gib=round(free / 2**30, 1), l2_mib=round(props["l2CacheSize"] / 2**20, 1))


def _trivial_launch(xp, launch) -> str:
    """x = 0..999 plus one by the simplest possible kernel: proves the driver, NVRTC and a launch."""
    x = xp.arange(1000, dtype=np.float32)
    launch(x)
    got = x.get() if hasattr(x, "get") else x
    assert np.array_equal(got, np.arange(1000) + 1), f"wrong values, first {got[:4]}"
    return "ok"


def _our_add(kernels, xp, add) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 333)).astype(np.float32)
    xd = xp.array(x)  # a copy: add works in place
    add(xd, xp.asarray(y))
    got = xd.get() if hasattr(xd, "get") else xd
    return f"ok, max error {float(np.max(np.abs(got - kernels.add_ref(x.copy(), y)))):.1e}"


# -----------------------------------------------------------------------------
# The harness: child processes under timeouts, their output appended to one log


class Check:
    """One run of the check: the output folder, the log, the time budget and the summary being built."""

    def __init__(self, outdir: str, dry_run: bool, budget: float):
        self.out = Path(outdir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry_run = dry_run
        self.start = time.monotonic()
        self.deadline = self.start + budget
        (self.out / "gpu_check.log").write_text("")
        self.log = open(self.out / "gpu_check.log", "a")  # appending: the children write through the same file
        self.results = self.out / "tests.jsonl"
        self.results.write_text("")
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check."))
        self.summary = dict(dry_run=dry_run, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), budget_s=budget,
                            command=shlex.join(sys.argv), steps=[])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str, stamp: bool = True):
        """A line to stdout and the log, stamped with the seconds since the start."""
        line = f"[{time.monotonic() - self.start:5.0f} s] {line}" if stamp else line
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self):
        """summary.json as it stands: if the check is stopped from outside, what it learned is kept."""
        (self.out / "summary.json").write_text(json.dumps(_json_safe(self.summary), indent=1) + "\n")

    def run(self, step: str, cmd: list, timeout: float, stacks: Path | None = None) -> dict:
        """Run cmd in the repository root, its output appended to the log; on timeout, SIGUSR1 (a pytest
        child writes its stacks), then SIGKILL to its whole process group. The returned dict holds the
        status (ok, failed, crashed, timeout), rc, seconds, and the output, which the caller consumes."""
        self.log.write(f"\n===== {step}: $ {shlex.join(str(c) for c in cmd)}\n")
        self.log.flush()
        before = os.fstat(self.log.fileno()).st_size
        start = time.monotonic()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=_child_env(),
                                 start_new_session=True, preexec_fn=_no_core_dumps)
        try:
            rc, timed_out = child.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGUSR1)
            time.sleep(2)
            os.killpg(child.pid, signal.SIGKILL)
            try:
                rc, timed_out = child.wait(timeout=30), True
            except subprocess.TimeoutExpired:  # stuck in the driver: leave it, say so, go on
                self.log.write(f"----- {step}: pid {child.pid} survived SIGKILL for 30 s; left running\n")
                rc, timed_out = -signal.SIGKILL, True
        seconds = time.monotonic() - start
        with open(self.log.name, errors="replace") as f:
            f.seek(before)
            output = f.read()
        run = dict(step=step, rc=rc, seconds=round(seconds, 1), timeout_s=round(timeout), output=output,
                   status="timeout" if timed_out else "ok" if rc == 0 else "crashed" if rc < 0 else "failed")
        if rc < 0 and not timed_out:
            run["signal"] = signal.Signals(-rc).name
        if stacks is not None and stacks.exists() and stacks.stat().st_size:
            text = stacks.read_text(errors="replace")
            self.log.write(f"----- Python stacks of {step} (faulthandler)\n{text}\n")
            self.log.flush()
            run["stacks"] = text[:3000]  # the innermost frames come first
        self.summary["steps"].append({k: v for k, v in run.items() if k not in ("output", "stacks")})
        return run

    def new_results(self, offset: int) -> list[dict]:
        with open(self.results) as f:
            f.seek(offset)
            return [json.loads(line) for line in f if line.endswith("\n")]


def _child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # the repository's modules, and this file for pytest's -p gpu_check
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")]))
    return env


def _no_core_dumps():
    # a crashed CUDA process's core can take minutes and gigabytes to write
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def group_command(results: Path, stacks: Path, nodeids: list, extra=()) -> list:
    return [sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-p", "no:faulthandler",
            "-q", "--tb=short", "-rfE", f"--gpu-check-results={results}", f"--gpu-check-stacks={stacks}", *extra,
            *nodeids]


# -----------------------------------------------------------------------------
# The steps


def run_probe(check: Check) -> dict:
    path = check.scratch / "probe.json"
    cmd = [sys.executable, __file__, "--probe", str(path)] + (["--dry-run"] if check.dry_run else [])
    run = check.run("probe", cmd, min(PROBE_TIMEOUT_S, check.left()))
    info = json.loads(path.read_text()) if path.exists() else {}
    info["probe_status"] = run["status"]
    return info


def collect(check: Check, test_file: str) -> list[dict]:
    """[{nodeid, name, params, cuda}] of test_file's tests, as pytest collects them."""
    path = check.scratch / f"collect.{Path(test_file).stem}.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-qq", "--collect-only",
           f"--gpu-check-collect={path}", test_file]
    run = check.run(f"collect {test_file}", cmd, min(COLLECT_TIMEOUT_S, check.left()))
    if not path.exists():
        check.say(f"collect {test_file}: {run['status']} (rc {run['rc']}), no tests: see the log")
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def plan_groups(items: list, groups: list) -> list:
    """[(group, timeout, items)] in running order: unmarked tests, each pattern's, then "other"; no empty group."""
    members = {name: [] for name in [NO_GPU_GROUP[0], *(name for name, _, _ in groups), OTHER_GROUP[0]]}
    for item in items:
        if not item["cuda"]:
            members[NO_GPU_GROUP[0]].append(item)
            continue
        name = next((name for name, pattern, _ in groups if re.search(pattern, item["name"])), OTHER_GROUP[0])
        members[name].append(item)
    timeouts = {NO_GPU_GROUP[0]: NO_GPU_GROUP[1], OTHER_GROUP[0]: OTHER_GROUP[1]} | {n: t for n, _, t in groups}
    return [(name, timeouts[name], group) for name, group in members.items() if group]


def run_group(check: Check, name: str, timeout: float, items: list, tests_deadline: float) -> dict:
    """Run the group's tests in pytest processes until each has a result: after a crash, a hang or a sticky
    CUDA error the rest runs in a new process (MAX_RUNS at most), the other cases of the same test function
    and kind last, so that one broken kind cannot use up the runs the other kinds need. Returns the group's
    record; every test's final record is in record["results"] (tests.jsonl gets those the harness made too)."""
    remaining, results, runs, reason = [item["nodeid"] for item in items], {}, [], ""
    row_of = {item["nodeid"]: (item["name"], item["params"].get("kind")) for item in items}
    broken_rows = set()
    while remaining:
        left = tests_deadline - time.monotonic()
        if len(runs) == MAX_RUNS or left < 10:
            reason = f"not run: {MAX_RUNS} processes of the group ended early" if left >= 10 else "not run: out of time"
            break
        offset, stacks = check.results.stat().st_size, check.scratch / f"stacks.{name}.{len(runs)}.txt"
        run = check.run(f"group {name}", group_command(check.results, stacks, remaining), min(timeout, left), stacks)
        records = check.new_results(offset)
        finished = {r["nodeid"]: r for r in records if r["event"] == "result"}
        unfinished = [r["nodeid"] for r in records if r["event"] == "start" and r["nodeid"] not in finished]
        if run["status"] in ("crashed", "timeout") and unfinished:
            culprit = unfinished[-1]
            outcome = "crashed" if run["status"] == "crashed" else "hung"
            why = (f"its process died of {run.get('signal', 'a signal')}" if outcome == "crashed"
                   else f"no result within {run['timeout_s']} s (the group's timeout, or the check's budget)")
            finished[culprit] = dict(event="result", nodeid=culprit, outcome=outcome, seconds=run["seconds"],
                                     errors=[], seed=None, message=why, stacks=run.get("stacks", ""), by="harness")
        results |= finished
        runs.append(dict(status=run["status"], rc=run["rc"], seconds=run["seconds"], tests=len(finished)))
        broken_rows |= {row_of[n] for n, r in finished.items()
                        if r["outcome"] in ("crashed", "hung") or r.get("sticky")}
        remaining = sorted((n for n in remaining if n not in results), key=lambda n: row_of[n] in broken_rows)
        if remaining and (run["rc"] in (0, 1) or not finished):
            reason = f"not run: pytest ended ({run['status']}, rc {run['rc']}) without running them; see the log"
            break
    for nodeid in remaining:
        results[nodeid] = dict(event="result", nodeid=nodeid, outcome="not run", seconds=0, errors=[], seed=None,
                               message=reason, by="harness")
    with open(check.results, "a") as f:
        for record in results.values():
            if record.get("by") == "harness":
                f.write(json.dumps(record) + "\n")
    outcomes = [r["outcome"] for r in results.values()]
    status = next((s for o, s in [("crashed", "crashed"), ("hung", "timeout"), ("failed", "failed"),
                                  ("not run", "incomplete")] if o in outcomes),
                  "skipped" if set(outcomes) == {"skipped"} else "passed")
    counts = {o: outcomes.count(o) for o in dict.fromkeys(outcomes)}
    return dict(name=name, status=status, tests=len(items), counts=counts, timeout_s=timeout, runs=runs,
                results=results)


def kernel_rows(items: list, results: dict) -> list[dict]:
    """One row per test function and weight kind (the `kind` parameter, where it has one), in collection order."""
    rows = {}
    for item in items:
        kind = str(item["params"].get("kind", "-"))
        row = rows.setdefault((item["name"], kind), dict(test=item["name"], kind=kind, total=0, counts={},
                                                         max_error=None, failed_cases=[]))
        record = results.get(item["nodeid"], dict(outcome="not run", errors=[], message="not planned"))
        outcome = record["outcome"]
        row["total"] += 1
        row["counts"][outcome] = row["counts"].get(outcome, 0) + 1
        for error in record["errors"]:
            if row["max_error"] is None or _worse(error["of_tolerance"], row["max_error"]["of_tolerance"]):
                row["max_error"] = error
        if outcome in ("failed", "crashed", "hung"):
            params = {k: v for k, v in item["params"].items() if k != "kind"}
            row["failed_cases"].append(dict(params=params, outcome=outcome, seed=record.get("seed"),
                                            sticky=record.get("sticky", False), message=record["message"][:400]))
    for row in rows.values():
        counts = row["counts"]
        row["status"] = next((s for o, s in [("crashed", "CRASH"), ("hung", "HANG"), ("failed", "FAIL"),
                                             ("not run", "NOT RUN")] if counts.get(o)),
                             "skip" if counts.get("skipped") == row["total"] else "pass")
    return list(rows.values())


def _worse(a: float, b: float) -> bool:
    return math.isnan(a) or (not math.isnan(b) and a > b)


def run_bench(check: Check) -> dict:
    left = check.left()
    if left < 60:
        return dict(status="skipped", reason=f"{left:.0f} s of the budget left")
    limit = min(BENCH_LIMIT_S, left - 60)
    args = BENCH_DRY_RUN_ARGS if check.dry_run else BENCH_ARGS
    run = check.run("bench", [sys.executable, "bench_gpu.py", "--time-limit", f"{limit:.0f}", *args], limit + 60)
    lines = run["output"].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("device: ")), None)
    record = dict(status=run["status"], rc=run["rc"], seconds=run["seconds"], time_limit_s=round(limit),
                  measured=[line for line in lines if line.startswith("measured ")],
                  lines=lines[start:] if start is not None else lines[-30:])
    if check.dry_run and run["rc"] == 1 and "needs cupy" in run["output"]:
        record["status"] = "no GPU (as expected in a dry run: its arguments parsed, then it stopped)"
    return record


def sanitizer_cases(plan: list, results: dict) -> list:
    """One small case per kernel group: the first that failed, crashed or hung, else the first."""
    cases = []
    for name, _, items in plan:
        if name in (NO_GPU_GROUP[0], "full_model") or not items:
            continue
        bad = [i for i in items if results.get(i["nodeid"], {}).get("outcome") in ("failed", "crashed", "hung")]
        cases.append((bad or items)[0]["nodeid"])
    return cases[:8]


def run_sanitizer(check: Check, plan: list, results: dict, has_gpu: bool) -> dict:
    cases = sanitizer_cases(plan, results)
    tool = shutil.which("compute-sanitizer")
    left = check.left()
    why = ("dry run" if check.dry_run else "no GPU" if not has_gpu else "compute-sanitizer is not on PATH"
           if tool is None else "no cases" if not cases else f"{left:.0f} s of the budget left"
           if left < SANITIZER_MIN_S else None)
    if why:
        return dict(status="skipped", reason=why, cases=cases)
    jsonl, stacks = check.scratch / "sanitizer.jsonl", check.scratch / "sanitizer.stacks"
    cmd = [tool, "--tool", "memcheck", "--report-api-errors", "no",
           *group_command(jsonl, stacks, cases, ["--gpu-check-no-pool"])]
    run = check.run("compute-sanitizer", cmd, min(150, left))
    found = re.search(r"ERROR SUMMARY: (\d+) error", run["output"])
    reports = [line for line in run["output"].splitlines() if line.startswith("========= ")
               and "COMPUTE-SANITIZER" not in line and "ERROR SUMMARY" not in line]
    return dict(status=run["status"], errors=int(found[1]) if found else None, cases=cases, seconds=run["seconds"],
                reports=reports[:40])


# -----------------------------------------------------------------------------
# Report


def describe(info: dict) -> list[str]:
    device = info.get("device", "- (the probe did not get this far)")
    if isinstance(device, dict):
        device = (f"{device['name']} (sm {device['compute_capability']}, {device['multiprocessors']} SMs, "
                  f"{device['memory_gib']} GiB, {device['free_gib']} free, L2 {device['l2_mib']} MiB)")
    packages = info.get("packages")
    if isinstance(packages, dict):
        packages = ", ".join(f"{name} {version}" for name, version in packages.items())
    get = lambda key: info.get(key, "-")  # noqa: E731 (a step the probe did not reach)
    return [f"GPU: {device}", f"nvidia-smi: {get('nvidia_smi')}",
            f"CUDA runtime {get('cuda_runtime')}, driver {get('cuda_driver')}, NVRTC {get('nvrtc')}; "
            f"nvcc: {get('nvcc')}; compute-sanitizer: {get('compute_sanitizer')}",
            f"Python {get('python')}, numpy {get('numpy')}, {packages}; backends {get('backends')}",
            f"trivial kernel launch: {get('trivial_launch')}; add_cuda against add_ref: {get('add_kernel')}"]


TABLE_HEADER = f"{'result':8} {'test':46} {'kind':5} {'passed':>7} {'max error':>12} {'of tol':>7}  failed cases"


def format_row(row: dict) -> str:
    """A kernel row under TABLE_HEADER: the worst error and its share of the tolerance, the cases that did not
    pass by their parameters (crashes and hangs with the reason)."""
    err = row["max_error"]
    value, used = ("-", "-") if err is None else (f"{_num(err['value'], '.2e')} {err['measure'][:3]}",
                                                  _num(err["of_tolerance"], ".3f"))
    cases = "; ".join(" ".join([c["outcome"], *(f"{k}={v}" for k, v in c["params"].items())]
                               + ([f"({c['message']})"] if c["outcome"] != "failed" else [])
                               + (["(a sticky CUDA error)"] if c["sticky"] else []))
                      for c in row["failed_cases"][:6])
    if len(row["failed_cases"]) > 6:
        cases += f" and {len(row['failed_cases']) - 6} more"
    if row["counts"].get("not run"):
        cases += f"; {row['counts']['not run']} not run"
    passed = f"{row['counts'].get('passed', 0)}/{row['total']}"
    return f"{row['status']:8} {row['test']:46} {row['kind']:5} {passed:>7} {value:>12} {used:>7}  {cases}".rstrip()


def _num(x, spec: str) -> str:
    """x in spec, or as it is where summary.json holds it as a string ("nan"); huge values in e-notation."""
    if not isinstance(x, float):
        return str(x)
    return format(x, spec) if abs(x) < 1e3 or not math.isfinite(x) else format(x, ".1e")


def _json_safe(obj):
    """NaN and infinities as strings, so that summary.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# -----------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The CUDA backend's whole check on a GPU (tests, bench, sanitizer) "
                                "in one command; --dry-run proves the harness on a CPU.",
                                epilog="example: python3 tests/gpu_check.py $OUT")
    p.add_argument("outdir", nargs="?", help="folder for gpu_check.log, tests.jsonl and summary.json")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: numpy stand-ins, tiny bench shapes")
    p.add_argument("--inject", action="append", choices=["crash", "hang", "fail"], default=[],
                   help="dry run only: add stand-ins that crash (abort, sticky CUDA error), hang or fail")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole check (default {BUDGET_S})")
    p.add_argument("--probe", metavar="PATH", help=argparse.SUPPRESS)  # the probe's child process
    args = p.parse_args(argv)
    if args.probe:
        probe(args.probe, args.dry_run)
        return 0
    if not args.outdir:
        p.error("give the output folder, e.g. python3 tests/gpu_check.py $OUT")
    if args.inject and not args.dry_run:
        p.error("--inject is for --dry-run only")
    check = Check(args.outdir, args.dry_run, args.budget)
    summary = check.summary
    check.say(f"gpu_check{' --dry-run' if args.dry_run else ''}: output in {check.out}, budget {args.budget:.0f} s")

    summary["environment"] = info = run_probe(check)
    check.save()
    for line in describe(info):
        check.say(line)

    real_items = collect(check, "tests/test_cuda.py")
    summary["test_cuda_plan"] = {name: len(items) for name, _, items in plan_groups(real_items, GROUPS)}
    check.say(f"tests/test_cuda.py: {len(real_items)} tests in groups {summary['test_cuda_plan']}")
    if args.dry_run:
        items = [i for i in collect(check, "tests/gpu_check_dry.py")
                 if not INJECTED.search(i["name"]) or INJECTED.search(i["name"])[1] in args.inject]
        plan = plan_groups(items, DRY_RUN_GROUPS)
        check.say(f"dry run: tests/gpu_check_dry.py's {len(items)} stand-ins in groups "
                  f"{ {name: len(group) for name, _, group in plan} }")
    else:
        items, plan = real_items, plan_groups(real_items, GROUPS)

    tests_deadline = check.deadline - min(BENCH_RESERVE_S, args.budget / 2)
    results, summary["groups"] = {}, []
    for name, timeout, group in plan:
        record = run_group(check, name, timeout, group, tests_deadline)
        results |= record.pop("results")
        summary["groups"].append(record)
        check.save()
        runs = ", ".join(f"{r['status']} {r['seconds']:.0f} s" for r in record["runs"]) or "no process"
        check.say(f"group {name:11} {record['status']:10} {record['counts']}  ({runs})")
    summary["kernels"] = rows = kernel_rows(items, results)

    summary["bench"] = bench = run_bench(check)
    check.say(f"bench: {bench['status']}" + (f" ({bench['seconds']:.0f} s)" if "seconds" in bench else ""))
    summary["sanitizer"] = sanitizer = run_sanitizer(check, plan, results, "cupy" in info.get("backends", []))
    cases = sanitizer.get("reason") or f"{len(sanitizer['cases'])} cases"
    check.say(f"compute-sanitizer: {sanitizer['status']}, {sanitizer.get('errors', '-')} errors ({cases})")

    bad_groups = [g["name"] for g in summary["groups"] if g["status"] not in ("passed", "skipped")]
    # an on-GPU test that skipped on the GPU machine was not checked: that is no pass
    summary["skipped_cuda_tests"] = skipped = [i["nodeid"] for i in items
                                               if i["cuda"] and results[i["nodeid"]]["outcome"] == "skipped"]
    bench_ok = bench["status"] == "ok" or bench["status"].startswith("no GPU (as expected")
    summary["ok"] = (bool(items) and not bad_groups and not skipped and bench_ok
                     and sanitizer.get("errors") in (None, 0))
    summary["seconds"] = round(time.monotonic() - check.start, 1)
    check.save()
    shutil.rmtree(check.scratch, ignore_errors=True)

    for line in ["", TABLE_HEADER, *map(format_row, rows), "", *bench.get("lines", [bench.get("reason", "")]),
                 *sanitizer.get("reports", [])[:10], ""]:
        check.say(line, stamp=False)
    check.say(f"{'all passed' if summary['ok'] else 'NOT all passed'}: {len(items)} tests, groups not passed "
              f"{bad_groups}, {len(skipped)} on-GPU tests skipped, {summary['seconds']:.0f} s; in {check.out}: "
              "summary.json, gpu_check.log, tests.jsonl")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
