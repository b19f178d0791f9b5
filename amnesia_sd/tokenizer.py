"""Offline CLIP tokenizers with a closed vocabulary.

Real models ship their own tokenizer; this one serves models the project builds itself (the tiny
test models and the digits model), where nothing can be downloaded. A byte-pair vocabulary is
trained on the given words, so each of them is one token and any other text still tokenizes into
smaller pieces.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
SYMBOLS = list(string.ascii_lowercase + string.digits + string.punctuation)


def write_word_tokenizer(words: list[str], directory: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json and merges.txt covering `words` into `directory`; return the tokenizer."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: training stops when every word is one token
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=SYMBOLS,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # Single symbols are words too, so "0" or "," alone get their end-of-word token.
    bpe.train_from_iterator([" ".join(w.lower() for w in words), " ".join(SYMBOLS)], trainer)
    model = json.loads(bpe.to_str())["model"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length
    )
