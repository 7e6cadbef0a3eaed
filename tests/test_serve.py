"""serve.py: request checks, chat rendering with Llama 3.1 tools, tool-call parsing, stop strings, batch files.

References (test-only packages; tests skip with a reason when one is absent):
    llama-models  Meta's Llama 3 tokenizer.model, ChatFormat and llama3_1/prompt_format.md
"""

import json
import pathlib
from dataclasses import dataclass

import pytest

import serve
import tokenizer

# -----------------------------------------------------------------------------
# Fixtures
# The real Llama 3 tokenizer (from llama-models) and Meta's ChatFormat around it.


@pytest.fixture(scope="module")
def llama3_path():
    llama_models = pytest.importorskip("llama_models")
    path = pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"llama-models ships no {path}")
    return path


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
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_fields_name_the_field(body, param):
    with pytest.raises(serve.APIError) as e:
        serve.parse_common(body, DEFAULTS)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_fields_and_defaults():
    job = serve.parse_common({"temperature": 0, "max_tokens": 5, "stop": "x", "seed": 3, "stream": True,
                              "stream_options": {"include_usage": True}}, DEFAULTS)
    assert job["sampling"] == dict(DEFAULTS, temperature=0.0, seed=3)
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
