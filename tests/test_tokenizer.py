"""The offline tokenizer: every given word is one token, and the files are the same every time."""

from amnesia_sd.model.tokenizer import write_word_tokenizer


def test_words_are_single_tokens_and_files_are_deterministic(tmp_path):
    words = ["a", "photo", "of", "brad", "pitt", "hot", "handwritten", "digit", "zero", "0"]
    tok = write_word_tokenizer(words, tmp_path / "a")
    write_word_tokenizer(list(reversed(words)), tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokens = tok.convert_ids_to_tokens(tok("a photo of brad pitt, handwritten digit zero 0").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "brad</w>", "pitt</w>", ",</w>",
                      "handwritten</w>", "digit</w>", "zero</w>", "0</w>", "<|endoftext|>"]
    unknown = tok.convert_ids_to_tokens(tok("xylophone").input_ids)[1:-1]
    assert "".join(unknown).replace("</w>", "") == "xylophone" and "<|endoftext|>" not in unknown
