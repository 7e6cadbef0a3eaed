"""tokenizer: text <-> token ids for Llama 3 / 3.1 and other Llama-family models, plus chat formats.

Which tokenizers:
    1. Llama 3 / 3.1 (Meta's `tokenizer.model`): tiktoken-style byte-level BPE, 128,000 ranks (one
       base64 token and its rank per line; a token's id is its rank) + 256 special tokens = 128,256 ids.
       Ids match tiktoken and Meta's reference (llama_models.llama3.tokenizer) for every input.
    2. Byte-level BPE from a token list + merges (GGUF metadata with tokenizer.ggml.model == "gpt2",
       or an HF `tokenizer.json`), with the pre-tokenizer the model names: "llama-bpe" (Llama 3),
       "smollm" (SmolLM2: every digit alone, then GPT-2's split; llama.cpp's rule), "gpt-2".
    3. SentencePiece `tokenizer.model` (Llama 2 family) through the optional `sentencepiece` package.
`load(path_or_dict)` picks the kind; `Tokenizer.to_dict()` gives a JSON-serializable dict that
`load()` turns back into the same tokenizer (the flat model file stores it in its header).

Splitting: text is cut into pieces by a regex before BPE (Meta's pattern, LLAMA3_SPLIT_PATTERN below).
It uses \\p{L} / \\p{N}, which the stdlib `re` lacks, so the `regex` package is a hard dependency
(pip install regex). Optional: tiktoken (fast path for Llama 3, same ids), jinja2 (render a model's
own chat template), sentencepiece (Llama 2 family). Lone surrogates in input text are handled as
tiktoken does: a surrogate pair becomes its character, a lone surrogate becomes U+FFFD. A byte
that has no token in a byte-level vocabulary (SmolLM2 has none for 21 bytes, e.g. 0x04) is dropped,
as llama.cpp and HF do.

Special tokens used by name (Llama 3.1): <|begin_of_text|> 128000 (BOS), <|end_of_text|> 128001,
<|start_header_id|> 128006, <|end_header_id|> 128007, <|eom_id|> 128008 (end of message: a tool call
wants its result), <|eot_id|> 128009 (end of turn), <|python_tag|> 128010; the rest are reserved.
In `encode`, special-token strings in the text are plain text unless listed in `allowed_special`.

Chat: Llama 3 tokenizers use Meta's ChatFormat (llama_models.llama3.chat_format) with the Llama 3.1
tool prompts; tokenizers that ship a template (GGUF tokenizer.chat_template) render it with jinja2,
or with a built-in ChatML when jinja2 is absent and the template is ChatML.
"""

import base64
import codecs
import heapq
import itertools
import json
import os
from datetime import datetime

import regex

try:
    import tiktoken
except ImportError:
    tiktoken = None
try:
    import jinja2
    import jinja2.sandbox
except ImportError:
    jinja2 = None
try:
    import sentencepiece
except ImportError:
    sentencepiece = None

# -----------------------------------------------------------------------------
# Constants
# Split patterns, special-token names and the tables that name pre-tokenizers and token types.

# Meta's Llama 3 pre-tokenizer: contractions, words with one leading non-letter, digit groups of
# at most 3, punctuation runs, newlines, and whitespace that leaves one space for the next word.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's pattern (HF ByteLevel pre-tokenizer with use_regex=True).
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF Digits(individual_digits=True): every digit is its own piece.
DIGITS_SPLIT_PATTERN = r"\p{N}"

# GGUF `tokenizer.ggml.pre` name -> (split patterns applied in order, ignore_merges) as llama.cpp
# sets them; ignore_merges: a piece that is already a token is not re-merged (tiktoken's rule).
PRE_TOKENIZERS = {
    "llama-bpe": ([LLAMA3_SPLIT_PATTERN], True),
    "smollm": ([DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN], False),
    "starcoder": ([DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN], False),
    "gpt-2": ([GPT2_SPLIT_PATTERN], False),
}

NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's names, in id order after the 128,000 ranks (llama_models/llama3/tokenizer.py).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))
]
LLAMA3_STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
# Tokens that end generation in other vocabularies (llama.cpp treats these texts as end-of-generation).
KNOWN_STOP_TOKENS = LLAMA3_STOP_TOKENS + ["<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>"]

# Meta's encode cuts text into 400,000-char slices, then cuts runs of >25,000 whitespace or
# non-whitespace chars (a tiktoken stack limit); we do the same so ids match on any input.
META_MAX_ENCODE_CHARS = 400_000
META_MAX_RUN_CHARS = 25_000

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(1, 7)
# GGUF keys whose token ends generation.
GGUF_STOP_KEYS = [f"tokenizer.ggml.{name}_token_id" for name in ("eos", "eot", "eom")]

# Llama 3.1 built-in tools (llama_models.datatypes.BuiltinTool).
BUILTIN_TOOLS = ["brave_search", "wolfram_alpha", "photogen", "code_interpreter"]

DICT_FORMAT = "llama31-tokenizer"
DICT_VERSION = 1
# A word -> ids cache entry per distinct piece; cleared when full so memory stays bounded.
CACHE_MAX_ENTRIES = 200_000
# Sentinel rank for "this pair does not merge"; larger than any real rank.
NO_MERGE = 1 << 62
# Token ids a tokenizer.json may use: far above any real vocabulary, and a bound on what a damaged one allocates.
MAX_VOCAB = 1 << 24


# -----------------------------------------------------------------------------
# Loading
# `load()` recognises the input (file kind or dict kind) and builds the matching tokenizer.


def load(source, use_tiktoken=None):
    """Build a tokenizer from a path or a dict.

    Args:
        source: a path to Meta's tiktoken `tokenizer.model`, an HF `tokenizer.json` (or a folder
            holding one), a SentencePiece `tokenizer.model`; or a dict of GGUF metadata
            (`tokenizer.ggml.*` keys); or a dict from `Tokenizer.to_dict()`.
        use_tiktoken: Llama 3 only: encode with tiktoken when installed (None: if installed; False:
            always the pure-Python BPE; True: require it). Ids are the same either way.
    Returns:
        a Tokenizer (or SentencePieceTokenizer).
    Raises ValueError for a file or dict that is not a tokenizer this module reads, or a damaged one.
    """
    where = "tokenizer dict" if isinstance(source, dict) else os.fspath(source)
    # the readers index into JSON and metadata as the formats lay them out: a damaged file breaks that
    # somewhere, and these errors of a lookup or a type are the file's fault, not the reader's
    try:
        if not isinstance(source, dict):
            return _load_file(where, use_tiktoken)
        if source.get("format") == DICT_FORMAT:
            return _from_dict(source, use_tiktoken)
        if "tokenizer.ggml.model" in source:
            return _from_gguf(source)
    except (KeyError, IndexError, TypeError, AttributeError, OverflowError, RecursionError, regex.error) as e:
        raise ValueError(f"{where}: damaged tokenizer ({type(e).__name__}: {e})") from None
    raise ValueError(
        "tokenizer.load: dict is neither GGUF metadata (no 'tokenizer.ggml.model' key) nor a "
        f"Tokenizer.to_dict() result (no 'format': '{DICT_FORMAT}'); keys found: "
        f"{sorted(source)[:8]}"
    )


def _load_file(path, use_tiktoken):
    """Sniff the file's first bytes: JSON, GGUF, SentencePiece protobuf, or tiktoken text."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, name)):
                return _load_file(os.path.join(path, name), use_tiktoken)
        raise FileNotFoundError(f"{path}: folder has no tokenizer.json or tokenizer.model")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"GGUF"):
        raise ValueError(
            f"{path}: is a GGUF file; pass its metadata dict instead (keys tokenizer.ggml.*), "
            "or convert the model with convert_weights.py, which embeds the tokenizer"
        )
    if head.lstrip()[:1] == b"{":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") == DICT_FORMAT:
            return _from_dict(data, use_tiktoken)
        return _from_tokenizer_json(data, path)
    # A SentencePiece ModelProto starts with field 1 (pieces), length-delimited: tag byte 0x0a.
    if head[:1] == b"\n":
        with open(path, "rb") as f:
            return SentencePieceTokenizer(f.read())
    return _from_tiktoken_file(path, use_tiktoken)


def _from_tiktoken_file(path, use_tiktoken):
    """Meta's Llama 3 tokenizer.model: lines 'base64-token rank', ranks 0..N-1 in order."""
    tokens = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            ok = len(fields) == 2 and fields[0].isascii() and fields[1].isdigit()
            if not ok or int(fields[1]) != len(tokens):
                raise ValueError(
                    f"{path}:{lineno}: not a tokenizer file: expected 'base64-token rank' with rank "
                    f"{len(tokens)}, found {line[:60]!r}; accepted files: Meta's Llama 3 "
                    "tokenizer.model, HF tokenizer.json, SentencePiece tokenizer.model"
                )
            tokens.append(fields[0].decode("ascii"))
    if len(tokens) < 256:
        raise ValueError(
            f"{path}: not a tokenizer file: {len(tokens)} ranks, a Llama 3 tokenizer.model has 128000"
        )
    return _llama3_tokenizer(tokens, use_tiktoken)


def _llama3_tokenizer(b64_tokens, use_tiktoken, chat_format="llama3"):
    """Ranks (base64, rank order) + Meta's 256 special tokens -> Tokenizer with Meta's settings;
    chat_format None marks a base model (same tokenizer, no chat format)."""
    try:
        ranks = [base64.b64decode(t, validate=True) for t in b64_tokens]
    except ValueError as e:
        raise ValueError(
            f"Llama 3 tokenizer: bad base64 token ({e}); is this Meta's tokenizer.model?"
        ) from None
    # byte-level BPE needs every byte as a token (tiktoken panics without one), and one rank per token
    missing = sorted(set(range(256)) - {t[0] for t in ranks if len(t) == 1})
    if missing or len(set(ranks)) != len(ranks):
        raise ValueError(
            f"Llama 3 tokenizer: {f'byte {missing[0]:#04x} has no rank' if missing else 'a token has two ranks'}; "
            "is this Meta's tokenizer.model?"
        )
    special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return Tokenizer(
        vocab=ranks + [name.encode("utf-8") for name in LLAMA3_SPECIAL_TOKENS],
        special_tokens=special,
        split_patterns=[LLAMA3_SPLIT_PATTERN],
        bos_id=special["<|begin_of_text|>"],
        eos_id=special["<|end_of_text|>"],
        stop_ids={special[name] for name in LLAMA3_STOP_TOKENS},
        add_bos=True,
        chat_format=chat_format,
        use_tiktoken=use_tiktoken,
    )


def _from_gguf(meta):
    """GGUF tokenizer metadata (tokenizer.ggml.*) -> byte-level BPE Tokenizer."""
    model = meta["tokenizer.ggml.model"]
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model = {model!r}: only byte-level BPE ('gpt2') is supported from "
            "GGUF metadata; for a SentencePiece ('llama') model pass its tokenizer.model file instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    stop_ids = {int(meta[k]) for k in GGUF_STOP_KEYS if k in meta}
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    return _byte_level_tokenizer(
        tokens=tokens,
        types=types,
        merges=list(meta["tokenizer.ggml.merges"]),
        pre=pre,
        bos_id=None if bos_id is None else int(bos_id),
        eos_id=None if eos_id is None else int(eos_id),
        stop_ids=stop_ids,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _from_tokenizer_json(data, path):
    """HF tokenizer.json (BPE model, byte-level) -> Tokenizer; tokenizer_config.json beside it adds
    bos/eos, add_bos and the chat template."""
    model = data.get("model", {})
    if model.get("type") != "BPE" or "merges" not in model:
        raise ValueError(
            f"{path}: HF tokenizer.json with model type {model.get('type')!r}: only byte-level BPE "
            "(model.type 'BPE' with merges) is supported"
        )
    split_patterns = _hf_split_patterns(data.get("pre_tokenizer"), path)
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    ids = [*model["vocab"].values(), *(t["id"] for t in added.values())]
    if not all(type(i) is int and 0 <= i < MAX_VOCAB for i in ids):
        raise ValueError(f"{path}: token ids must be integers in 0..{MAX_VOCAB - 1}: damaged tokenizer.json")
    tokens = [None] * (max(ids) + 1)
    types = [TOKEN_NORMAL] * len(tokens)
    for text, i in model["vocab"].items():
        tokens[i] = text
    for text, t in added.items():
        tokens[t["id"]] = text
        types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    config = _read_tokenizer_config(path)
    special_id = {text: i for i, text in enumerate(tokens) if types[i] != TOKEN_NORMAL}
    bos_id = special_id.get(_token_content(config.get("bos_token")))
    eos_id = special_id.get(_token_content(config.get("eos_token")))
    post_bos = _hf_post_processor_bos(data.get("post_processor"), special_id)
    if bos_id is None:
        bos_id = post_bos
    return _byte_level_tokenizer(
        tokens=tokens,
        types=types,
        merges=model["merges"],
        pre=(split_patterns, bool(model.get("ignore_merges", False))),
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=set() if eos_id is None else {eos_id},
        add_bos=bool(config.get("add_bos_token", post_bos is not None)),
        chat_template=config.get("chat_template"),
    )


def _hf_split_patterns(pre_tokenizer, path):
    """Translate an HF pre_tokenizer config into our list of split patterns."""
    if pre_tokenizer is None:
        return []
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return [p for sub in pre_tokenizer["pretokenizers"] for p in _hf_split_patterns(sub, path)]
    if kind == "Split" and "Regex" in pre_tokenizer["pattern"] and pre_tokenizer["behavior"] == "Isolated":
        return [pre_tokenizer["pattern"]["Regex"]]
    if kind == "Digits" and pre_tokenizer.get("individual_digits"):
        return [DIGITS_SPLIT_PATTERN]
    if kind == "ByteLevel" and not pre_tokenizer.get("add_prefix_space"):
        return [GPT2_SPLIT_PATTERN] if pre_tokenizer.get("use_regex", True) else []
    raise ValueError(
        f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:200]} is not supported; supported: "
        "Split(Regex, Isolated), Digits(individual_digits), ByteLevel without add_prefix_space"
    )


def _hf_post_processor_bos(post, special_id):
    """The BOS id if the HF post-processor prepends a special token to every input, else None."""
    if post is None:
        return None
    if post["type"] == "Sequence":
        found = [_hf_post_processor_bos(p, special_id) for p in post["processors"]]
        return next((b for b in found if b is not None), None)
    if post["type"] == "TemplateProcessing" and "SpecialToken" in post["single"][0]:
        return special_id.get(post["single"][0]["SpecialToken"]["id"])
    return None


def _read_tokenizer_config(tokenizer_json_path):
    """tokenizer_config.json from the same folder, or {} if there is none."""
    config_path = os.path.join(os.path.dirname(tokenizer_json_path), "tokenizer_config.json")
    if not os.path.exists(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token):
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _byte_level_tokenizer(tokens, types, merges, pre, bos_id, eos_id, stop_ids, add_bos, chat_template):
    """Shared by GGUF and tokenizer.json: GPT-2 byte-to-unicode token strings -> bytes, merges ->
    pair ranks; `pre` is a GGUF pre-tokenizer name or (patterns, ignore_merges)."""
    if isinstance(pre, str):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}"
            )
        pre = PRE_TOKENIZERS[pre]
    split_patterns, ignore_merges = pre
    vocab, special, always, byte_level = [], {}, {}, []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if text is None:  # an id tokenizer.json leaves unused
            vocab.append(b"")
        elif kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            vocab.append(text.encode("utf-8"))
            # control tokens are matched in text only when allowed; user-defined always (llama.cpp, HF)
            (special if kind == TOKEN_CONTROL else always)[text] = i
        else:
            vocab.append(None)
            byte_level.append(i)
    for i, token in zip(byte_level, _unicode_to_bytes_all([tokens[i] for i in byte_level], "token", byte_level)):
        vocab[i] = token
    stop_ids = set(stop_ids) | {special[t] for t in KNOWN_STOP_TOKENS if t in special}
    return Tokenizer(
        vocab=vocab,
        merges=merges,
        special_tokens=special,
        user_defined_tokens=always,
        split_patterns=split_patterns,
        ignore_merges=ignore_merges,
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=stop_ids,
        add_bos=add_bos,
        chat_template=chat_template,
    )


def _from_dict(d, use_tiktoken):
    """Rebuild a tokenizer from Tokenizer.to_dict() / SentencePieceTokenizer.to_dict()."""
    if d.get("version") != DICT_VERSION:
        raise ValueError(
            f"tokenizer dict version {d.get('version')!r}, this tokenizer.py reads version "
            f"{DICT_VERSION}; re-run convert_weights.py with this version"
        )
    if d["type"] == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(d["model"]))
    if d["type"] == "llama3":
        return _llama3_tokenizer(d["ranks"], use_tiktoken, d["chat_format"])
    if d["type"] == "bpe":
        types = [TOKEN_NORMAL] * len(d["tokens"])
        for i in d["special_tokens"].values():
            types[i] = TOKEN_CONTROL
        for i in d["user_defined_tokens"].values():
            types[i] = TOKEN_USER_DEFINED
        return _byte_level_tokenizer(
            tokens=d["tokens"],
            types=types,
            merges=d["merges"],
            pre=(d["split_patterns"], d["ignore_merges"]),
            bos_id=d["bos_id"],
            eos_id=d["eos_id"],
            stop_ids=d["stop_ids"],
            add_bos=d["add_bos"],
            chat_template=d["chat_template"],
        )
    raise ValueError(f"tokenizer dict type {d['type']!r} unknown; expected llama3, bpe or sentencepiece")


# -----------------------------------------------------------------------------
# Byte-level helpers
# GPT-2's reversible byte <-> printable-character map, used by GGUF and tokenizer.json vocabularies.


def _bytes_to_unicode():
    """GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
# str.translate table from those characters back to the Latin-1 character of their byte (so that
# .encode("latin-1") gives the bytes in C, not per character); the Latin-1 characters that are not in the
# alphabet map to U+FFFF, which latin-1 cannot encode, so that they are refused.
_TO_LATIN1 = {**{b: 0xFFFF for b in range(256)}, **{ord(c): b for b, c in BYTE_TO_UNICODE.items()}}
_TO_LATIN1_AND_SPACE = {**_TO_LATIN1, ord(" "): ord(" ")}  # merges: "a b", the space kept where it stands


def _unicode_to_bytes(text, token_id):
    """A byte-level token string ('Ġthe') -> its bytes (b' the')."""
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"token {token_id} {text!r}: character {text[e.start]!r} is not in GPT-2's byte-level alphabet; "
            "is this a byte-level BPE vocabulary?"
        ) from None


def _unicode_to_bytes_all(texts, what, numbers):
    """[_unicode_to_bytes(t) for t in texts] in one translate and one encode, then slices: a vocabulary
    has 10^5 strings and this runs at every load. numbers[i] names texts[i] in the error ("token 7")."""
    try:
        data = "".join(texts).translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        for text, number in zip(texts, numbers):
            _unicode_to_bytes(text, f"{what} {number}")  # raises, naming the string
        raise
    ends = list(itertools.accumulate(map(len, texts)))  # one byte per character
    return [data[a:b] for a, b in zip([0, *ends], ends)]


def _bytes_to_unicode_text(token):
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _replace_surrogates(text):
    """tiktoken's rule: join surrogate pairs, turn lone surrogates into U+FFFD (UTF-8 can't hold them)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _split_isolated(pattern, text):
    """Split text into the pattern's matches and the gaps between them (HF 'Isolated' behaviour)."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append(text[start : m.start()])
        pieces.append(m.group())
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _split_long_runs(text, max_run):
    """Meta's _split_whitespaces_or_nonwhitespaces: cut runs of more than max_run whitespace (or
    non-whitespace) chars into slices; yields one "" for empty text, as Meta's does."""
    start, run, run_is_space = 0, 0, text[:1].isspace()
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
            continue
        run += 1
        if run > max_run:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


# -----------------------------------------------------------------------------
# BPE
# The merge loop: start from single bytes, repeatedly merge the adjacent pair of lowest rank.


def bpe_merge(word, rank):
    """Byte-pair encode one piece (bytes); rank(a, b) is the merge rank of a pair, NO_MERGE if none.

    Same result as tiktoken's _byte_pair_merge: among all adjacent pairs take the lowest rank (the
    leftmost on ties), merge it, repeat until no pair merges. Returns the list of token bytes.
    A heap of candidate pairs over a linked list of parts keeps this O(n log n): pieces can be
    25,000 bytes long (whitespace runs), where rescanning all pairs per merge takes seconds.
    """
    n = len(word)
    parts = [word[i : i + 1] for i in range(n)]  # parts[j] becomes None once merged into its left
    nxt = list(range(1, n + 1))  # index of the next live part (n: none)
    prv = list(range(-1, n - 1))  # index of the previous live part (-1: none)
    # candidates (rank, left index): the heap pops the lowest rank, then the leftmost
    heap = [(rank(parts[i], parts[i + 1]), i) for i in range(n - 1)]
    heapq.heapify(heap)
    while heap and heap[0][0] != NO_MERGE:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        # a candidate is stale if an earlier merge changed either side of it
        if parts[i] is None or j == n or rank(parts[i], parts[j]) != r:
            continue
        parts[i], parts[j] = parts[i] + parts[j], None
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            heapq.heappush(heap, (rank(parts[i], parts[nxt[i]]), i))
        if prv[i] >= 0:
            heapq.heappush(heap, (rank(parts[prv[i]], parts[i]), prv[i]))
    return [p for p in parts if p is not None]


# -----------------------------------------------------------------------------
# Tokenizer
# Byte-level BPE (Llama 3 ranks or token list + merges): encode, decode, streaming, chat, to_dict.


class Tokenizer:
    """Byte-level BPE tokenizer with special tokens and a chat format.

    Args (usually built by `load()`):
        vocab: token bytes by id (special tokens hold their UTF-8 text).
        merges: None for Llama 3 (a pair merges at the rank of the concatenated token, tiktoken's
            rule), or a list of "a b" strings or (a, b) pairs of byte-level strings in priority order
            (GGUF / HF).
        special_tokens: text -> id of control tokens (matched in text only when allowed).
        user_defined_tokens: text -> id of added tokens that are always matched in text.
        split_patterns: regexes applied in order; each one splits every piece of the previous one.
        ignore_merges: a piece that is a whole token maps to it without merging (tiktoken's rule).
        bos_id, eos_id: int or None. stop_ids: every id that ends generation.
        add_bos: whether encode() adds BOS when bos is not given.
        chat_format: "llama3" for Meta's format, None to use chat_template (jinja2 / ChatML).
        use_tiktoken: see load().
    """

    def __init__(self, vocab, special_tokens, split_patterns, bos_id, eos_id, stop_ids, add_bos,
                 merges=None, user_defined_tokens=None, ignore_merges=True, chat_format=None,
                 chat_template=None, use_tiktoken=False):
        self._vocab = vocab
        self.special_tokens = dict(special_tokens)
        self.user_defined_tokens = dict(user_defined_tokens or {})
        self._split_patterns = [regex.compile(p) for p in split_patterns]
        self._split_sources = list(split_patterns)
        self.bos_id, self.eos_id, self.eos_ids = bos_id, eos_id, frozenset(stop_ids)
        self.add_bos = add_bos
        self.ignore_merges = ignore_merges
        self.chat_format, self.chat_template = chat_format, chat_template
        self._check_ids()
        # token bytes -> id for what BPE may produce: every non-special token
        specials = set(self.special_tokens.values()) | set(self.user_defined_tokens.values())
        self._ids = {t: i for i, t in enumerate(vocab) if i not in specials}
        self._merges = None
        if merges is not None:
            self._merges = self._pair_ranks(merges)
        self._rank = self._rank_by_token if merges is None else self._rank_by_pair
        self._cache = {}
        self._tiktoken = self._build_tiktoken(use_tiktoken)

    # --- construction checks and helpers

    def _check_ids(self):
        n = len(self._vocab)
        named = {"bos_id": self.bos_id, "eos_id": self.eos_id}
        named.update({f"stop id {i}": i for i in self.eos_ids})
        for name, i in named.items():
            if i is not None and not 0 <= i < n:
                raise ValueError(f"tokenizer: {name} = {i} is outside the vocabulary (0..{n - 1})")

    def _pair_ranks(self, merges):
        """Merges ("a b" byte-level strings, or (a, b) pairs) -> {(a_bytes, b_bytes): rank}, each result checked
        to be a token. All merges go through one translate and one encode, then slices: a vocabulary has 10^5
        merges and this runs at every load."""
        texts = [m if isinstance(m, str) else " ".join(m) if len(m) == 2 else "" for m in merges]
        cuts = [m.find(" ") for m in texts]  # a byte-level string holds no space: it separates a from b
        odd = next((rank for rank, (m, cut) in enumerate(zip(texts, cuts)) if cut < 0 or " " in m[cut + 1:]), None)
        if odd is not None:
            raise ValueError(f"tokenizer: merge {odd} ({merges[odd]!r}) is not a pair of strings")
        try:
            data = "".join(texts).translate(_TO_LATIN1_AND_SPACE).encode("latin-1")
        except UnicodeEncodeError:
            for rank, m in enumerate(texts):
                _unicode_to_bytes(m.replace(" ", ""), f"merge {rank}")  # raises, naming the merge
            raise
        pairs, start = [], 0
        for m, cut in zip(texts, cuts):
            pairs.append((data[start:start + cut], data[start + cut + 1:start + len(m)]))
            start += len(m)
        ids = self._ids
        bad = next((rank for rank, (a, b) in enumerate(pairs) if a + b not in ids), None)
        if bad is not None:
            raise ValueError(f"tokenizer: merge {bad} ({texts[bad]!r}) makes a string that is no token")
        # the first rank of a pair that is listed twice wins: insert them last to first
        return dict(zip(reversed(pairs), range(len(pairs) - 1, -1, -1)))

    def _build_tiktoken(self, use_tiktoken):
        """tiktoken.Encoding with the same ranks, for Llama 3 only (it has no pair-merges mode)."""
        if use_tiktoken is None:
            use_tiktoken = tiktoken is not None and self._merges is None
        if not use_tiktoken:
            return None
        if self._merges is not None:
            raise ValueError("use_tiktoken=True works for Llama 3 (rank) tokenizers, not merges-based ones")
        if tiktoken is None:
            raise RuntimeError("use_tiktoken=True but tiktoken is not installed: pip install tiktoken")
        return tiktoken.Encoding(
            name="llama3", pat_str=self._split_sources[0], mergeable_ranks=self._ids, special_tokens={}
        )

    def _rank_by_token(self, a, b):
        return self._ids.get(a + b, NO_MERGE)

    def _rank_by_pair(self, a, b):
        return self._merges.get((a, b), NO_MERGE)

    # --- properties

    @property
    def vocab_size(self):
        return len(self._vocab)

    @property
    def eot_id(self):
        """<|eot_id|> for Llama 3 (end of a chat turn), else None."""
        return self.special_tokens.get("<|eot_id|>")

    @property
    def has_chat_template(self):
        """True when encode_dialog works: Meta's format or a template from the model file."""
        return self.chat_format == "llama3" or self.chat_template is not None

    # --- encode

    def encode(self, text, bos=None, eos=False, allowed_special=frozenset()):
        """Text -> ids.

        bos: add the BOS id (None: the tokenizer's default, True for Llama 3). eos: append eos_id.
        allowed_special: special-token strings to read as special tokens: a set of strings, or
        "all"; any other special-token string in the text is encoded as plain text (Meta's default).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        specials = self._allowed_specials(allowed_special)
        ids = [self._required("bos_id")] if (self.add_bos if bos is None else bos) else []
        for chunk in self._chunks(_replace_surrogates(text)):
            ids.extend(self._encode_with_specials(chunk, specials))
        if eos:
            ids.append(self._required("eos_id"))
        return ids

    def _required(self, name):
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this tokenizer has no {name}; call encode with bos=False / eos=False")
        return value

    def _allowed_specials(self, allowed_special):
        """text -> id of every special string that splits the text: allowed control tokens plus
        user-defined tokens (always on)."""
        if allowed_special == "all":
            allowed = self.special_tokens
        else:
            unknown = set(allowed_special) - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special: {sorted(unknown)[:5]} are not special tokens here")
            allowed = {t: self.special_tokens[t] for t in allowed_special}
        return {**allowed, **self.user_defined_tokens}

    def _chunks(self, text):
        """Meta's slicing for Llama 3 ranks (see META_MAX_*), one chunk otherwise (llama.cpp / HF)."""
        if self._merges is not None:
            yield text
            return
        for i in range(0, len(text), META_MAX_ENCODE_CHARS):
            yield from _split_long_runs(text[i : i + META_MAX_ENCODE_CHARS], META_MAX_RUN_CHARS)

    def _encode_with_specials(self, text, specials):
        """Cut out special-token strings (longest first at each position), BPE the text between."""
        if not specials:
            return self._encode_ordinary(text)
        pattern = regex.compile("|".join(regex.escape(t) for t in sorted(specials, key=len, reverse=True)))
        ids, start = [], 0
        for m in pattern.finditer(text):
            ids.extend(self._encode_ordinary(text[start : m.start()]))
            ids.append(specials[m.group()])
            start = m.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def _encode_ordinary(self, text):
        """Text without special tokens -> ids: split into pieces, BPE each piece (cached)."""
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        ids = []
        for piece in self._pre_tokenize(text):
            piece_ids = self._cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece.encode("utf-8"))
                if len(self._cache) >= CACHE_MAX_ENTRIES:
                    self._cache.clear()
                self._cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def _pre_tokenize(self, text):
        """Apply each split pattern to every piece left by the previous one."""
        pieces = [text] if text else []
        for pattern in self._split_patterns:
            pieces = [p for piece in pieces for p in _split_isolated(pattern, piece)]
        return pieces

    def _encode_piece(self, word):
        """One pre-tokenized piece (bytes) -> ids."""
        if self.ignore_merges and word in self._ids:
            return [self._ids[word]]
        # a byte with no token (SmolLM2 lacks 21, e.g. 0x04) is dropped, as llama.cpp and HF do
        return [i for i in map(self._ids.get, bpe_merge(word, self._rank)) if i is not None]

    # --- decode

    def token_bytes(self, token_id):
        """The bytes one id stands for (special tokens: their text)."""
        if not 0 <= token_id < len(self._vocab):
            raise ValueError(f"decode: token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._vocab[token_id]

    def decode(self, ids):
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD (tiktoken's errors='replace')."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A StreamDecoder: push ids one at a time, get text as soon as it is complete UTF-8."""
        return StreamDecoder(self.token_bytes)

    # --- chat

    def encode_dialog(self, messages, tools=None, date_string=None):
        """A whole conversation -> ids (with BOS), ending with the open assistant header.

        messages: [{"role": "system"|"user"|"assistant"|"ipython"|"tool", "content": str}, ...];
        Llama 3 assistant messages may carry "tool_calls": [{"tool_name", "arguments"}] and
        "stop_reason": "end_of_message" (ends with <|eom_id|>) or "end_of_turn" (the default).
        tools: Llama 3: built-in tool names (BUILTIN_TOOLS) and custom tool dicts
        {"tool_name", "description", "parameters": {name: {"param_type", "description", "required"}}},
        which become Meta's Llama 3.1 system prompt and JSON tool prompt; templates: passed as `tools`.
        date_string: Llama 3 with tools: the "Today Date" line ("21 September 2024"), default today.
        """
        if self.chat_format == "llama3":
            messages = _with_llama31_tool_prompts(messages, tools, date_string) if tools else messages
            ids = [self.special_tokens["<|begin_of_text|>"]]
            for message in messages:
                ids.extend(self._encode_llama3_message(message))
            return ids + self._encode_llama3_header("assistant")
        text = self._render_template(messages, tools, add_generation_prompt=True)
        ids = self.encode(text, bos=False, allowed_special="all")
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def encode_dialog_continuation(self, messages):
        """Ids to append to a conversation whose last assistant turn ended with a stop token:
        the new messages, then the open assistant header; no BOS (multi-turn with KV-cache reuse)."""
        if self.chat_format == "llama3":
            ids = [i for message in messages for i in self._encode_llama3_message(message)]
            return ids + self._encode_llama3_header("assistant")
        return self.encode(self._template_continuation(messages), bos=False, allowed_special="all")

    def _encode_llama3_header(self, role):
        """<|start_header_id|>role<|end_header_id|>\\n\\n, as ChatFormat._encode_header."""
        role = "ipython" if role == "tool" else role
        return [
            self.special_tokens["<|start_header_id|>"],
            *self.encode(role, bos=False),
            self.special_tokens["<|end_header_id|>"],
            *self.encode("\n\n", bos=False),
        ]

    def _encode_llama3_message(self, message):
        """Header, content, tool calls, then <|eot_id|> (or <|eom_id|>), as ChatFormat.encode_message."""
        role, content = _check_message(message, ("system", "user", "assistant", "ipython", "tool"))
        tool_calls = message.get("tool_calls", []) if role == "assistant" else []
        ids = self._encode_llama3_header(role)
        # ChatFormat adds <|python_tag|> only before a code_interpreter call
        if tool_calls and tool_calls[0]["tool_name"] == "code_interpreter":
            ids.append(self.special_tokens["<|python_tag|>"])
        ids.extend(self.encode(content, bos=False))
        for call in tool_calls:
            ids.extend(self.encode(_encode_llama3_tool_call(call), bos=False))
        end_of_message = role == "assistant" and message.get("stop_reason") == "end_of_message"
        ids.append(self.special_tokens["<|eom_id|>" if end_of_message else "<|eot_id|>"])
        return ids

    def _render_template(self, messages, tools, add_generation_prompt):
        """The model's own chat template -> text (jinja2), or built-in ChatML without jinja2."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (a base model?); encode plain text instead")
        for message in messages:
            _check_message(message, None)
        if jinja2 is not None:
            bos, eos = self._token_text(self.bos_id), self._token_text(self.eos_id)
            return _render_jinja(self.chat_template, messages, tools, add_generation_prompt, bos, eos)
        if "<|im_start|>" in self.chat_template and not tools:
            return _render_chatml(messages, add_generation_prompt)
        raise RuntimeError("this model's chat template needs jinja2 to render: pip install jinja2")

    def _token_text(self, token_id):
        return "" if token_id is None else self._vocab[token_id].decode("utf-8", errors="replace")

    def _template_continuation(self, messages):
        """Render a stand-in conversation with and without the new messages; the new text is what
        follows the stand-in assistant turn's stop token (where generation stopped)."""
        marker = "A1b2C3"
        head = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": marker}]
        before = self._render_template(head, None, add_generation_prompt=False)
        after = self._render_template(head + list(messages), None, add_generation_prompt=True)
        cut = before.rindex(marker) + len(marker)
        stop_texts = [t for t in map(self._token_text, self.eos_ids) if t and t in before[cut:]]
        cut = min((before.find(t, cut) + len(t) for t in stop_texts), default=cut)
        if after[:cut] != before[:cut]:
            raise ValueError("this chat template re-renders earlier turns when messages are added; "
                             "re-encode the whole dialog with encode_dialog instead")
        return after[cut:]

    # --- serialization

    def to_dict(self):
        """JSON-serializable description; load(d) rebuilds this tokenizer.

        Llama 3: {"type": "llama3", "ranks": base64 tokens in rank order, "chat_format": "llama3" or
        None for a base model}; special tokens, BOS/EOS/stop ids and add_bos are Meta's fixed ones.
        Other BPE: {"type": "bpe", "tokens" (GGUF's byte-level strings, special tokens as text),
        "merges" ("a b"), "split_patterns", "ignore_merges", "special_tokens", "user_defined_tokens",
        "bos_id", "eos_id", "stop_ids", "add_bos", "chat_template"}.
        """
        common = {"format": DICT_FORMAT, "version": DICT_VERSION}
        if self._merges is None:
            ranks = [base64.b64encode(self._vocab[i]).decode("ascii") for i in range(len(self._ids))]
            return {**common, "type": "llama3", "ranks": ranks, "chat_format": self.chat_format}
        literal = {*self.special_tokens.values(), *self.user_defined_tokens.values()}
        merges = sorted(self._merges, key=self._merges.get)
        return {
            **common,
            "type": "bpe",
            # special tokens keep their text; other tokens use GPT-2's byte-level strings, as in GGUF
            "tokens": [t.decode("utf-8") if i in literal else _bytes_to_unicode_text(t)
                       for i, t in enumerate(self._vocab)],
            "merges": [f"{_bytes_to_unicode_text(a)} {_bytes_to_unicode_text(b)}" for a, b in merges],
            "special_tokens": self.special_tokens,
            "user_defined_tokens": self.user_defined_tokens,
            "split_patterns": self._split_sources,
            "ignore_merges": self.ignore_merges,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "stop_ids": sorted(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }


# -----------------------------------------------------------------------------
# SentencePiece
# Llama 2 family tokenizer.model through the optional sentencepiece package, same interface.


class SentencePieceTokenizer:
    """A SentencePiece model (serialized ModelProto bytes) behind the Tokenizer interface.

    Special tokens (<s>, </s>) are ids only: SentencePiece never reads them from text.
    There is no chat template (Llama 2 chat prompts are plain text around BOS/EOS ids).
    """

    chat_format = None
    chat_template = None
    has_chat_template = False

    def __init__(self, model_proto):
        if sentencepiece is None:
            raise RuntimeError(
                "this is a SentencePiece tokenizer.model (Llama 2 family); reading it needs the "
                "sentencepiece package: pip install sentencepiece"
            )
        self._model_proto = model_proto
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a tokenizer file: SentencePiece could not parse it ({e})") from None
        sp = self._sp
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.eos_ids = frozenset() if self.eos_id is None else frozenset([self.eos_id])
        self.eot_id = None
        self.special_tokens = {}
        self.add_bos = self.bos_id is not None
        self.vocab_size = sp.get_piece_size()

    def encode(self, text, bos=None, eos=False, allowed_special=frozenset()):
        """Text -> ids; bos None means add BOS (Llama 2's default)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        if allowed_special:
            raise ValueError("SentencePiece tokenizers read no special tokens from text; add BOS/EOS by id")
        ids = self._sp.encode(_replace_surrogates(text))
        if self.add_bos if bos is None else bos:
            ids.insert(0, self.bos_id)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        for i in ids:
            self.token_bytes(i)  # range check with our message
        return self._sp.decode(list(ids))

    def token_bytes(self, token_id):
        """Bytes of one piece: '▁' is a space, <0xAB> byte pieces are that byte, control is empty."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"decode: token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        if self._sp.is_control(token_id):
            return b""
        if self._sp.is_unknown(token_id):
            return " \u2047 ".encode("utf-8")  # SentencePiece shows <unk> as ' ⁇ '
        return piece.replace("\u2581", " ").encode("utf-8")

    def stream_decoder(self):
        # SentencePiece drops the space it put before the first word (its 'dummy prefix')
        return StreamDecoder(self.token_bytes, strip_leading_space=True)

    def encode_dialog(self, messages, tools=None, date_string=None):
        raise ValueError("this SentencePiece tokenizer has no chat template; encode plain text instead")

    encode_dialog_continuation = encode_dialog

    def to_dict(self):
        model = base64.b64encode(self._model_proto).decode("ascii")
        return {"format": DICT_FORMAT, "version": DICT_VERSION, "type": "sentencepiece", "model": model}


# -----------------------------------------------------------------------------
# Streaming
# Emit text only once its bytes form complete UTF-8, so a character split over tokens prints once.


class StreamDecoder:
    """push(id) -> newly complete text; flush() -> the rest (an incomplete tail becomes U+FFFD).

    The concatenation of all push() results and flush() equals decode(all ids).
    """

    def __init__(self, token_bytes, strip_leading_space=False):
        self._token_bytes = token_bytes
        # an incremental UTF-8 decoder keeps a partial character until its last byte arrives
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_leading_space = strip_leading_space
        self._started = False

    def push(self, token_id):
        return self._emit(self._utf8.decode(self._token_bytes(token_id)))

    def flush(self):
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text

    def _emit(self, text):
        if self._strip_leading_space and not self._started and text:
            text = text[1:] if text.startswith(" ") else text
        self._started = self._started or bool(text)
        return text


# -----------------------------------------------------------------------------
# Chat formats
# Llama 3.1 tool prompts and tool calls (Meta's llama-models/llama-stack text), jinja2 and ChatML.


def _check_message(message, roles):
    """A message is {"role": str, "content": str, ...}; returns (role, content)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"chat message must be a dict with a 'role' string, got {message!r:.80}")
    role, content = message["role"], message.get("content", "")
    if roles is not None and role not in roles:
        raise ValueError(f"chat message role {role!r} unknown; expected one of {', '.join(roles)}")
    if not isinstance(content, str):
        raise ValueError(f"chat message content must be a string, got {type(content).__name__}")
    return role, content


def _encode_llama3_tool_call(call):
    """One assistant tool call as text, as llama_models' ToolUtils.encode_tool_call (JSON format)."""
    name, args = call["tool_name"], call["arguments"]
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    return json.dumps({"type": "function", "name": name, "parameters": args})


def _with_llama31_tool_prompts(messages, tools, date_string):
    """Meta's Llama 3.1 tool setup (llama-stack's augment_messages_for_tools_llama_3_1): a system
    message 'Environment: ipython' / 'Tools: ...' / knowledge dates / the caller's system text, and
    custom tools as a JSON tool-list user message before the conversation."""
    builtin = [t if isinstance(t, str) else t["tool_name"] for t in tools
               if isinstance(t, str) or t.get("tool_name") in BUILTIN_TOOLS]
    custom = [t for t in tools if not isinstance(t, str) and t.get("tool_name") not in BUILTIN_TOOLS]
    unknown = [t for t in builtin if t not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"tools: {unknown} are not built-in tools ({', '.join(BUILTIN_TOOLS)}); "
                         "describe custom tools as dicts with tool_name, description, parameters")
    system = "Environment: ipython\n"
    named = [t for t in builtin if t != "code_interpreter"]
    if named:
        system += f"Tools: {', '.join(named)}"
    system += "\n"
    day = date_string or datetime.now().strftime("%d %B %Y")  # Meta's SystemDefaultGenerator format
    system += f"Cutting Knowledge Date: December 2023\nToday Date: {day}"
    rest = list(messages)
    if rest and rest[0].get("role") == "system":
        system += "\n" + rest.pop(0)["content"]
    head = [{"role": "system", "content": system}]
    if custom:
        head.append({"role": "user", "content": _llama31_json_tools_prompt(custom)})
    return head + rest


def _llama31_json_tools_prompt(tools):
    """The custom-tool user message (llama-models' JsonCustomToolGenerator text, same whitespace)."""
    blocks = []
    for tool in tools:
        params = tool.get("parameters", {})
        required = [name for name, p in params.items() if p.get("required", True) is True]
        properties = ",\n".join(
            "                {\n"
            f'                    "{name}": {{\n'
            '                        "type": "object",\n'
            f'                        "description": "{p.get("description", "")}"\n'
            "                    }\n"
            "                }"
            for name, p in params.items()
        )
        blocks.append(
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{tool["tool_name"]}",\n'
            f'        "description": "{tool.get("description", "")}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            '            "properties": [' + ("\n" + properties if properties else "") + "\n"
            "            ],\n"
            f'            "required": {_jinja_tojson(required)}\n'
            "        }\n"
            "    }\n"
            "}\n"
        )
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        + "".join(blocks)
        + "\nReturn function calls in JSON format."
    )


def _jinja_tojson(value):
    """jinja2's |tojson: sorted keys, HTML-unsafe characters escaped."""
    text = json.dumps(value, sort_keys=True)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return text


def _render_jinja(template, messages, tools, add_generation_prompt, bos_token, eos_token):
    """Render an HF-style chat template as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    # the template is a program from the model file: whatever it raises is the template's error
    try:
        return env.from_string(template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token,
        )
    except ValueError:  # raise_exception's message, or one of ours
        raise
    except Exception as e:
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


def _raise_template_error(message):
    raise ValueError(f"chat template: {message}")


def _render_chatml(messages, add_generation_prompt):
    """Built-in ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m.get('content', '')}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
