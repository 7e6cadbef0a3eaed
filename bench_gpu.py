"""bench_gpu.py: decode and prefill speed of the CUDA backend on a random Llama-3.1-8B-shaped model.

    python bench_gpu.py                                  # the README table: q8_0, q4_0, bf16; ctx 512 and 32K
    python bench_gpu.py --kinds q8_0 --contexts 512 --layers 4 --no-torch    # a quick look
    python bench_gpu.py --time-limit 150    # what fits in 150 s (tests/gpu_check.py runs it so)

Weights are random numbers made on the GPU directly in their stored kind (no file, no conversion); the KV
cache is filled with random values too, as timing on zeros can flatter. One table is printed:
- decode tok/s per kind and context: one token per step with greedy sampling on the GPU and the token id
  read back each step, as generation does, each step a replay of one captured CUDA graph;
- the roofline: bytes a decode step must read (every weight once, plus the KV cache up to the context)
  over the device-to-device bandwidth measured here (a 1 GiB copy, counting bytes read plus written);
- prefill tok/s for a PREFILL-token prompt in one call, and its rate against cuBLAS's bf16 GEMM rate
  measured here (the tensor-core ceiling the prefill path runs on);
- the peer: PyTorch from this machine running the same shapes in bf16 with a static KV cache
  (torch.compile when it works, else eager), when torch with CUDA is importable.
"""

import argparse
import dataclasses
import statistics
import sys
import time
import types

import numpy as np

import kernels
import llama31
from kernels import QWeight

try:
    import cupy
except ImportError:
    cupy = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decode and prefill speed of llama31's CUDA backend on a random "
                                "Llama-3.1-8B-shaped model, with the bandwidth roofline and a PyTorch peer.")
    p.add_argument("--kinds", default="q8_0,q4_0,bf16", help="weight kinds, comma-separated (default q8_0,q4_0,bf16)")
    p.add_argument("--contexts", default="512,32768", help="decode contexts, comma-separated (default 512,32768)")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens for the prefill timing (default 2048)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per round (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--layers", type=int, default=32, help="transformer layers (default 32, as Llama 3.1 8B)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--no-compile", action="store_true", help="run the PyTorch peer without torch.compile")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds after which no new measurement starts; "
                   "the table shows what was measured and names what was skipped (default 0 = no limit)")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    bad = [k for k in args.kinds if k not in ("f32", "f16", "bf16", "q8_0", "q4_0")]
    if bad:
        p.error(f"unknown kinds {bad}; choose from f32, f16, bf16, q8_0, q4_0")
    if min(args.contexts) <= args.steps or args.prefill < 1 or args.layers < 1:
        p.error("contexts must exceed --steps, --prefill and --layers must be positive")
    if args.time_limit < 0:
        p.error(f"--time-limit must be 0 (no limit) or positive, got {args.time_limit}")
    args.deadline = time.perf_counter() + args.time_limit if args.time_limit else float("inf")
    return args


def out_of_time(args) -> bool:
    return time.perf_counter() > args.deadline


# -----------------------------------------------------------------------------
# Measuring


def median_ms(fn, rounds: int, calls: int = 1) -> float:
    """Median over rounds of the device time of `calls` calls of fn, in ms per call (after one warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / calls)
    return statistics.median(times)


def copy_bandwidth(rounds: int) -> float:
    """Device-to-device bytes per second: a 1 GiB copy moves 2 GiB (read + write)."""
    src = cupy.random.standard_normal(2**28, dtype=np.float32)
    dst = cupy.empty_like(src)
    ms = median_ms(lambda: cupy.copyto(dst, src), rounds, calls=5)
    return 2 * src.nbytes / (ms / 1e3)


def bf16_gemm_flops(rounds: int, n: int = 8192) -> float:
    """cuBLAS GemmEx rate with bf16 operands, float32 accumulation and output (the prefill path's ceiling)."""
    from cupy.cuda import cublas

    a = (cupy.random.standard_normal((n, n), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    b = (cupy.random.standard_normal((n, n), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    c = cupy.empty((n, n), np.float32)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()

    def gemm():
        cublas.gemmEx(handle, kernels._CUBLAS_OP_T, kernels._CUBLAS_OP_N, n, n, n, one.ctypes.data, a.data.ptr,
                      kernels._CUDA_R_16BF, n, b.data.ptr, kernels._CUDA_R_16BF, n, zero.ctypes.data, c.data.ptr,
                      kernels._CUDA_R_32F, n, kernels._CUBLAS_COMPUTE_32F, kernels._CUBLAS_GEMM_DEFAULT)

    return 2 * n**3 / (median_ms(gemm, rounds, calls=5) / 1e3)


# -----------------------------------------------------------------------------
# A random model on the GPU


def random_matrix(kind: str, shape: tuple) -> QWeight:
    """A (…, N, K) weight of `kind` filled on the GPU with values of a 0.02-std Gaussian's scale."""
    *lead, N, K = shape
    if kind in kernels.QUANTIZED:
        data_shape = (*lead, N, K // 2 if kind == "q4_0" else K)
        low, high, dtype = (-127, 128, np.int8) if kind == "q8_0" else (0, 256, np.uint8)
        data = cupy.random.randint(low, high, size=data_shape, dtype=dtype)
        # a group's largest weight is about 3 std = 0.06: q8_0 maps it to 127, q4_0 to 8
        scales = cupy.full((*lead, N, K // 32), 0.06 / (127 if kind == "q8_0" else 8), dtype=np.float16)
        return QWeight(data, scales)
    dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind]
    data = cupy.empty(shape, dtype=dtype)
    for index in np.ndindex(*lead):  # one matrix at a time: a float32 temporary of the whole stack is too big
        values = cupy.random.standard_normal((N, K), dtype=np.float32) * 0.02
        data[index] = (values.view(np.uint32) >> 16).astype(np.uint16) if kind == "bf16" else values.astype(dtype)
    return QWeight(data)


def random_model(cfg: llama31.Config, kind: str, ctx: int):
    """What llama31.forward reads of a Model: config, weights, layers, ops, RoPE tables."""
    tensors = {name: random_matrix(kind, shape) if is_matrix else cupy.ones(shape, np.float32)
               for name, shape, is_matrix in llama31.tensor_table(cfg)}
    weights = llama31.Weights(**tensors)
    cos, sin = llama31.rope_tables(cfg, ctx)
    return types.SimpleNamespace(config=cfg, weights=weights, layers=llama31.split_layers(weights, cfg.n_layers),
                                 ops=kernels.ops_for("cupy"), rope_cos=cupy.asarray(cos), rope_sin=cupy.asarray(sin),
                                 backend="cupy")


def decode_bytes(model, ctx: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step at context ctx must read."""
    w, cfg = model.weights, model.config
    nbytes = lambda q: q.data.nbytes + (0 if q.scales is None else q.scales.nbytes)  # noqa: E731
    weight_bytes = sum(nbytes(getattr(w, name)) for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"))
    return weight_bytes, 2 * cfg.n_layers * ctx * cfg.kv_dim * 4


def fill_cache(state):
    for cache in (state.key_cache.data, state.value_cache.data):
        for l in range(cache.shape[0]):
            cache[l] = cupy.random.standard_normal(cache.shape[1:], dtype=np.float32)


def decode_rate(model, ctx: int, args) -> tuple[float, str]:
    """Decode tokens per second near the end of a ctx-long cache, and how steps were launched."""
    state = llama31.build_run_state(model.config, ctx, 1, zeros=cupy.zeros)
    fill_cache(state)
    start_pos = ctx - args.steps - 1
    run = kernels.CudaGraphStep(
        lambda tokens, positions, slots: llama31.forward(model, state, tokens, positions, slots, slice(0, 1)))

    def steps():
        token = 1
        for i in range(args.steps):
            logits = run([token], [start_pos + i], [0])
            token = kernels.sample_argmax_cuda(logits[-1])  # the id comes back, as in generation

    steps()  # warm-up: compiles, captures the graph
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        steps()
        times.append(time.perf_counter() - t0)
    return args.steps / statistics.median(times), "CUDA graph"


def prefill_rate(model, args) -> tuple[float, float]:
    """(prompt tokens per second, achieved FLOP/s) of one forward over an args.prefill-token prompt."""
    cfg, P = model.config, args.prefill
    state = llama31.build_run_state(cfg, P, P, zeros=cupy.zeros)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=P)

    def prefill():
        llama31.forward(model, state, tokens, np.arange(P), np.zeros(P, np.int64), slice(P - 1, None))

    ms = median_ms(prefill, args.rounds)
    matrix_params = sum(int(np.prod(getattr(model.weights, n).shape)) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    flops = 2 * matrix_params * P + 2 * cfg.dim * cfg.vocab_size  # the classifier runs on the last token only
    flops += 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * P * (P + 1) / 2  # causal QK^T and PV
    return P / (ms / 1e3), flops / (ms / 1e3)


# -----------------------------------------------------------------------------
# The PyTorch peer: the same shapes in bf16, static KV cache (gpt-fast's recipe), greedy decode


def torch_decode_rates(cfg: llama31.Config, contexts, args) -> tuple[dict, str]:
    import torch
    import torch.nn.functional as F

    dev, bf16 = "cuda", torch.bfloat16
    L, D, H, KV, Dh, F_, V = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                              cfg.vocab_size)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=bf16) * 0.02  # noqa: E731
    layers = [dict(wqkv=rnd((H + 2 * KV) * Dh, D), wo=rnd(D, H * Dh), w13=rnd(2 * F_, D), w2=rnd(D, F_),
                   n1=torch.ones(D, device=dev, dtype=bf16), n2=torch.ones(D, device=dev, dtype=bf16))
              for _ in range(L)]
    emb, out_w, norm = rnd(V, D), rnd(V, D), torch.ones(D, device=dev, dtype=bf16)
    rates, how = {}, "eager"
    for ctx in contexts:
        if out_of_time(args):
            break
        cache_k = torch.randn(L, 1, KV, ctx, Dh, device=dev, dtype=bf16)
        cache_v = torch.randn(L, 1, KV, ctx, Dh, device=dev, dtype=bf16)
        cos, sin = (torch.from_numpy(t).to(dev) for t in llama31.rope_tables(cfg, ctx))

        def step(token, pos):  # token (1, 1) int64, pos (1,) int64, both on the GPU
            x = emb[token]  # (1, 1, D)
            mask = (torch.arange(ctx, device=dev) <= pos)[None, None, None, :]
            c, s = cos[pos][:, None, :], sin[pos][:, None, :]  # (1, 1, Dh/2)
            for l, w in enumerate(layers):
                h = F.rms_norm(x, (D,), w["n1"], cfg.norm_eps)
                q, k, v = (h @ w["wqkv"].T).split([H * Dh, KV * Dh, KV * Dh], dim=-1)
                q, k = (t.float().view(1, -1, Dh // 2, 2) for t in (q.view(1, H, Dh), k.view(1, KV, Dh)))
                q, k = (torch.stack([t[..., 0] * c - t[..., 1] * s, t[..., 0] * s + t[..., 1] * c], -1)
                        .flatten(-2).to(bf16).view(1, -1, 1, Dh) for t in (q, k))
                cache_k[l].index_copy_(2, pos, k)
                cache_v[l].index_copy_(2, pos, v.view(1, KV, 1, Dh))
                o = F.scaled_dot_product_attention(q, cache_k[l], cache_v[l], attn_mask=mask, enable_gqa=True)
                x = x + o.view(1, 1, H * Dh) @ w["wo"].T
                h = F.rms_norm(x, (D,), w["n2"], cfg.norm_eps)
                g, u = (h @ w["w13"].T).chunk(2, dim=-1)
                x = x + (F.silu(g) * u) @ w["w2"].T
            return F.rms_norm(x, (D,), norm, cfg.norm_eps) @ out_w.T

        run = step
        if not args.no_compile:
            try:
                run = torch.compile(step, mode="reduce-overhead", fullgraph=True)
                with torch.no_grad():
                    for _ in range(3):
                        run(torch.ones(1, 1, dtype=torch.long, device=dev), torch.tensor([ctx - 2], device=dev))
                how = "torch.compile"
            except Exception as e:  # noqa: BLE001 (any compile failure falls back to eager, said in the table)
                print(f"torch.compile failed ({type(e).__name__}: {str(e)[:100]}); eager peer", file=sys.stderr)
                run, how = step, "eager"
        start_pos = ctx - args.steps - 1
        with torch.no_grad():
            def steps():
                token = torch.ones(1, 1, dtype=torch.long, device=dev)
                for i in range(args.steps):
                    logits = run(token, torch.tensor([start_pos + i], device=dev))
                    token = logits.argmax(-1).view(1, 1)
                    int(token)  # the id comes back to the host every step, as for llama31
            steps()
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                steps()
                times.append(time.perf_counter() - t0)
        rates[ctx] = args.steps / statistics.median(times)
    return rates, how


# -----------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    args = parse_args(argv)
    if "cupy" not in kernels.available_backends():
        print("bench_gpu: needs cupy and an NVIDIA GPU (pip install cupy-cuda12x or cupy-cuda13x); none found here",
              file=sys.stderr)
        return 1
    cfg = dataclasses.replace(llama31.Config(), n_layers=args.layers, max_seq_len=max(max(args.contexts), args.prefill))
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bandwidth = copy_bandwidth(args.rounds)
    gemm = bf16_gemm_flops(args.rounds)
    rows, prefill, skipped = [], {}, []
    for kind in args.kinds:
        if out_of_time(args):
            skipped.append(kind)
            continue
        model = random_model(cfg, kind, max(max(args.contexts), args.prefill))
        for ctx in args.contexts:
            if out_of_time(args):
                skipped.append(f"{kind} decode at {ctx}")
                continue
            rate, how = decode_rate(model, ctx, args)
            weight_bytes, kv_bytes = decode_bytes(model, ctx)
            rows.append((kind, ctx, rate, bandwidth / weight_bytes, bandwidth / (weight_bytes + kv_bytes), how))
            # one line as each figure comes, so a run stopped from outside still leaves what it measured
            print(f"measured {kind} decode at {ctx}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
            cupy.get_default_memory_pool().free_all_blocks()  # the run state of this context
        if out_of_time(args):
            skipped.append(f"{kind} prefill")
        else:
            prefill[kind] = prefill_rate(model, args)
            print(f"measured {kind} prefill: {prefill[kind][0]:.0f} tok/s", file=sys.stderr, flush=True)
        del model
        cupy.get_default_memory_pool().free_all_blocks()
    peer, peer_how = {}, "not run"
    if not args.no_torch and out_of_time(args):
        peer_how = "skipped: time limit"
    elif not args.no_torch:
        try:
            import torch

            if torch.cuda.is_available():
                peer, peer_how = torch_decode_rates(cfg, args.contexts, args)
                skipped += [f"torch at {ctx}" for ctx in args.contexts if ctx not in peer]
            else:
                peer_how = "torch has no CUDA here"
        except ImportError:
            peer_how = "torch is not installed"

    print(f"\ndevice: {device} | {time.strftime('%Y-%m-%d')} | python bench_gpu.py {' '.join(sys.argv[1:])}")
    print(f"{cfg.n_layers}-layer Llama-3.1-8B shapes | D2D copy {bandwidth / 1e9:.0f} GB/s | "
          f"cuBLAS bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
    print(f"{'kind':6} {'ctx':>6} {'decode tok/s':>13} {'roofline':>9} {'% roof':>7} {'roof+KV':>8} {'% roof+KV':>10} "
          f"{'torch bf16':>11} {'x torch':>8}  launch")
    for kind, ctx, rate, roof, roof_kv, how in rows:
        t = peer.get(ctx)
        print(f"{kind:6} {ctx:>6} {rate:>13.1f} {roof:>9.1f} {100 * rate / roof:>6.0f}% {roof_kv:>8.1f} "
              f"{100 * rate / roof_kv:>9.0f}% {t if t else float('nan'):>11.1f} "
              f"{rate / t if t else float('nan'):>8.2f}  {how}")
    print(f"torch peer: {peer_how} (bf16, static KV cache attended in full with a mask)")
    for kind, (tok_s, flops) in prefill.items():
        print(f"prefill {args.prefill} tokens, {kind}: {tok_s:.0f} tok/s = {flops / 1e12:.0f} TFLOP/s = "
              f"{100 * flops / gemm:.0f}% of the bf16 GEMM rate")
    if skipped:
        print(f"time limit {args.time_limit:.0f} s reached: skipped {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
