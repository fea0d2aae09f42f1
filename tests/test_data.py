"""Data pipeline: documents, EOS placement, packing, held-out split, caching, errors.

Real data from the repository's data/ folder, cut to a few dozen documents so the file runs in
seconds; every build gets its own datasets cache folder under tmp_path.
"""

import json
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from dpsnr.training.data import (
    EOS_SEPARATOR,
    DataArguments,
    build_datasets,
    check_tokenizer_matches_model,
    iter_wikitext_articles,
    load_documents,
    load_text_for_eval,
    read_documents,
)
from dpsnr.training.tokenizer import load_gpt2_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
TINYSTORIES = DATA / "tinystories" / "TinyStories-train.head-2316.txt"
WT2_VALID = DATA / "wikitext-2" / "valid.txt"
WT2_TEST = DATA / "wikitext-2" / "test.txt"
WT2_RAW_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def tok():
    return load_gpt2_tokenizer()


def first_stories(n: int) -> str:
    """The first n TinyStories, each followed by its `<|endoftext|>` line, as in the file."""
    text = TINYSTORIES.read_text(encoding="utf-8")
    marker = EOS_SEPARATOR + "\n"
    end = 0
    for _ in range(n):
        end = text.index(marker, end) + len(marker)
    return text[:end]


def first_articles(path: Path, n: int) -> str:
    """The first n WikiText articles of a file, verbatim."""
    articles = list(iter_wikitext_articles(path.read_text(encoding="utf-8").splitlines(keepends=True)))
    return "".join(articles[:n])


def args(tmp_path: Path, **kw) -> DataArguments:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataArguments(**kw)


@pytest.fixture
def stories_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(first_stories(40), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- TinyStories


def test_one_document_per_separator(tmp_path, stories_file):
    text = stories_file.read_text(encoding="utf-8")
    docs = list(read_documents(stories_file))
    assert len(docs) == text.count(EOS_SEPARATOR) == 40
    assert all(EOS_SEPARATOR not in d and d == d.strip() and d in text for d in docs)
    split = load_documents(args(tmp_path, train_file=str(stories_file), validation_split_percentage=10))
    assert len(split["train"]) + len(split["validation"]) == 40
    assert len(split["validation"]) == 4


def test_inline_separator_and_trailing_story(tmp_path):
    path = tmp_path / "inline.txt"
    path.write_text("First story.<|endoftext|>Second story.\n<|endoftext|>\n\nThird, unterminated.\n")
    assert list(read_documents(path, "tinystories")) == ["First story.", "Second story.", "Third, unterminated."]


def test_packed_stream_is_documents_joined_by_eos(tmp_path, stories_file, tok):
    block = 16
    a = args(tmp_path, train_file=str(stories_file), block_size=block, validation_split_percentage=10)
    blocks = build_datasets(a, tok, model_max_positions=64)
    docs = load_documents(a)
    for split in ("train", "validation"):
        rows = blocks[split]
        assert all(len(r["input_ids"]) == block for r in rows)
        assert all(r["labels"] == r["input_ids"] for r in rows)  # the model shifts, not the data
        flat = [t for r in rows for t in r["input_ids"]]
        expected = [t for d in docs[split]["text"] for t in tok(d).input_ids + [tok.eos_token_id]]
        # Fewer than 1000 documents form one packing batch: only the last partial block is dropped.
        assert flat == expected[: len(flat)] and 0 <= len(expected) - len(flat) < block
        assert flat.count(tok.eos_token_id) >= len(docs[split]) - 1


def test_held_out_split_is_the_last_documents_in_file_order(tmp_path, stories_file):
    def split(cache):
        d = load_documents(args(tmp_path, train_file=str(stories_file), validation_split_percentage=20,
                                cache_dir=str(tmp_path / cache)))
        assert not set(d["train"]["text"]) & set(d["validation"]["text"])
        return list(d["train"]["text"]), list(d["validation"]["text"])

    train, validation = split("c1")
    assert len(train) == 32 and len(validation) == 8  # 20% of 40 stories
    documents = list(read_documents(stories_file))
    assert validation == documents[-8:] and train == documents[:-8]  # the rule eval/ relies on
    assert split("c2") == (train, validation)  # deterministic across fresh caches


# ----------------------------------------------------------------------------- WikiText


def test_wikitext_articles_rejoin_to_the_file():
    text = WT2_TEST.read_text(encoding="utf-8")
    articles = list(iter_wikitext_articles(text.splitlines(keepends=True)))
    assert len(articles) == 60  # WikiText-2 test: 60 articles; formula lines " = 1 ... = " are not titles
    assert "".join(articles) == text
    assert all(a.startswith(" \n = ") and not a.startswith(" \n = = ") for a in articles)


LAYOUTS = {
    "tokens": (WT2_TEST, WT2_VALID, "wiki.train.tokens", "wiki.valid.tokens"),
    "pytorch-examples": (WT2_TEST, WT2_VALID, "train.txt", "valid.txt"),
    "raw": (WT2_RAW_TEST, WT2_RAW_TEST, "wiki.train.raw", "wiki.valid.raw"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wikitext_layouts_load_articles(tmp_path, tok, layout):
    train_src, valid_src, train_name, valid_name = LAYOUTS[layout]
    folder = tmp_path / "wikitext"
    folder.mkdir()
    train_text, valid_text = first_articles(train_src, 4), first_articles(valid_src, 2)
    (folder / train_name).write_text(train_text, encoding="utf-8")
    (folder / valid_name).write_text(valid_text, encoding="utf-8")
    a = args(tmp_path, dataset_name=str(folder), block_size=32)
    docs = load_documents(a)
    # The folder's own valid file is used: no documents are held out of train.
    assert len(docs["train"]) == 4 and len(docs["validation"]) == 2
    assert "".join(docs["train"]["text"]) == train_text
    assert "".join(docs["validation"]["text"]) == valid_text
    blocks = build_datasets(a, tok)
    assert len(blocks["train"]) > 0 and all(len(x) == 32 for x in blocks["train"]["input_ids"])


def test_single_wikitext_file_is_detected(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(first_articles(WT2_VALID, 3), encoding="utf-8")
    assert len(list(read_documents(path))) == 3


def test_eval_text_is_the_whole_split(tmp_path, tok):
    assert load_text_for_eval(str(WT2_TEST)) == WT2_TEST.read_text(encoding="utf-8")
    assert load_text_for_eval(str(WT2_VALID.parent), split="valid") == WT2_VALID.read_text(encoding="utf-8")
    # transformers' perplexity guide joins the rows with "\n\n": 287,644 GPT-2 tokens on this split.
    hf_text = load_text_for_eval(str(WT2_RAW_TEST), join="hf")
    assert len(tok(hf_text, verbose=False).input_ids) == 287_644


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_text_column(tmp_path, tok, suffix):
    stories = list(read_documents(TINYSTORIES.parent / "tinystories_sample.cs336.txt"))
    records = [{"id": i, "story": s} for i, s in enumerate(stories * 4)]
    path = tmp_path / f"stories{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    a = args(tmp_path, train_file=str(path), text_column="story", block_size=32, validation_split_percentage=25)
    docs = load_documents(a)
    assert sorted([*docs["train"]["text"], *docs["validation"]["text"]]) == sorted(stories * 4)
    assert len(build_datasets(a, tok)["train"]) > 0
    with pytest.raises(ValueError, match="'body'.*'story'"):
        load_documents(args(tmp_path, train_file=str(path), text_column="body"))


# ----------------------------------------------------------------------------- cache


def test_second_build_reuses_cache_files(tmp_path, stories_file, tok):
    a = args(tmp_path, train_file=str(stories_file), block_size=16, validation_split_percentage=10)
    cache = Path(a.cache_dir)

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}

    first = build_datasets(a, tok)
    files = snapshot()
    second = build_datasets(a, tok)
    assert snapshot() == files  # nothing written, nothing rewritten
    for split in ("train", "validation"):
        assert second[split].cache_files == first[split].cache_files
        assert list(second[split]["input_ids"]) == list(first[split]["input_ids"])
    other = build_datasets(args(tmp_path, train_file=str(stories_file), block_size=8,
                                validation_split_percentage=10), tok)
    assert other["train"].cache_files != first["train"].cache_files  # a new block size is a new cache


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path, tok):
    missing = tmp_path / "nope" / "stories.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_datasets(args(tmp_path, train_file=str(missing), block_size=8), tok)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_for_eval(str(tmp_path / "nope.txt"))


def test_empty_file_names_the_file(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"{empty}.*0 bytes"):
        build_datasets(args(tmp_path, train_file=str(empty), block_size=8), tok)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n<|endoftext|>\n")
    with pytest.raises(ValueError, match=rf"{blank}.*no documents"):
        build_datasets(args(tmp_path, train_file=str(blank), block_size=8), tok)


def test_too_few_tokens_names_the_counts(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(20)))
    a = args(tmp_path, train_file=str(path), block_size=512, validation_split_percentage=10)
    # 18 train stories x ("Story", " i", ".", EOS) = 72 tokens < 512.
    with pytest.raises(ValueError, match=rf"{path} \[train\]: 18 documents gave 72 tokens.*block_size=512"):
        build_datasets(a, tok, model_max_positions=1024)


def test_block_size_checks(tmp_path, tok):
    missing = str(tmp_path / "missing.txt")  # the size check comes before any file is read
    with pytest.raises(ValueError, match="block_size=4096.*max_position_embeddings=2048"):
        build_datasets(args(tmp_path, train_file=missing, block_size=4096), tok, model_max_positions=2048)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"block_size must be positive, got {bad}"):
            DataArguments(train_file=missing, block_size=bad)


def test_tokenizer_larger_than_model_vocab(tmp_path, tok):
    check_tokenizer_matches_model(tok, 50257)
    check_tokenizer_matches_model(tok, 50304)  # padded embeddings are fine
    with pytest.raises(ValueError, match="50257 tokens.*vocab_size is 50000"):
        check_tokenizer_matches_model(tok, 50000)
    with pytest.raises(ValueError, match="50257 tokens.*vocab_size is 4096"):
        build_datasets(args(tmp_path, train_file=str(tmp_path / "x.txt"), block_size=8), tok,
                       model_vocab_size=4096)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset_name or train_file"):
        DataArguments()
    with pytest.raises(ValueError, match="data_format='csv'"):
        DataArguments(train_file="a.txt", data_format="csv")
    with pytest.raises(ValueError, match="validation_split_percentage"):
        DataArguments(train_file="a.txt", validation_split_percentage=100)
    with pytest.raises(ValueError, match="data_format='hub' needs dataset_name"):
        DataArguments(train_file="a.txt", data_format="hub")


def test_command_line_arguments(tmp_path, stories_file, tok):
    (a,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_file", str(stories_file), "--block_size", "16", "--max_train_samples", "3",
         "--validation_split_percentage", "10", "--cache_dir", str(tmp_path / "cache")]
    )
    blocks = build_datasets(a, tok)
    assert len(blocks["train"]) == 3 and len(blocks["validation"]) > 3


def test_relative_paths_use_the_data_dir(tmp_path, monkeypatch, tok):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "s.txt").write_text(first_stories(10), encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not found relative to the working directory ...
    monkeypatch.setenv("DPSNR_DATA_DIR", str(tmp_path))  # ... but inside $DPSNR_DATA_DIR
    docs = load_documents(args(tmp_path, train_file="corpus/s.txt", validation_split_percentage=10))
    assert len(docs["train"]) == 9
