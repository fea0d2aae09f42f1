"""Data pipeline: raw text → documents → token ids → fixed-length blocks for causal LM training.

    source (file, folder or Hub name)
      │  read_documents / Hub rows          one row per document, column "text"
      ▼
    documents ── train_test_split(seed) ──▶ held-out validation (only when the source has none)
      │  tokenize (datasets.map, batched)   ids + [EOS] after every document
      ▼
    token stream ── pack (datasets.map) ──▶ blocks of exactly `block_size` ids; labels = input_ids

Every stage writes Arrow cache files under a fingerprint of its inputs (file path, size and
mtime; tokenizer; block size), so a second run with the same source, tokenizer and block size
loads them instead of recomputing.
Labels equal input_ids: the model shifts them, as every transformers causal LM does.

Document conventions (what one "document" is decides where EOS goes):
- TinyStories (``<|endoftext|>`` between stories): one story, stripped of surrounding
  whitespace. N separators give N stories (plus any text after the last one).
- WikiText (``wiki.*.tokens``, ``wiki.*.raw``, pytorch/examples ``train/valid/test.txt``): one
  *article*, starting at the blank line before its `` = Title = `` heading and kept verbatim,
  so joining the articles gives the file back byte for byte. Articles rather than lines,
  because an EOS after every paragraph would teach the model that paragraphs are unrelated.
  A top-level heading is a line `` = X = `` (X not starting or ending with ``=``) between two
  blank lines; that rule finds exactly the 60 articles of the WikiText-2 valid and test splits
  (two formula lines `` = 1 ... k = `` in the test split are not headings).
  For perplexity the whole split is one text: see `load_text_for_eval`.
- plain text: one non-blank line per document (the convention of datasets' "text" builder).
- JSON / JSONL / Hub datasets: one row of `text_column` per document.

Packing follows transformers' run_clm example: token ids of a batch of 1000 documents are
concatenated and cut into blocks; the tail shorter than a block at the end of each batch is
dropped (at most block_size - 1 tokens per 1000 documents).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, DatasetDict, Features, Value
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

DATA_FORMATS = ("auto", "tinystories", "wikitext", "text", "json", "hub")
EOS_SEPARATOR = "<|endoftext|>"
# The 2 MB TinyStories slice shipped in the repository's data/ folder: the default demo corpus.
DEFAULT_TRAIN_FILE = "tinystories/TinyStories-train.head-2316.txt"
# Bump when a reader or transform changes its output, so old cache files are not reused.
_PIPELINE_VERSION = "dpsnr-data-v1"
_PACK_BATCH_DOCS = 1000
_WIKITEXT_SPLIT_FILES = {  # split → file names tried in a WikiText folder, in this order
    "train": ("wiki.train.tokens", "wiki.train.raw", "train.txt"),
    "validation": ("wiki.valid.tokens", "wiki.valid.raw", "valid.txt"),
    "test": ("wiki.test.tokens", "wiki.test.raw", "test.txt"),
}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_JSON_SUFFIXES = (".json", ".jsonl")
_FILE_SUFFIXES = (".txt", ".tokens", ".raw", *_JSON_SUFFIXES)
_TEXT_FEATURES = Features({"text": Value("string")})


@dataclass
class DataArguments:
    """What to train on and how to cut it into blocks (parse with `HfArgumentParser`).

    Give either `dataset_name` (a Hub dataset, or a local folder such as a WikiText folder)
    or `train_file` (a local .txt / .tokens / .raw / .json / .jsonl file). Relative paths are
    looked up in the working directory, then `data_dir` (default: ``$DPSNR_DATA_DIR``, else
    ``../shared/data`` beside the repository), then the repository's ``data/`` folder.
    """

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset name (e.g. 'wikitext') or a local folder."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset config (e.g. 'wikitext-2-raw-v1')."}
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": f"Local training file, e.g. {DEFAULT_TRAIN_FILE}."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Local validation file; if unset, one is held out."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column of JSON/Hub data."})
    data_format: str = field(
        default="auto", metadata={"help": f"One of {', '.join(DATA_FORMATS)}.", "choices": DATA_FORMATS}
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens per block; default: the model's max positions, else min(tokenizer max, 1024)."},
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of documents held out when the source has no validation split."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for tokenization (default 1)."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N train blocks."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N validation blocks."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache folder."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute cached transforms."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Extra folder for relative data paths."})

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format={self.data_format!r} is not one of {DATA_FORMATS}")
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("DataArguments needs dataset_name or train_file (e.g. train_file=DEFAULT_TRAIN_FILE)")
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError(
                f"give dataset_name ({self.dataset_name!r}) or train_file ({self.train_file!r}), not both"
            )
        if self.data_format == "hub" and self.dataset_name is None:
            raise ValueError("data_format='hub' needs dataset_name (a Hub dataset id)")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ValueError(f"preprocessing_num_workers must be >= 1, got {self.preprocessing_num_workers}")


# ----------------------------------------------------------------------------- paths


def default_data_dirs(data_dir: Optional[str | os.PathLike] = None) -> list[Path]:
    """Folders searched for relative data paths, after the working directory.

    First the large-data folder (`data_dir`, else ``$DPSNR_DATA_DIR``, else ``../shared/data``
    beside the repository), which holds full splits; then the repository's own ``data/``,
    which holds small slices (e.g. WikiText-2 valid/test without the 10.8 MB train split).
    """
    repo_root = Path(__file__).resolve().parents[1]
    large = data_dir or os.environ.get("DPSNR_DATA_DIR") or repo_root.parent / "shared" / "data"
    return [Path(large), repo_root / "data"]


def resolve_data_path(path: str | os.PathLike, data_dir: Optional[str | os.PathLike] = None) -> Path:
    """Return an existing path for `path`, or raise FileNotFoundError naming every place tried."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates += [folder / path for folder in default_data_dirs(data_dir)]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"data file not found: {path} (looked in: {', '.join(map(str, candidates))})")


def _find_local(name: str, data_dir: Optional[str]) -> Optional[Path]:
    try:
        return resolve_data_path(name, data_dir)
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- documents


def _is_blank(line: str) -> bool:
    return not line.strip()


def _is_wikitext_title(line: str) -> bool:
    # " = Title = " but not " = = Section = = "; see the module docstring for the blank-line rule.
    inner = line.strip()
    return len(inner) > 4 and inner.startswith("= ") and inner.endswith(" =") and inner[2] != "=" and inner[-3] != "="


def iter_wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines (with their newlines) into articles; joining the output gives the input back."""
    article: list[str] = []
    before_prev: Optional[str] = None
    prev: Optional[str] = None
    for line in lines:
        # `prev` is a title when it sits between blank lines: the article starts at `before_prev`.
        if before_prev is not None and _is_blank(before_prev) and _is_wikitext_title(prev) and _is_blank(line):
            head = article[:-2]
            if any(not _is_blank(x) for x in head):
                yield "".join(head)
                article = article[-2:]
        article.append(line)
        before_prev, prev = prev, line
    if any(not _is_blank(x) for x in article):
        yield "".join(article)


def iter_tinystories(lines: Iterable[str]) -> Iterator[str]:
    """Split text on `<|endoftext|>` (own line or inline) into stripped, non-empty stories."""
    story: list[str] = []
    for line in lines:
        *finished, rest = line.split(EOS_SEPARATOR)
        for piece in finished:
            story.append(piece)
            text = "".join(story).strip()
            if text:
                yield text
            story = []
        story.append(rest)
    text = "".join(story).strip()
    if text:
        yield text


def iter_text_lines(lines: Iterable[str]) -> Iterator[str]:
    """Plain text: every non-blank line is a document (datasets' "text" builder convention)."""
    for line in lines:
        if not _is_blank(line):
            yield line.rstrip("\r\n")


_READERS = {"tinystories": iter_tinystories, "wikitext": iter_wikitext_articles, "text": iter_text_lines}


def detect_format(path: Path) -> str:
    """Guess a local file's layout from its name and first 64 KiB."""
    if path.suffix in _JSON_SUFFIXES:
        return "json"
    if re.fullmatch(r"wiki\.(train|valid|test)\.(tokens|raw)", path.name):
        return "wikitext"
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if EOS_SEPARATOR in head:
        return "tinystories"
    lines = head.splitlines(keepends=True)[:50]
    if any(_is_wikitext_title(x) for x in lines) and path.suffix in (".txt", ".tokens", ".raw"):
        return "wikitext"
    return "text"


def read_documents(path: str | os.PathLike, data_format: str = "auto") -> Iterator[str]:
    """Stream the documents of one local text file (tinystories, wikitext or text layout)."""
    path = Path(path)
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt not in _READERS:
        raise ValueError(f"{path}: data_format {fmt!r} is not a plain-text layout {tuple(_READERS)}")
    with path.open(encoding="utf-8") as f:
        yield from _READERS[fmt](f)


def _generate_rows(path: str, data_format: str) -> Iterator[dict[str, str]]:
    # Module-level so datasets can pickle it for the Generator builder.
    for doc in read_documents(path, data_format):
        yield {"text": doc}


def _generate_hub_wikitext(name: str, config: Optional[str], split: str, column: str, cache_dir: Optional[str]):
    # Hub WikiText rows are the file's lines ("" for a blank line): rebuild lines, then articles.
    rows = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)[column]
    for doc in iter_wikitext_articles(row if row.strip() else " \n" for row in rows):
        yield {"text": doc}


def _local_documents(path: Path, data_format: str, args: DataArguments) -> Dataset:
    """One local file → a disk-backed Dataset of documents (cached by path, size and mtime)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass it as dataset_name, or pass a file as train_file")
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): no documents to train on")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt == "json":
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=args.cache_dir)
        return _select_text_column(ds, args.text_column, str(path))
    if next(read_documents(path, fmt), None) is None:  # reads only up to the first document
        raise ValueError(f"{path} ({stat.st_size} bytes, format {fmt}) contains no documents")
    fingerprint = Hasher.hash([_PIPELINE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, fmt])
    return Dataset.from_generator(
        _generate_rows,
        features=_TEXT_FEATURES,
        cache_dir=args.cache_dir,
        gen_kwargs={"path": str(path), "data_format": fmt},
        fingerprint=fingerprint,
    )


def _select_text_column(ds: Dataset, column: str, source: str) -> Dataset:
    if column not in ds.column_names:
        raise ValueError(f"{source}: no text column {column!r}; columns are {ds.column_names} (set text_column)")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _wikitext_folder_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, names in _WIKITEXT_SPLIT_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found[split] = folder / name
                break
    return found


def _hub_documents(args: DataArguments) -> DatasetDict:
    name, config = args.dataset_name, args.dataset_config_name
    raw = datasets.load_dataset(name, config, cache_dir=args.cache_dir)
    wikitext = args.data_format == "wikitext" or (args.data_format in ("auto", "hub") and "wikitext" in name.lower())
    out = DatasetDict()
    for hub_split, ds in raw.items():
        split = _SPLIT_ALIASES.get(hub_split, hub_split)
        if wikitext:
            out[split] = Dataset.from_generator(
                _generate_hub_wikitext,
                features=_TEXT_FEATURES,
                cache_dir=args.cache_dir,
                gen_kwargs={"name": name, "config": config, "split": hub_split, "column": args.text_column,
                            "cache_dir": args.cache_dir},
                fingerprint=Hasher.hash([_PIPELINE_VERSION, ds._fingerprint, "wikitext-articles"]),
            )
        else:
            ds = _select_text_column(ds, args.text_column, f"{name}[{split}]")
            out[split] = ds.filter(lambda text: bool(text and text.strip()), input_columns="text",
                                   load_from_cache_file=not args.overwrite_cache)
    return out


def load_documents(args: DataArguments) -> DatasetDict:
    """Documents (column "text") for "train" and "validation"; holds out validation when absent."""
    splits = DatasetDict()
    source = args.train_file or args.dataset_name
    local = None if args.data_format == "hub" else _find_local(source, args.data_dir)
    if local is None and (args.train_file is not None or Path(source).suffix in _FILE_SUFFIXES):
        resolve_data_path(source, args.data_dir)  # raises FileNotFoundError naming the path
    if local is None:
        splits = _hub_documents(args)
    elif local.is_dir():
        files = _wikitext_folder_files(local)
        if "train" in files:
            fmt = "wikitext" if args.data_format == "auto" else args.data_format
            for split in ("train", "validation"):  # the test split is for load_text_for_eval
                if split in files:
                    splits[split] = _local_documents(files[split], fmt, args)
        else:  # any other folder: datasets' folder builders (text/json/csv/parquet by suffix)
            raw = datasets.load_dataset(str(local), cache_dir=args.cache_dir)
            for split, ds in raw.items():
                splits[_SPLIT_ALIASES.get(split, split)] = _select_text_column(ds, args.text_column, str(local))
    else:
        splits["train"] = _local_documents(local, args.data_format, args)
    if "train" not in splits:
        raise FileNotFoundError(
            f"{local or source}: no train split (found {list(splits)}; a WikiText folder needs one of "
            f"{_WIKITEXT_SPLIT_FILES['train']}); large files live outside git: set DPSNR_DATA_DIR"
        )
    if args.validation_file is not None:
        path = resolve_data_path(args.validation_file, args.data_dir)
        splits["validation"] = _local_documents(path, args.data_format, args)
    if "validation" not in splits:
        splits = _hold_out_validation(splits["train"], args, source)
    return DatasetDict(train=splits["train"], validation=splits["validation"])


def held_out_count(num_documents: int, percentage: float, source: str = "the source") -> int:
    """How many documents, taken from the end in file order, a source without a validation split
    holds out: ⌊num_documents × percentage / 100⌋, at least one, and never all of them.

    The one rule for training (`_hold_out_validation`) and evaluation (`dpsnr perplexity --dataset
    tinystories`, eval/common.py): evaluation never scores a story the model trained on.
    """
    n_held = max(1, int(num_documents * percentage / 100))
    if n_held >= num_documents:
        raise ValueError(
            f"{source}: cannot hold out {percentage}% of {num_documents} documents and keep some to train on; "
            "give validation_file or change validation_split_percentage"
        )
    return n_held


def _hold_out_validation(train: Dataset, args: DataArguments, source: str) -> DatasetDict:
    n_val = held_out_count(len(train), args.validation_split_percentage, source)
    # The last documents in file order: deterministic, and the rule eval/ uses for TinyStories.
    parts = {"train": train.select(range(len(train) - n_val)), "test": train.select(range(len(train) - n_val, len(train)))}
    return DatasetDict(train=parts["train"], validation=parts["test"])


# ----------------------------------------------------------------------------- tokens and blocks


def _tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict[str, list]:
    ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [x + [eos_id] for x in ids]}


def _pack_batch(batch: dict[str, list], block_size: int) -> dict[str, list]:
    stream = [t for ids in batch["input_ids"] for t in ids]
    usable = len(stream) // block_size * block_size
    blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of a tokenizer's behaviour (its serialized fast tokenizer + EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return Hasher.hash([state, tokenizer.eos_token_id])


def tokenize_and_pack(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    source: str = "dataset",
    num_proc: Optional[int] = None,
    overwrite_cache: bool = False,
) -> Dataset:
    """Documents → blocks of `block_size` ids (EOS after each document); raises if no block results."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one before packing")
    num_proc = num_proc if num_proc and num_proc > 1 else None
    load = not overwrite_cache
    # Explicit fingerprints: hashing a tokenizer object is slow and not always stable across runs.
    tok_fp = Hasher.hash([_PIPELINE_VERSION, documents._fingerprint, tokenizer_fingerprint(tokenizer)])
    tokens = documents.map(
        _tokenize_batch, batched=True, num_proc=num_proc, remove_columns=documents.column_names,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
        load_from_cache_file=load, new_fingerprint=tok_fp, desc=f"tokenize {source}",
    )
    blocks = tokens.map(
        _pack_batch, batched=True, batch_size=_PACK_BATCH_DOCS, num_proc=num_proc,
        fn_kwargs={"block_size": block_size}, load_from_cache_file=load,
        new_fingerprint=Hasher.hash([tok_fp, "pack", block_size]), desc=f"pack {source}",
    )
    if len(blocks) == 0:
        n_tokens = sum(len(x) for x in tokens["input_ids"])
        raise ValueError(
            f"{source}: {len(documents)} documents gave {n_tokens} tokens (EOS included), "
            f"fewer than one block of block_size={block_size}"
        )
    return blocks


def check_tokenizer_matches_model(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Raise if the tokenizer can emit ids the model's embedding (vocab_size rows) cannot look up."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab_size}: ids >= {vocab_size} would index past the embedding"
        )


def resolve_block_size(
    block_size: Optional[int], tokenizer: PreTrainedTokenizerBase, model_max_positions: Optional[int]
) -> int:
    """The block size to use, checked against the model's context length."""
    if block_size is None:
        block_size = model_max_positions or min(tokenizer.model_max_length, 1024)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if model_max_positions is not None and block_size > model_max_positions:
        raise ValueError(
            f"block_size={block_size} is larger than the model's max_position_embeddings={model_max_positions}"
        )
    return block_size


def build_datasets(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    model_max_positions: Optional[int] = None,
    model_vocab_size: Optional[int] = None,
) -> DatasetDict:
    """Train/validation blocks {input_ids, labels} of exactly `block_size` tokens, ready for Trainer.

    All checks that do not need the data (block size, vocabulary) run before anything is read.
    """
    block_size = resolve_block_size(data_args.block_size, tokenizer, model_max_positions)
    if model_vocab_size is not None:
        check_tokenizer_matches_model(tokenizer, model_vocab_size)
    documents = load_documents(data_args)
    source = data_args.train_file or data_args.dataset_name
    out = DatasetDict()
    for split, docs in documents.items():
        name = data_args.validation_file if split == "validation" and data_args.validation_file else source
        out[split] = tokenize_and_pack(
            docs, tokenizer, block_size, source=f"{name} [{split}]",
            num_proc=data_args.preprocessing_num_workers, overwrite_cache=data_args.overwrite_cache,
        )
    if data_args.max_train_samples is not None:
        out["train"] = out["train"].select(range(min(data_args.max_train_samples, len(out["train"]))))
    if data_args.max_eval_samples is not None:
        out["validation"] = out["validation"].select(range(min(data_args.max_eval_samples, len(out["validation"]))))
    logger.info(
        "data %s: %d train / %d validation blocks of %d tokens",
        source, len(out["train"]), len(out["validation"]), block_size,
    )
    return out


# ----------------------------------------------------------------------------- evaluation text


def load_text_for_eval(
    path_or_name: str,
    split: str = "test",
    config_name: Optional[str] = None,
    *,
    join: str = "file",
    text_column: str = "text",
    data_dir: Optional[str] = None,
) -> str:
    """One split as a single string, for sliding-window perplexity over the whole split.

    `path_or_name`: a file (its text), a WikiText folder (the file of `split`) or a Hub name.
    `join="file"`: the exact file text (Hub WikiText rows are turned back into the file's lines;
    other Hub rows are joined with "\\n"). `join="hf"`: ``"\\n\\n".join(rows)`` with rows = lines
    and blank lines as "", the convention of transformers' perplexity guide (GPT-2 BPE gives
    287,644 tokens on the WikiText-2 raw test split that way).
    """
    if join not in ("file", "hf"):
        raise ValueError(f"join must be 'file' or 'hf', got {join!r}")
    local = _find_local(path_or_name, data_dir)
    if local is None and Path(path_or_name).suffix in _FILE_SUFFIXES:
        resolve_data_path(path_or_name, data_dir)  # raises FileNotFoundError naming the path
    if local is not None:
        if local.is_dir():
            split_key = _SPLIT_ALIASES.get(split, split)
            files = _wikitext_folder_files(local)
            if split_key not in files:
                raise FileNotFoundError(f"{local}: no file for split {split!r} (tried {_WIKITEXT_SPLIT_FILES.get(split_key)})")
            local = files[split_key]
        text = local.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{local} is empty ({len(text)} characters): nothing to evaluate")
        if join == "file":
            return text
        rows = ["" if _is_blank(line) else line for line in text.splitlines(keepends=True)]
        return "\n\n".join(rows)
    rows = datasets.load_dataset(path_or_name, config_name, split=split)[text_column]
    if join == "hf":
        return "\n\n".join(rows)
    if "wikitext" in path_or_name.lower():
        return "".join(row if row.strip() else " \n" for row in rows)
    return "\n".join(rows)

