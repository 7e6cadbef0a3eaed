"""serve: an OpenAI-compatible HTTP server and offline batch jobs on llama31's continuous-batching engine.

    python llama31.py --serve [-m MODEL] [--host 127.0.0.1] [--port 8080] [--parallel 4] [--ctx N]
    python llama31.py --batch requests.jsonl --out results.jsonl [--parallel 4]

Standard library only (http.server with a thread per connection, json). The engine (llama31.Engine) owns
the KV-cache slots and the scheduler; this file is the protocol around it: JSON in and out, SSE framing,
OpenAI error objects, chat rendering with Llama 3.1 tools, stop strings and tool-call parsing.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
Fields: messages / prompt, max_tokens (or max_completion_tokens), temperature, top_p, top_k, min_p,
repetition_penalty, seed, stop (a string or a list of up to 16), stream, stream_options.include_usage,
logprobs and top_logprobs (chat: bool + 0..20; completions: logprobs 0..20), tools and tool_choice, and
llama.cpp's ignore_eos (only max_tokens or the context ends the answer: for benchmarks).
Absent sampling fields take the CLI's values (temperature 0.6, top_p 0.9: Meta's generation defaults).
A stop string never reaches the client: text that could be the start of one is held back until it is
clear. Unknown fields are ignored, as OpenAI's own server ignores unknown fields; n > 1 is refused.

Tool calls (Llama 3.1, https://github.com/meta-llama/llama-models llama3_1/prompt_format.md): OpenAI
function tools become Meta's JSON tool prompt (tools named brave_search, wolfram_alpha, photogen or
code_interpreter become the built-in ones); the model answers `{"name": ..., "parameters": {...}}`
(maybe after <|python_tag|>) or `<|python_tag|>brave_search.call(query="...")`, which come back as
`tool_calls` with finish_reason "tool_calls". Calls are found with json.JSONDecoder.raw_decode at each
"{" (nested objects, braces inside strings and prose around the JSON are fine) and must name an offered
tool; anything else stays content. tool_choice "none" offers the tools but parses no call; "required"
and a named function are made to hold without constrained decoding by writing the start of the call into
the assistant turn (`{"name": "f", "parameters": ` for a named function, `{"name": "` for "required"),
which the model then completes; if it still produces no valid call, its text comes back as content.
`role: "tool"` messages are sent in Llama 3.1's ipython turn. Models with their own chat template
(SmolLM2) serve chat without tools: tools, tool_calls and tool messages get a 400.

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON,
wrong types, out-of-range values and prompts that do not fit the context (always before any SSE byte),
404 for an unknown path or model, 411/413 for a missing or too large body, 503 with Retry-After when
the engine's queue is full. A client that goes away is noticed between two steps and its request is
cancelled, which frees its slot.

Batch jobs: one JSON request per line with an "id" (chat if it has "messages", else a completion); each
result line is {"id", "response"} or {"id", "error"}, written and flushed as it finishes; a rerun skips
the ids already in the output file.
"""

import ast
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import llama31
import tokenizer as tokenizers

# -----------------------------------------------------------------------------
# Constants
# Limits on what a request may ask for, and the text markers of Llama 3.1's tool calls.

MAX_BODY_BYTES = 4 << 20  # a request body larger than this gets a 413 without being read
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
RETRY_AFTER_SECONDS = 1  # told to clients that find the queue full
SOCKET_TIMEOUT_SECONDS = 60  # a client that stalls this long mid-request is dropped
POLL_SECONDS = 0.25  # while a request waits for a slot or its prefill, its client is checked this often
PYTHON_TAG = "<|python_tag|>"


# -----------------------------------------------------------------------------
# Errors
# One exception carries an HTTP status and OpenAI's error object; the handler turns it into a response.


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {404: "not_found_error", 503: "server_overloaded"}.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# -----------------------------------------------------------------------------
# Request fields
# Each field checked for type and range; the result is a Job that both the server and batch jobs run.


@dataclass
class Job:
    kind: str  # "chat" or "completion"
    prompt_ids: list  # the tokens the engine prefills (for a forced tool call, ending with its start)
    sampling: dict  # llama31.Sampler arguments
    max_tokens: int | None  # None: until a stop token or the context is full
    stop: list  # stop strings
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the top k
    tool_names: list = field(default_factory=list)  # calls may name these; empty: no call is parsed
    prefill: str = ""  # the start of a forced tool call, written into the assistant turn
    ignore_eos: bool = False  # only max_tokens or the context ends it (benchmarks; llama.cpp's field)


def _get(body: dict, name: str, types, default=None, check=None, message: str = ""):
    """body[name] if present and not null, of one of `types` (bool is never a number), passing `check`."""
    value = body.get(name)
    if value is None:
        return default
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise _bad(name, f"expected {names}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise _bad(name, f"{message}, got {value!r:.40}")
    return value


def parse_sampling(body: dict, defaults: dict) -> dict:
    num = (int, float)
    return dict(
        temperature=float(_get(body, "temperature", num, defaults["temperature"], lambda v: 0 <= v <= 2,
                               "must be in [0, 2]")),
        top_p=float(_get(body, "top_p", num, defaults["top_p"], lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=_get(body, "top_k", (int,), defaults["top_k"], lambda v: v >= 0, "must be >= 0"),
        min_p=float(_get(body, "min_p", num, defaults["min_p"], lambda v: 0 <= v < 1, "must be in [0, 1)")),
        repetition_penalty=float(_get(body, "repetition_penalty", num, defaults["repetition_penalty"],
                                      lambda v: v > 0, "must be > 0")),
        seed=_get(body, "seed", (int,), None, lambda v: v >= 0, "must be >= 0"),
    )


def parse_stop(body: dict) -> list:
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise _bad("stop", f"each stop must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    return stop


def parse_common(body: dict, defaults: dict) -> dict:
    """The fields chat and completions share, as Job keyword arguments (prompt and logprobs aside)."""
    if _get(body, "n", (int,), 1) != 1:
        raise _bad("n", "only n = 1 is supported")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "must be >= 1")
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, lambda v: v >= 1, "must be >= 1")
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise _bad("stream_options", "only allowed with stream: true")
    include_usage = _get(options, "include_usage", (bool,), False)
    return dict(sampling=parse_sampling(body, defaults), max_tokens=max_tokens, stop=parse_stop(body),
                stream=stream, include_usage=include_usage, ignore_eos=_get(body, "ignore_eos", (bool,), False))


def parse_chat_logprobs(body: dict) -> int | None:
    on = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
               f"must be in [0, {MAX_TOP_LOGPROBS}]")
    if top and not on:
        raise _bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if on else None


def parse_completion_logprobs(body: dict) -> int | None:
    return _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                f"must be in [0, {MAX_TOP_LOGPROBS}]")


# -----------------------------------------------------------------------------
# Prompts
# Completion prompts as text or ids; chat messages rendered with the model's chat format, Llama 3.1 tools.


def encode_completion_prompt(tok, prompt, vocab_size: int) -> list:
    """prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if tok is None:
            raise _bad("prompt", "this model file has no tokenizer: give the prompt as a list of token ids")
        return tok.encode(prompt, bos=tok.add_bos)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise _bad("prompt", f"token ids must be in [0, {vocab_size})")
        return list(prompt)
    raise _bad("prompt", "expected a non-empty string or list of token ids (one prompt: n > 1 is not supported)")


def _text_content(message: dict, index: int, may_be_empty: bool) -> str:
    """A message's content: a string or a list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    param = f"messages[{index}].content"
    if content is None and may_be_empty:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(param, "expected a string or a list of text parts")


def _tool_call_to_meta(call, param: str) -> dict:
    """An OpenAI assistant tool call -> tokenizer.py's {"tool_name", "arguments"}."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad(param, "expected {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as e:
        raise _bad(param, f"function.arguments is not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise _bad(param, "function.arguments must be a JSON object")
    needs = {"code_interpreter": "code"}.get(function["name"], "query")
    if function["name"] in tokenizers.BUILTIN_TOOLS and not isinstance(arguments.get(needs), str):
        raise _bad(param, f"built-in tool {function['name']} takes a string argument {needs!r}")
    return {"tool_name": function["name"], "arguments": arguments}


def messages_to_meta(messages, tools_allowed: bool) -> list:
    """OpenAI chat messages -> tokenizer.py's message dicts (tool results in the ipython role)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}].role", "expected system, developer, user, assistant or tool")
        calls = m.get("tool_calls") if role == "assistant" else None
        if (role == "tool" or calls) and not tools_allowed:
            raise _bad(f"messages[{i}]", "this model's chat template has no tool support")
        content = _text_content(m, i, may_be_empty=role == "assistant")
        if role == "tool":
            out.append({"role": "ipython", "content": content})
        elif calls:
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls", "expected a list")
            meta_calls = [_tool_call_to_meta(c, f"messages[{i}].tool_calls[{k}]") for k, c in enumerate(calls)]
            # Llama 3.1 ends a tool call with <|eom_id|> (llama3_1/prompt_format.md), so the replay does too
            out.append({"role": "assistant", "content": content, "tool_calls": meta_calls,
                        "stop_reason": "end_of_message"})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def tools_to_meta(tools) -> list:
    """OpenAI function tools -> tokenizer.py's Meta tool definitions (JSON-schema properties as params)."""
    if not isinstance(tools, list):
        raise _bad("tools", "expected a list of {\"type\": \"function\", \"function\": {...}}")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
            raise _bad(f"tools[{k}]", "expected {\"type\": \"function\", \"function\": {\"name\": "
                                      "letters, digits, _ or -, \"description\", \"parameters\"}}")
        schema = function.get("parameters") or {}
        properties = (schema.get("properties") or {}) if isinstance(schema, dict) else None
        required = (schema.get("required") or []) if isinstance(schema, dict) else None
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise _bad(f"tools[{k}].function.parameters", "expected a JSON schema object with properties")
        params = {p: {"param_type": str(s.get("type", "string")) if isinstance(s, dict) else "string",
                      "description": str(s.get("description", "")) if isinstance(s, dict) else "",
                      "required": p in required} for p, s in properties.items()}
        out.append({"tool_name": name, "description": str(function.get("description", "")),
                    "parameters": params})
    if len({t["tool_name"] for t in out}) != len(out):
        raise _bad("tools", "tool names must be unique")
    return out


def pick_tools(body: dict, tools: list) -> tuple[list, str]:
    """(names a call may use, text that starts the assistant turn) for tool_choice."""
    names = [t["tool_name"] for t in tools]
    choice = body.get("tool_choice", "auto")
    if choice in ("none", "auto"):
        return (names if choice == "auto" else []), ""
    if not tools:
        raise _bad("tool_choice", "needs tools")
    if choice == "required":
        return names, (_call_start(names[0]) if len(names) == 1 else '{"name": "')
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise _bad("tool_choice", f"expected none, auto, required or {{\"type\": \"function\", \"function\": "
                                  f"{{\"name\": one of {names}}}}}")
    return [name], _call_start(name)


def _call_start(name: str) -> str:
    """The first characters of a Llama 3.1 call of `name`: the model writes the rest."""
    if name == "code_interpreter":
        return PYTHON_TAG
    if name in tokenizers.BUILTIN_TOOLS:
        return f"{PYTHON_TAG}{name}.call("
    return f'{{"name": {json.dumps(name)}, "parameters": '


def render_chat(tok, body: dict, date_string: str | None = None) -> tuple[list, list, str]:
    """(prompt ids, tool names a call may use, prefill text) for a chat request."""
    if tok is None or not tok.has_chat_template:
        raise _bad("messages", "this model has no chat template (a base model?): use /v1/completions")
    llama3 = tok.chat_format == "llama3"
    tools = _get(body, "tools", (list,), [])
    if tools and not llama3:
        raise _bad("tools", "this model's chat template has no tool support; tools need a Llama 3.1 model")
    meta_tools = tools_to_meta(tools)
    messages = messages_to_meta(body.get("messages"), tools_allowed=llama3)
    names, prefill = pick_tools(body, meta_tools)
    try:
        ids = tok.encode_dialog(messages, tools=meta_tools or None, date_string=date_string)
    except ValueError as e:  # the chat template refused the conversation (e.g. roles out of order)
        raise _bad("messages", str(e)) from None
    ids += tok.encode(prefill, bos=False, allowed_special={PYTHON_TAG} & set(tok.special_tokens))
    return ids, names, prefill


def today() -> str:
    """The 'Today Date' of Meta's tool system prompt ("21 September 2024")."""
    return datetime.now().strftime("%d %B %Y")


# -----------------------------------------------------------------------------
# Tool-call parsing
# Llama 3.1's output -> (content, OpenAI tool calls); a JSON decoder, never a regex, reads the calls.


def _as_call(obj, names) -> dict | None:
    """{"name", "parameters" | "arguments"} (maybe with "type": "function") naming an offered tool -> a call."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    if set(obj) - {"name", "parameters", "arguments", "type"} or obj.get("type", "function") != "function":
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_calls(text: str, start: int, names) -> tuple[list, int]:
    """Calls decoded one after another from text[start] (separated by whitespace or ';'), and where they end."""
    decoder, calls, end = json.JSONDecoder(), [], start
    while end < len(text) and text[end] == "{":
        try:
            obj, after = decoder.raw_decode(text, end)
        except json.JSONDecodeError:
            break
        call = _as_call(obj, names)
        if call is None:
            break
        calls.append(call)
        end = after
        while end < len(text) and (text[end].isspace() or text[end] == ";"):
            end += 1
    return calls, end if calls else start


def _builtin_call(code: str, names) -> dict | None:
    """`name.call(k=v, ...)` with literal values (Llama 3.1's built-in tools), read with Python's parser."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    func = node.func if isinstance(node, ast.Call) else None
    if not (isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name)
            and func.value.id in names and not node.args):
        return None
    try:
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except ValueError:
        return None
    return _as_call({"name": func.value.id, "parameters": args}, names)


def _strip_fence(before: str, after: str) -> tuple[str, str]:
    """Drop a markdown code fence around a call (```json ... ```), which small models like to add."""
    head, tail = before.rstrip(), after.lstrip()
    for fence in ("```json", "```"):
        if head.endswith(fence) and tail.startswith("```"):
            return head[:-len(fence)], tail[3:]
    return before, after


def parse_tool_calls(text: str, names) -> tuple[str, list]:
    """(content, calls): the first run of calls in text becomes calls, the text around it content."""
    if not names:
        return text, []
    tag = text.find(PYTHON_TAG)
    if tag >= 0:
        body = text[tag + len(PYTHON_TAG):]
        call = _builtin_call(body, names) or (
            _as_call({"name": "code_interpreter", "parameters": {"code": body}}, names)
            if not body.lstrip().startswith("{") else None)
        if call is not None:
            return text[:tag], [call]
    for start in (i for i, c in enumerate(text) if c == "{"):
        calls, end = _json_calls(text, start, names)
        if calls:
            before = text[:start].replace(PYTHON_TAG, "")
            before, after = _strip_fence(before, text[end:])
            return before + after, calls
    return text, []


# -----------------------------------------------------------------------------
# Output text
# Steps -> text, holding back what could be the start of a stop string, or (with tools) a call.


@dataclass
class TokenLogprob:
    token: int
    text: bytes  # the token's bytes
    logprob: float
    top: list  # [(token, logprob)], most likely first
    offset: int  # characters of output text before this token


class OutputText:
    """Detokenizes steps; push() returns text that is safe to send now; finish() the rest.

    Held back: the end of the text that could be the start of a stop string, and (hold_calls) everything
    from the first "{" or <|python_tag|> on, which finish() leaves in `held` for the tool-call parser.
    """

    def __init__(self, tok, stop: list, hold_calls: bool, prefill: str = ""):
        self._decoder = tok.stream_decoder() if tok is not None else _IdDecoder()
        self._token_bytes = tok.token_bytes if tok is not None else (lambda t: f" {t}".encode())
        self.stop, self.hold_calls = stop, hold_calls
        self.held = prefill  # decoded but not sent (a forced call's start is held from the beginning)
        self.holding = bool(prefill)  # a call may have started: nothing more is sent until finish()
        self.sent = ""  # text handed out so far
        self.stopped = False  # a stop string was found: the caller cancels the request
        self.logprobs = []  # TokenLogprob of every step that asked for them, in order
        self._logprobs_sent = 0

    def push(self, step) -> str:
        if step.logprob is not None:
            self.logprobs.append(TokenLogprob(step.token, self._token_bytes(step.token), step.logprob,
                                              list(step.top_logprobs), len(self.sent) + len(self.held)))
        self.held += self._decoder.push(step.token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.held += self._decoder.flush()
        return self._release(final=True)

    def new_logprobs(self, end: int) -> list:
        """Logprobs not handed out yet of the tokens whose text starts before character `end`."""
        new = [lp for lp in self.logprobs[self._logprobs_sent:] if lp.offset < end]
        self._logprobs_sent += len(new)
        return new

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped, final = self.held[:cut], True, True
        n = len(self.held) - (0 if final else self._stop_prefix_length())
        if self.holding:
            n = 0
        elif self.hold_calls:
            starts = [i for i in (self.held.find("{", 0, n), self.held.find(PYTHON_TAG, 0, n)) if i >= 0]
            if starts:
                n, self.holding = min(starts), True
        out, self.held = self.held[:n], self.held[n:]
        self.sent += out
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that some stop string starts with."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.held)), best, -1):
                if self.held.endswith(s[:k]):
                    best = k
                    break
        return best


class _IdDecoder:
    """Text of a model file without tokenizer: each id as " <id>"."""

    def push(self, token: int) -> str:
        return f" {token}"

    def flush(self) -> str:
        return ""


# -----------------------------------------------------------------------------
# Service
# Validated request -> engine request -> text deltas and an outcome; shared by the server and batch jobs.


class ClientGone(Exception):
    """The client closed its connection: its request was cancelled."""


@dataclass
class Outcome:
    finish_reason: str  # "stop", "length" or "tool_calls"
    tool_calls: list  # OpenAI tool calls
    usage: dict


class Service:
    """The model behind the API: turns request bodies into engine requests and their output."""

    def __init__(self, model, engine, model_id: str, defaults: dict | None = None,
                 date_string: str | None = None):
        self.model, self.engine, self.model_id = model, engine, model_id
        self.tok = model.tokenizer
        self.defaults = dict(temperature=0.6, top_p=0.9, top_k=0, min_p=0.0, repetition_penalty=1.0)
        self.defaults.update(defaults or {})
        self.date_string = date_string  # None: today, as Meta's tool prompt has it

    def prepare(self, kind: str, body) -> Job:
        """Check a request body for `kind` ("chat" or "completion"); raises APIError."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise APIError(404, f"model {model!r} is not served here; this server has {self.model_id!r}",
                           param="model", code="model_not_found")
        common = parse_common(body, self.defaults)
        if kind == "chat":
            ids, names, prefill = render_chat(self.tok, body, self.date_string or today())
            job = Job("chat", ids, logprobs=parse_chat_logprobs(body), tool_names=names, prefill=prefill,
                      **common)
        else:
            ids = encode_completion_prompt(self.tok, body.get("prompt"), self.model.config.vocab_size)
            job = Job("completion", ids, logprobs=parse_completion_logprobs(body), **common)
        self._check_context(job)
        return job

    def _check_context(self, job: Job):
        n, ctx = len(job.prompt_ids), self.model.ctx
        if n >= ctx:
            raise APIError(400, f"the prompt has {n} tokens but the context holds {ctx} (one slot's KV cache); "
                                "shorten it, or restart the server with a larger --ctx",
                           param="messages" if job.kind == "chat" else "prompt", code="context_length_exceeded")
        if job.max_tokens is not None and n + job.max_tokens > ctx:
            raise APIError(400, f"max_tokens {job.max_tokens} plus the prompt's {n} tokens exceed the context of "
                                f"{ctx}; ask for at most {ctx - n}", param="max_tokens",
                           code="context_length_exceeded")

    def submit(self, job: Job):
        """Queue the job on the engine; QueueFull becomes a 503 with Retry-After."""
        try:
            return self.engine.submit(job.prompt_ids, llama31.Sampler(**job.sampling), max_tokens=job.max_tokens,
                                      stop_ids=set() if job.ignore_eos else None, logprobs=job.logprobs)
        except llama31.QueueFull:
            raise APIError(503, f"all {self.engine.parallel} slots are busy and the queue is full; retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine is closed: the server is shutting down
            raise APIError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    def run(self, job: Job, request, alive=lambda: True):
        """Yield (text, logprobs) deltas, then one Outcome; cancels the request on a stop string or when
        alive() turns false (raising ClientGone)."""
        out = OutputText(self.tok, job.stop, hold_calls=bool(job.tool_names), prefill=job.prefill)
        steps = 0
        try:
            for step in self._steps(request, alive):
                steps += 1
                text = out.push(step)
                logprobs = out.new_logprobs(len(out.sent))
                if text or logprobs:
                    yield text, logprobs
                if out.stopped:
                    break
                if not alive():
                    raise ClientGone()
        finally:
            if request.finish_reason is None:  # stop string, client gone or an error: free the slot now
                request.cancel()
        if request.finish_reason == "error":  # the engine's step failed (its log has the traceback)
            raise APIError(500, f"generation failed: {request.error}", type="server_error")
        text, calls = out.finish(), []
        if out.holding:  # a call may have started: the held text is a call, or content after all
            rest, calls = parse_tool_calls(out.held, job.tool_names)
            text += rest if rest.strip() or not calls else ""
        yield text, out.new_logprobs(len(out.sent) + len(out.held))
        finish = "tool_calls" if calls else "length" if request.finish_reason == "length" and not out.stopped \
            else "stop"
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": steps,
                 "total_tokens": len(job.prompt_ids) + steps,
                 "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}
        yield Outcome(finish, calls, usage)

    def _steps(self, request, alive):
        """request.steps(), checking the client also while no step comes (queued, or a long prefill)."""
        while True:
            try:
                yield from request.steps(timeout=POLL_SECONDS)
                return
            except queue.Empty:
                if not alive():
                    raise ClientGone() from None

    def complete(self, kind: str, body, alive=lambda: True) -> dict:
        """A whole non-streamed response body; raises APIError."""
        job = self.prepare(kind, body)
        job.stream = False
        return self.respond(job, self.submit(job), alive)

    def respond(self, job: Job, request, alive=lambda: True) -> dict:
        texts, logprobs = [], []
        for item in self.run(job, request, alive):
            if isinstance(item, Outcome):
                return self.response_body(job, "".join(texts), logprobs, item)
            texts.append(item[0])
            logprobs.extend(item[1])

    # --- response bodies and stream chunks (OpenAI's shapes)

    def response_body(self, job: Job, text: str, logprobs: list, outcome: Outcome) -> dict:
        head = {"id": _new_id(job), "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_id}
        choice = {"index": 0, "logprobs": self._logprobs(job, logprobs), "finish_reason": outcome.finish_reason}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text if text or not outcome.tool_calls else None}
            if outcome.tool_calls:
                choice["message"]["tool_calls"] = outcome.tool_calls
        else:
            choice["text"] = text
        return {**head, "choices": [choice], "usage": outcome.usage}

    def stream_chunks(self, job: Job, request, alive):
        """The SSE chunks of a streamed response, as dicts (the caller frames them and adds [DONE])."""
        chat = job.kind == "chat"
        head = {"id": _new_id(job), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_id}

        def chunk(delta_or_text, logprobs=None, finish=None):
            choice = {"index": 0, "logprobs": self._logprobs(job, logprobs or []), "finish_reason": finish}
            choice["delta" if chat else "text"] = delta_or_text
            return {**head, "choices": [choice]}

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        for item in self.run(job, request, alive):
            if isinstance(item, Outcome):
                if item.tool_calls:
                    calls = [{"index": k, **c} for k, c in enumerate(item.tool_calls)]
                    yield chunk({"tool_calls": calls})
                yield chunk({} if chat else "", finish=item.finish_reason)
                if job.include_usage:
                    yield {**head, "choices": [], "usage": item.usage}
                return
            text, logprobs = item
            if text or logprobs:
                yield chunk({"content": text} if chat else text, logprobs)

    def _logprobs(self, job: Job, logprobs: list):
        if job.logprobs is None:
            return None
        if job.kind == "chat":
            return {"content": [dict(_token_entry(self._piece(lp.token)), logprob=lp.logprob,
                                     top_logprobs=[dict(_token_entry(self._piece(t)), logprob=v)
                                                   for t, v in lp.top])
                                for lp in logprobs], "refusal": None}
        return {"tokens": [self._text(lp.token) for lp in logprobs],
                "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._text(t): v for t, v in lp.top} for lp in logprobs] if job.logprobs else None,
                "text_offset": [lp.offset for lp in logprobs]}

    def _piece(self, token: int) -> bytes:
        return self.tok.token_bytes(token) if self.tok is not None else f" {token}".encode()

    def _text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")


def _token_entry(piece: bytes) -> dict:
    return {"token": piece.decode("utf-8", errors="replace"), "bytes": list(piece)}


def _new_id(job: Job) -> str:
    return f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


# -----------------------------------------------------------------------------
# HTTP
# One thread per connection (ThreadingHTTPServer); JSON responses, SSE streams, OpenAI error objects.

ROUTES = {("POST", "/v1/chat/completions"): "chat", ("POST", "/v1/completions"): "completion",
          ("GET", "/v1/models"): "models", ("GET", "/health"): "health", ("GET", "/v1/health"): "health"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON responses; streams close their connection
    server_version = f"llama31/{llama31.__version__}"
    timeout = SOCKET_TIMEOUT_SECONDS
    # each SSE event is a small write that the client should get at once, not when Nagle's algorithm has
    # waited for the ACK of the last one
    disable_nagle_algorithm = True

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method: str):
        service = self.server.service
        path = self.path.split("?", 1)[0]
        try:
            route = ROUTES.get((method, path))
            if route is None:
                known = any(p == path for _, p in ROUTES)
                raise APIError(405 if known else 404, f"{method} {path}: " + (
                    "method not allowed" if known else f"unknown path; try {', '.join(p for _, p in ROUTES)}"))
            if route == "health":
                self._send_json(200, {"status": "ok", "slots_busy": service.engine.busy_slots,
                                      "slots": service.engine.parallel, "queued": service.engine.queued})
            elif route == "models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": service.model_id, "object": "model", "created": 0, "owned_by": "llama31",
                     "max_model_len": service.model.ctx}]})
            else:
                self._generate(service, route, self._read_json())
        except APIError as e:
            self._send_json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError, ClientGone, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug must not take the server down: answer 500 and keep serving
            self.log_error("internal error on %s: %r", self.path, e)
            self._send_json(500, APIError(500, f"internal error: {e!r}", type="server_error").body())

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length header (chunked bodies are not read)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            self.close_connection = True
            raise APIError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES or length < 0:
            self.close_connection = True  # the body is not read: the connection can't be reused
            raise APIError(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def _generate(self, service: Service, kind: str, body):
        job = service.prepare(kind, body)
        request = service.submit(job)
        if not job.stream:
            self._send_json(200, service.respond(job, request, self._client_alive))
            return
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for chunk in service.stream_chunks(job, request, self._client_alive):
                    self._send_event(chunk)
            except (OSError, ClientGone):
                raise
            except APIError as e:  # after the headers an error can only be an event (vLLM's framing)
                self._send_event(e.body())
            except Exception as e:
                self.log_error("internal error on %s: %r", self.path, e)
                self._send_event(APIError(500, f"internal error: {e!r}", type="server_error").body())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            if request.finish_reason is None:  # the write failed: the client went away
                request.cancel()

    def _send_event(self, data: dict):
        self.wfile.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _client_alive(self) -> bool:
        """False once the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _send_json(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive

    def __init__(self, address, service: Service, quiet: bool = False):
        super().__init__(address, Handler)
        self.service, self.quiet = service, quiet

    def close(self):
        """Stop serving and stop the engine (unfinished requests end)."""
        self.shutdown()
        self.server_close()
        self.service.engine.close()


def make_server(model, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4, max_queue: int = 64,
                model_id: str = "llama31", defaults: dict | None = None, quiet: bool = False,
                date_string: str | None = None) -> Server:
    """A server bound to host:port with a started engine; call serve_forever(), then close()."""
    engine = llama31.Engine(model, parallel=parallel, max_queue=max_queue)
    server = Server((host, port), Service(model, engine, model_id, defaults, date_string), quiet=quiet)
    engine.start()
    return server


# -----------------------------------------------------------------------------
# Batch jobs
# requests.jsonl -> results.jsonl through the same Service, all slots busy; a rerun resumes.


def read_requests(path: str) -> list:
    """[(id, kind, body)] of a JSONL file of requests, each with a unique "id"."""
    requests, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e}); one request object per line") from None
            rid = body.get("id") if isinstance(body, dict) else None
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise ValueError(f"{path}:{lineno}: a request needs an \"id\" (string or integer)")
            if rid in seen:
                raise ValueError(f"{path}:{lineno}: id {rid!r} is used twice; ids must be unique")
            seen.add(rid)
            requests.append((rid, "chat" if "messages" in body else "completion", body))
    return requests


def finished_ids(path: str) -> set:
    """Ids already in a results file; a last line cut short by a crash (no newline) is cut off the file."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]  # each result is written with its newline in one write
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    ids = set()
    for lineno, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: not a result line; remove it (or the file) and rerun") from None
    return ids


def run_batch(service: Service, in_path: str, out_path: str, workers: int, progress=None) -> int:
    """Run every request of in_path not yet in out_path (progress on `progress`, default stderr);
    returns how many ran."""
    requests = read_requests(in_path)
    done = finished_ids(out_path)
    todo = [r for r in requests if r[0] not in done]
    bar = _Progress(len(todo), len(requests) - len(todo), progress or sys.stderr)

    def one(kind, body):
        try:
            return {"response": service.complete(kind, body)}
        except APIError as e:
            return e.body()

    with open(out_path, "a", encoding="utf-8") as out, ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(one, kind, body): rid for rid, kind, body in todo}
        try:
            for future in as_completed(futures):
                result = future.result()
                out.write(json.dumps({"id": futures[future], **result}, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(result.get("response", {}).get("usage", {}).get("completion_tokens", 0))
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            service.engine.close()  # running requests end now; their results are not written
            raise
        finally:
            bar.close()
    return len(todo)


class _Progress:
    """done/total, generated tok/s and ETA on one stderr line."""

    def __init__(self, total: int, skipped: int, stream):
        self.total, self.done, self.tokens, self.stream = total, 0, 0, stream
        self.start = time.perf_counter()
        if skipped:
            print(f"{skipped} requests already done in the output: skipped", file=stream)
        self._draw()

    def update(self, tokens: int):
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        self._draw()

    def _draw(self):
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if self.done else "?"
        self.stream.write(f"\r[{self.done}/{self.total}] {self.tokens / max(elapsed, 1e-9):.1f} tok/s "
                          f"ETA {eta_text}  ")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


# -----------------------------------------------------------------------------
# CLI
# Reached from `python llama31.py --serve` / `--batch`, after the model is loaded.


def model_name(path: str | None) -> str:
    """The served model's id: the model file's name without extension (the default model's GGUF name)."""
    return os.path.splitext(os.path.basename(path or llama31.default_gguf()))[0]


def run_cli(model, args) -> int:
    """Serve until Ctrl-C, or run a batch job; args are llama31.py's parsed flags."""
    defaults = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    repetition_penalty=args.repeat_penalty)
    name = model_name(args.model)
    if args.batch:
        engine = llama31.Engine(model, parallel=args.parallel)
        engine.start()
        try:
            n = run_batch(Service(model, engine, name, defaults), args.batch, args.out, workers=2 * args.parallel)
        finally:
            engine.close()
        print(f"{n} requests done; results in {args.out}", file=sys.stderr)
        return 0
    server = make_server(model, args.host, args.port, args.parallel, model_id=name, defaults=defaults)
    print(f"serving {name} on http://{args.host}:{server.server_address[1]}/v1 ({args.parallel} slots of "
          f"{model.ctx} tokens); Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.service.engine.close()
    return 0
