"""What every evaluation script shares: its arguments, the model and tokenizer, the token stream,
and writing JSON / markdown / PNG results.

Evaluation text (`load_eval_ids`), one token stream per (dataset, split):

| `--dataset`      | source (relative to the data folder)              | text → tokens                          |
|------------------|---------------------------------------------------|----------------------------------------|
| `wikitext2`      | `wikitext-2/` (`wiki.<split>.tokens` or `<split>.txt`) | the file verbatim, one string     |
| `wikitext2-raw`  | `wikitext-2-raw/wiki.<split>.raw`                 | HF join (below), one string            |
| `wikitext103`    | `wikitext-103/wiki.<split>.tokens`                | the file verbatim, one string          |
| `tinystories`    | `tinystories/TinyStories-train.head-2316.txt`     | held-out stories, EOS after each       |
| a file / folder  | that path                                         | the file verbatim, one string          |
| a `datasets` name| `load_dataset(name, --dataset-config, split)`     | HF join of the rows                    |

- "HF join" is ``"\\n\\n".join(rows)`` with rows = the file's lines, a blank line as "" (the
  rows of the Hub `wikitext` datasets), as in transformers' "Perplexity of fixed-length models"
  guide; GPT-2's tokenizer gives 287,644 tokens on the WikiText-2 raw test split that way.
- TinyStories held-out rule: the file's stories (split on ``<|endoftext|>``, stripped) in file
  order; the *last* `validation_split_percentage` (5 %, at least one story) are
  "validation"/"test", the rest "train": `training.data.held_out_count`, the rule training holds
  out its validation documents by, so evaluation never scores a story the model trained on. Each story is tokenized on its own and followed by the tokenizer's EOS id, the
  document convention of `training/data.py`.
- Text is tokenized without special tokens (no BOS), as the guide does with GPT-2.
Reading goes through `training.data.load_text_for_eval` / `read_documents`, so evaluation and
training agree on paths (working directory, then ``$DPSNR_DATA_DIR`` or ``../shared/data``,
then the repository's ``data/``) and on file layouts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from dpsnr.training.data import (
    check_tokenizer_matches_model, held_out_count, iter_tinystories, load_text_for_eval, resolve_data_path,
)

logger = logging.get_logger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINYSTORIES_FILE = "tinystories/TinyStories-train.head-2316.txt"
# keyword → (default path relative to the data folder, text rule); see the module docstring.
DATASETS: dict[str, tuple[str, str]] = {
    "wikitext2": ("wikitext-2", "file"),
    "wikitext2-raw": ("wikitext-2-raw", "hf"),
    "wikitext103": ("wikitext-103", "file"),
    "tinystories": (TINYSTORIES_FILE, "stories"),
}
SPLITS_HELD_OUT = ("test", "validation", "valid")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalArguments:
    """Which model reads which text, and how the text is cut into windows."""

    model: Optional[str] = field(default=None, metadata={"help": "Model folder or Hub id (required)."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer folder or Hub id (default: --model)."})
    dataset: str = field(
        default="wikitext2",
        metadata={"help": f"One of {', '.join(DATASETS)}, a text file / WikiText folder, or a `datasets` name."},
    )
    split: str = field(default="test", metadata={"help": "train / validation / test."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "`datasets` config name (Hub data)."})
    data_file: Optional[str] = field(default=None, metadata={"help": "Another file/folder for a keyword --dataset."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder for relative data paths."})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "TinyStories: percent of the stories held out at the end of the file, as training holds them out."})
    max_length: int = field(default=512, metadata={"help": "Tokens per window (the context)."})
    stride: Optional[int] = field(
        default=None, metadata={"help": "Window step; default max_length // 2 (pool_health: max_length)."}
    )
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N tokens."})
    batch_size: int = field(default=1, metadata={"help": "Windows per forward."})
    device: Optional[str] = field(default=None, metadata={"help": "Default: cuda if available, else cpu."})
    dtype: str = field(default="float32", metadata={"help": f"One of {', '.join(DTYPES)} (NLL is always fp32)."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a model folder or Hub id")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2 (one context + one target), got {self.max_length}")
        if self.stride is not None and not 1 <= self.stride <= self.max_length:
            raise ValueError(f"--stride must be in [1, max_length={self.max_length}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.validation_split_percentage < 100.0:
            raise ValueError(f"--validation-split-percentage must be in (0, 100), got {self.validation_split_percentage}")


@dataclass
class ReportArguments:
    """Where the analytics scripts write `<name>.md`, `<name>.png` and `<name>.json`."""

    output_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "Folder for the .md, .png and .json files."})
    name: Optional[str] = field(default=None, metadata={"help": "Base name of the files (default: the script's)."})


# ----------------------------------------------------------------------------- model and tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str, device: Optional[str] = None, dtype: str = "float32") -> torch.nn.Module:
    """Any causal LM folder or Hub id, in eval mode. Importing `modeling_dpsnr` first registers the
    DPSN-R Auto classes, so an installed package wins over the checkpoint's copy of the code."""
    import modeling_dpsnr  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=DTYPES[dtype])
    return model.to(device or default_device()).eval()


def load_tokenizer(path: str, model_path: Optional[str] = None) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as err:
        hint = " (the model folder has no tokenizer: pass --tokenizer)" if path == model_path else ""
        raise ValueError(f"cannot load a tokenizer from {path!r}{hint}: {err}") from err


def check_context(model: torch.nn.Module, max_length: int) -> None:
    """Reject windows longer than the model's positions before any forward runs."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_position_embeddings ({limit})")


# ----------------------------------------------------------------------------- text → token ids


def eval_documents(args: EvalArguments) -> tuple[list[str], str, str]:
    """(documents, separator "eos" | "none", rule in words) for the dataset of `args`."""
    if args.dataset in DATASETS:
        default_path, rule = DATASETS[args.dataset]
        path = args.data_file or default_path
        if rule == "stories":
            stories = list(iter_tinystories(resolve_data_path(path, args.data_dir).read_text(encoding="utf-8").splitlines(True)))
            n_held = held_out_count(len(stories), args.validation_split_percentage, str(path))
            if args.split in SPLITS_HELD_OUT:
                docs, which = stories[-n_held:], f"last {n_held}"
            elif args.split == "train":
                docs, which = stories[:-n_held], f"first {len(stories) - n_held}"
            else:
                raise ValueError(f"split {args.split!r}: TinyStories has train / validation / test (held out)")
            return docs, "eos", (
                f"{which} of {len(stories)} stories of {path} (held out: the last {args.validation_split_percentage:g}%); "
                "each tokenized alone and followed by EOS"
            )
        text = load_text_for_eval(path, args.split, join=rule, data_dir=args.data_dir)
        how = "the file verbatim" if rule == "file" else '"\\n\\n".join(lines, blank line = "")'
        return [text], "none", f"{path} split {args.split}: {how}"
    try:
        resolve_data_path(args.dataset, args.data_dir)
        join, how = "file", "the file verbatim"
    except FileNotFoundError:
        join, how = "hf", '"\\n\\n".join(rows)'
    text = load_text_for_eval(args.dataset, args.split, args.dataset_config, join=join, data_dir=args.data_dir)
    return [text], "none", f"{args.dataset} split {args.split}: {how}"


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: list[str], separator: str) -> torch.Tensor:
    """One (n,) int64 stream: the documents' ids, with EOS after each when separator == "eos"."""
    ids = tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if separator == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.long)


def load_eval_ids(args: EvalArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, dict]:
    """The token stream to evaluate and a description of it (for the JSON record)."""
    documents, separator, rule = eval_documents(args)
    ids = tokenize_documents(tokenizer, documents, separator)
    total = int(ids.numel())
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"{args.dataset} gives {ids.numel()} tokens: nothing to score")
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    info = {
        "dataset": args.dataset, "split": args.split, "text_rule": rule,
        "dataset_tokens": total,
        # Bytes of the whole text: bits per byte is reported only when the whole text is scored.
        "text_bytes": text_bytes if ids.numel() == total else None,
    }
    return ids, info


# ----------------------------------------------------------------------------- writing results


def git_revision(root: str | os.PathLike | None = None) -> dict:
    """{"commit": HEAD's hash, "dirty": tracked files modified} of the checkout at `root` (default: this
    repository), None each where git or the checkout is missing (an installed wheel). Every saved
    result records where its figures came from."""
    import subprocess

    where = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def json_safe(value: Any) -> Any:
    """NaN / inf → None and tensors → lists, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def json_line(record: dict) -> str:
    return json.dumps(json_safe(record), allow_nan=False)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(ncols: int, width: float = 5.0, height: float = 4.0):
    """A matplotlib figure on the Agg backend (no display); imported here so library modules need no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)


def save_figure(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prepare_eval(args: "EvalArguments", default_stride_fraction: float = 0.5):
    """Load and check what every eval script needs: (model, tokenizer, ids, info, stride).

    Stride defaults to `default_stride_fraction` × max_length; the context and the vocabulary are
    checked against the model before any text is read.
    """
    stride = args.stride or max(1, int(args.max_length * default_stride_fraction))
    model = load_model(args.model, args.device, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model, args.model)
    check_context(model, args.max_length)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        check_tokenizer_matches_model(tokenizer, vocab)
    ids, info = load_eval_ids(args, tokenizer)
    return model, tokenizer, ids, info, stride
