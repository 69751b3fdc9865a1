import hashlib
import os
import shutil

import pytest

from data import tokenizer as tokenizer_module
from data.tokenizer import EOS_TOKEN_ID, FILE_SHA256, VOCAB_SIZE, load_tokenizer


def test_shipped_files_match_the_published_hashes():
    for name, digest in FILE_SHA256.items():
        assert hashlib.sha256((tokenizer_module.TOKENIZER_DIR / name).read_bytes()).hexdigest() == digest


def test_known_ids(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token_id == EOS_TOKEN_ID == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer(" The quick brown fox")["input_ids"] == [383, 2068, 7586, 21831]
    assert tokenizer("a<|endoftext|>b")["input_ids"] == [64, 50256, 65]


def test_tampered_file_is_refused(tmp_path, monkeypatch):
    for name in FILE_SHA256:
        shutil.copy(tokenizer_module.TOKENIZER_DIR / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as handle:
        handle.write("x y\n")
    monkeypatch.setattr(tokenizer_module, "TOKENIZER_DIR", tmp_path)
    tokenizer_module._vocab_and_merges.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256"):
            load_tokenizer()
    finally:
        tokenizer_module._vocab_and_merges.cache_clear()


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Simple English Wikipedia, 1942 — naïve café!"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE", "0") == "1" or os.environ.get("TRM_ONLINE_TESTS") != "1",
                    reason="needs the Hub; set TRM_ONLINE_TESTS=1 when online")
def test_matches_the_hub_gpt2_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    hub = AutoTokenizer.from_pretrained("gpt2")
    text = "The 1942 Alabama gubernatorial election took place on November 3, 1942.<|endoftext|> Next"
    assert hub(text)["input_ids"] == tokenizer(text)["input_ids"]
