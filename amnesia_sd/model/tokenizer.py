"""Offline CLIP and T5 tokenizers with a closed vocabulary.

Real models ship their own tokenizer; this one serves models the project builds itself (the tiny
test models and the digits model), where nothing can be downloaded. Byte-pair merges are learned
from the given words, so each of them is one token and any other text still tokenizes into
smaller pieces.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
SYMBOLS = list(string.ascii_lowercase + string.digits + string.punctuation)
END = "</w>"
SPACE = "\u2581"  # SentencePiece's word start


def write_word_tokenizer(words: list[str], directory: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json and merges.txt covering `words` into `directory`; return the tokenizer.

    The merges are learned here in plain Python, ties broken by the pair itself, so the same words
    always give the same files (tokenizers' trainer numbers symbols in hash order: its files, and
    so the text encoder's embedding rows, changed from run to run).
    """
    pieces = sorted({w for text in words for w in re.findall(r"[a-z]+|\d|[^\sa-z\d]", text.lower())})
    segmented = [[*w[:-1], w[-1] + END] for w in pieces]
    vocab = {token: i for i, token in enumerate([*SPECIAL, *SYMBOLS, *(s + END for s in SYMBOLS)])}
    merges = []
    while True:
        pairs = Counter(pair for word in segmented for pair in zip(word, word[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent, then alphabetical
        merges.append(best)
        vocab.setdefault("".join(best), len(vocab))
        segmented = [_merge(word, best) for word in segmented]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_word_t5_tokenizer(words: list[str], directory: str | Path, max_length: int = 32) -> T5Tokenizer:
    """A T5 (SentencePiece unigram) tokenizer in which each of `words` is one piece, and single
    letters, digits and punctuation spell anything else; written to `directory` (tokenizer.json).
    Scores fall with the piece's position, so the same words always give the same tokenizer."""
    pieces = sorted({w for text in words for w in re.findall(r"[a-z]+|\d|[^\sa-z\d]", text.lower())})
    units = [*(SPACE + w for w in pieces), SPACE, *SYMBOLS]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(u, -float(i + 1)) for i, u in enumerate(units)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
