"""The serving engine: rows of several sequences through one forward pass, continuous batching, prefix reuse.

The central property: a request's greedy tokens do not depend on what else is in the batch, because every
op of the numba backend computes each row on its own (bit for bit the same alone, in a prefill chunk, or
beside other sequences' rows). The numpy backend multiplies through BLAS, whose rounding may change with
the number of rows, so there the logits agree within a bound instead.
"""

import threading

import numpy as np
import pytest

import kernels
import llama31
from conftest import TINY

needs_numba = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")
PROMPTS = [[1, 2, 3], list(range(5, 45)), [7] * 11, list(range(100, 170)), [9, 8]]


def alone(model, prompt, max_tokens):
    return [int(t) for t in "".join(model.generate(prompt, max_tokens=max_tokens, temperature=0.0)).split()]


def batched(model, prompts, max_tokens, parallel):
    engine = llama31.Engine(model, parallel=parallel, max_queue=None, mixed_prefill_rows=8)
    requests = [engine.submit(p, llama31.Sampler(temperature=0.0), max_tokens) for p in prompts]
    run_all(engine)
    return [[s.token for s in r.steps()] for r in requests], requests, engine


@needs_numba
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_batched_greedy_tokens_equal_alone(tiny_files, kind):
    """5 requests on 3 slots: prompts prefilled in chunks of 8 between decode steps, slots reused, and every
    request gets exactly the tokens it gets alone."""
    model = llama31.load(tiny_files[kind], backend="numba", ctx=128)
    got, requests, engine = batched(model, PROMPTS, 12, parallel=3)
    assert got == [alone(model, p, 12) for p in PROMPTS]
    assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in requests)
    assert engine.busy_slots == 0 and engine.queued == 0


@needs_numba
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_mixed_rows_give_the_logits_of_separate_calls_bit_for_bit(tiny_files, kind):
    """One forward over decode rows of two sequences and a prefill chunk of a third equals three calls."""
    model = llama31.load(tiny_files[kind], backend="numba", ctx=64)
    prompts = {0: [5, 6, 7, 8, 9], 1: [3, 1, 4, 1, 5, 9, 2, 6], 2: [11, 12, 13, 14, 15, 16]}

    def prime(state):  # slots 0 and 1 hold their prompts but the last token
        for s in (0, 1):
            model.prefill(state, prompts[s][:-1], slot=s)

    state = model.new_state(n_slots=3)
    prime(state)
    rows = [(0, prompts[0][-1], 4), (1, prompts[1][-1], 7)] + [(2, t, p) for p, t in enumerate(prompts[2])]
    slots, tokens, positions = (np.array(a) for a in zip(*rows))
    together = llama31.forward(model, state, tokens, positions, slots, slice(None)).copy()
    state = model.new_state(n_slots=3)
    prime(state)
    separate = np.concatenate([model.decode(state, prompts[0][-1], slot=0).copy(),
                               model.decode(state, prompts[1][-1], slot=1).copy(),
                               llama31.forward(model, state, tokens[2:], positions[2:], slots[2:],
                                               slice(None)).copy()])
    np.testing.assert_array_equal(together, separate)


def test_numpy_backend_batches_within_a_bound(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=128)
    engine = llama31.Engine(model, parallel=2, max_queue=None)
    requests = [engine.submit(p, llama31.Sampler(temperature=0.0), 6, logprobs=0) for p in PROMPTS[:3]]
    run_all(engine)
    for prompt, request in zip(PROMPTS[:3], requests):
        steps = list(request.steps())
        ids = prompt + [s.token for s in steps]
        want = model.logits(ids)[len(prompt) - 1:-1].astype(np.float64)
        want_lp = [w[t] - np.log(np.exp(w - w.max()).sum()) - w.max() for w, t in zip(want, ids[len(prompt):])]
        np.testing.assert_allclose([s.logprob for s in steps], want_lp, atol=1e-4)


def run_all(engine):
    while engine.busy_slots or engine.queued:
        engine.step()


def test_logprobs_and_top_logprobs(tiny_files):
    """Each step's logprob is the log-softmax of the model's logits at the sampled token, and top_logprobs
    are the k most likely tokens in order (sampling at temperature 1 so the chosen token varies)."""
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=1)
    request = engine.submit([4, 5, 6], llama31.Sampler(temperature=1.0, top_p=1.0, seed=3), 4, logprobs=5)
    run_all(engine)
    steps = list(request.steps())
    logits = model.logits([4, 5, 6] + [s.token for s in steps]).astype(np.float64)
    for i, step in enumerate(steps):
        row = logits[2 + i]
        log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert step.logprob == pytest.approx(log_probs[step.token], abs=1e-4)
        assert [t for t, _ in step.top_logprobs] == list(np.argsort(-log_probs, kind="stable")[:5])
        assert [lp for _, lp in step.top_logprobs] == pytest.approx(np.sort(log_probs)[::-1][:5], abs=1e-4)


def test_prefix_reuse_prefills_only_the_new_suffix(tiny_files):
    """The next turn of a conversation (its prompt = the last prompt + answer + more) finds its slot's cache:
    only the tokens after the shared prefix are prefilled, and the answer is the one a fresh slot gives."""
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=128)
    engine = llama31.Engine(model, parallel=2)
    first = engine.submit(PROMPTS[1], llama31.Sampler(temperature=0.0), 5)
    other = engine.submit(PROMPTS[3], llama31.Sampler(temperature=0.0), 5)
    run_all(engine)
    answer = [s.token for s in first.steps()]
    follow_up = PROMPTS[1] + answer + [200, 201, 202]
    second = engine.submit(follow_up, llama31.Sampler(temperature=0.0), 5)
    run_all(engine)
    # the last answer token was never fed (max_tokens ended the request), so the cache holds prompt + 4
    assert first.cached_tokens == 0 and other.cached_tokens == 0
    assert second.slot is None and second.cached_tokens == len(PROMPTS[1]) + len(answer) - 1
    fresh = llama31.Engine(model, parallel=1)
    again = fresh.submit(follow_up, llama31.Sampler(temperature=0.0), 5)
    run_all(fresh)
    assert [s.token for s in second.steps()] == [s.token for s in again.steps()]


def test_a_prompt_held_whole_in_a_slot_still_feeds_its_last_token(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=1)
    first = engine.submit([1, 2, 3, 4], llama31.Sampler(temperature=0.0), 3)
    run_all(engine)
    again = engine.submit([1, 2, 3, 4], llama31.Sampler(temperature=0.0), 3)
    run_all(engine)
    assert again.cached_tokens == 3
    assert [s.token for s in again.steps()] == [s.token for s in first.steps()]


def test_stop_ids_end_a_request_without_yielding_the_stop_token(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=1)
    free = engine.submit([3, 4, 5], llama31.Sampler(temperature=0.0), 8)
    run_all(engine)
    tokens = [s.token for s in free.steps()]
    stopped = engine.submit([3, 4, 5], llama31.Sampler(temperature=0.0), 8, stop_ids={tokens[2]})
    run_all(engine)
    assert stopped.finish_reason == "stop"
    assert [s.token for s in stopped.steps()] == tokens[:tokens.index(tokens[2])]


def test_context_full_ends_with_length(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=16)
    engine = llama31.Engine(model, parallel=2)
    request = engine.submit(list(range(10)), llama31.Sampler(temperature=0.0), None)
    run_all(engine)
    assert request.finish_reason == "length" and request.completion_tokens == 16 - 10 + 1


def test_cancel_frees_the_slot_at_the_next_step(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=1)
    request = engine.submit([1, 2, 3], llama31.Sampler(temperature=0.0), 50)
    engine.step()
    engine.step()
    request.cancel()
    engine.step()
    assert request.finish_reason == "cancelled" and engine.busy_slots == 0
    assert len(list(request.steps())) == 2


@pytest.mark.parametrize("args, message", [
    (([],), "prompt_ids: no tokens"),
    (([1, 256],), "outside this model's vocabulary 0..255"),
    (([-1],), "outside this model's vocabulary 0..255"),
    ((list(range(16)),), "a slot holds 16"),
    (([1], None, 0), "max_tokens must be >= 1"),
    (([1], None, 5, None, 21), "logprobs must be in 0..20"),
])
def test_submit_rejects_bad_arguments(tiny_files, args, message):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=16)
    engine = llama31.Engine(model, parallel=1)
    prompt, sampler, *rest = args + (None,) * (2 - len(args))
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, sampler or llama31.Sampler(), *rest)
    assert engine.queued == 0


def test_a_full_queue_refuses_and_a_threaded_engine_serves_the_rest(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=2, max_queue=1)  # room for 2 (the free slots) + 1 waiting
    requests = [engine.submit(p, llama31.Sampler(temperature=0.0), 4) for p in PROMPTS[:3]]
    with pytest.raises(llama31.QueueFull):
        engine.submit([1], llama31.Sampler(), 4)
    engine.start()
    try:
        results = {}

        def read(i):
            results[i] = [s.token for s in requests[i].steps(timeout=60)]
        readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for r in readers:
            r.start()
        for r in readers:
            r.join(timeout=120)
        assert all(len(results[i]) == 4 for i in range(3))
        late = engine.submit([2, 3], llama31.Sampler(temperature=0.0), 2)
        assert len(list(late.steps(timeout=60))) == 2
    finally:
        engine.close()
    assert not engine.thread.is_alive()


def test_close_cancels_what_is_left(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=1)
    requests = [engine.submit([1, 2], llama31.Sampler(), 40) for _ in range(3)]
    engine.step()
    engine.close()
    assert [r.finish_reason for r in requests] == ["cancelled"] * 3
    assert all(isinstance(list(r.steps(timeout=1)), list) for r in requests)  # readers are released


def test_generate_batch_returns_texts_and_finish_reasons(tiny_files):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    out = model.generate_batch([[1, 2, 3], [4, 5]], max_tokens=3, temperature=0.0)
    assert [reason for _, reason in out] == ["length", "length"]
    assert [text for text, _ in out] == ["".join(model.generate(p, max_tokens=3, temperature=0.0))
                                         for p in ([1, 2, 3], [4, 5])]


def test_a_prompt_longer_than_a_step_runs_alone(tiny_files):
    # steps that only feed a prompt chunk sample no row: that used to crash the engine (float64 empty index)
    model = llama31.Model(tiny_files["f32"], backend="numpy", ctx=64, prefill_chunk=8)
    engine = llama31.Engine(model, parallel=2, max_queue=None)
    request = engine.submit(PROMPTS[1], llama31.Sampler(temperature=0.0), 4)  # 40 tokens: 5 prompt-only steps
    while engine.busy_slots or engine.queued:
        engine.step()
    assert [s.token for s in request.steps()] == alone(model, PROMPTS[1], 4)


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(tiny_files, monkeypatch):
    model = llama31.load(tiny_files["f32"], backend="numpy", ctx=64)
    engine = llama31.Engine(model, parallel=2)
    real_forward = llama31.forward
    calls = []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in a test")
        return real_forward(*args)
    monkeypatch.setattr(llama31, "forward", failing_once)
    engine.start()
    try:
        broken = engine.submit([1, 2, 3], llama31.Sampler(temperature=0.0), 5)
        assert len(list(broken.steps(timeout=60))) == 1
        assert broken.finish_reason == "error" and "out of memory" in broken.error
        after = engine.submit([1, 2, 3], llama31.Sampler(temperature=0.0), 5)
        assert len(list(after.steps(timeout=60))) == 5 and after.finish_reason == "length"
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], llama31.Sampler(), 1)


def test_more_decode_rows_than_the_mixed_budget_fit_one_call(tiny_files):
    """parallel slots all decoding plus a new prompt never exceed the rows a forward call takes"""
    model = llama31.Model(tiny_files["f32"], backend="numpy", ctx=64, prefill_chunk=8)
    engine = llama31.Engine(model, parallel=6, max_queue=None, mixed_prefill_rows=4)
    requests = [engine.submit(list(range(1, 4 + i)), llama31.Sampler(temperature=0.0), 6) for i in range(9)]
    run_all(engine)
    assert all(r.finish_reason == "length" and r.completion_tokens == 6 for r in requests)
