"""Benchmark: tokenizer.py's pure-Python BPE against tiktoken on a ~100K-token document.

    python bench_tokenizer.py                 # Llama 3 tokenizer from the llama-models package
    python bench_tokenizer.py --tokens 200000 --tokenizer path/to/tokenizer.model

Two documents, both assembled from tests/tokenizer_corpus with a seeded RNG:
    corpus     the corpus lines shuffled and repeated (many scripts, code, emoji, digits): text
               repeats words the way real text does, so the word -> ids cache helps as it would
    unique     made-up words that almost never repeat: every piece goes through the merge loop
Each is encoded once with a fresh tokenizer (cold cache) and once more (warm cache); tiktoken
encodes the same text and the ids are checked to be equal. Prints tokens, seconds, tokens/s, ratio.
"""

import argparse
import pathlib
import random
import sys
import time

import tokenizer

CORPUS_DIR = pathlib.Path(__file__).parent / "tests" / "tokenizer_corpus"


# -----------------------------------------------------------------------------
# Documents
# Seeded text of about the requested number of tokens.


def corpus_document(tok, n_tokens, rng):
    """Corpus lines in shuffled order, repeated until the text has n_tokens tokens."""
    lines = [line for path in sorted(CORPUS_DIR.glob("*.txt"))
             for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    parts, count = [], 0
    while count < n_tokens:
        rng.shuffle(lines)
        parts.extend(lines)
        count += len(tok.encode("".join(lines), bos=False))
    return "".join(parts)


def unique_document(tok, n_tokens, rng):
    """Made-up words (random letters from a few scripts) with numbers and punctuation."""
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "абвгдежзийклмнопрстуфхцчшщ", "αβγδεζηθικλμνξοπρστυφχψω",
                 "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"]
    parts, count = [], 0
    while count < n_tokens:
        words = []
        for _ in range(1000):
            letters = rng.choice(alphabets)
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(3, 12))))
            if rng.random() < 0.1:
                words.append(str(rng.randint(0, 10**6)) + rng.choice(".,;:!?"))
        parts.append(" " + " ".join(words))
        count += len(tok.encode(parts[-1], bos=False))
    return "".join(parts)


# -----------------------------------------------------------------------------
# Timing
# One encode per measurement; the document is long enough that timer resolution does not matter.


def timed_encode(tok, text):
    start = time.perf_counter()
    ids = tok.encode(text, bos=False)
    return ids, time.perf_counter() - start


def bench(path, name, text):
    pure = tokenizer.load(path, use_tiktoken=False)
    ids, cold = timed_encode(pure, text)
    _, warm = timed_encode(pure, text)
    fast = tokenizer.load(path, use_tiktoken=True)
    fast_ids, fast_s = timed_encode(fast, text)
    if fast_ids != ids:
        raise RuntimeError(f"{name}: pure-Python ids differ from tiktoken's; run tests/test_tokenizer.py")
    n = len(ids)
    print(f"{name:8s} {n:8d} tokens | pure cold {cold:6.2f} s ({n / cold:9,.0f} tok/s) | "
          f"pure warm {warm:6.2f} s | tiktoken {fast_s:6.3f} s ({n / fast_s:10,.0f} tok/s) | "
          f"ratio cold/tiktoken {cold / fast_s:5.1f}x")


def default_tokenizer_path():
    try:
        import llama_models
    except ImportError:
        raise SystemExit("error: no --tokenizer given and llama-models is not installed: pip install llama-models")
    return pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="example: python bench_tokenizer.py --tokens 100000")
    parser.add_argument("-z", "--tokenizer", help="Meta's Llama 3 tokenizer.model (default: llama-models')")
    parser.add_argument("--tokens", type=int, default=100_000, help="document size in tokens (default 100000)")
    parser.add_argument("-s", "--seed", type=int, default=0, help="seed for the document shuffles (default 0)")
    args = parser.parse_args(argv)
    if args.tokens <= 0:
        parser.error("--tokens must be positive")
    if tokenizer.tiktoken is None:
        raise SystemExit("error: the comparison needs tiktoken: pip install tiktoken")
    path = args.tokenizer or default_tokenizer_path()
    reference = tokenizer.load(path, use_tiktoken=True)
    print(f"python {sys.version.split()[0]}, tiktoken {tokenizer.tiktoken.__version__}, tokenizer {path}")
    for name, make in (("corpus", corpus_document), ("unique", unique_document)):
        bench(path, name, make(reference, args.tokens, random.Random(args.seed)))


if __name__ == "__main__":
    main()
