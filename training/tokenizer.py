"""Tokenizers for DPSN-R: the shipped GPT-2 BPE, and byte-level BPE training for small vocabularies.

The `tiny` preset uses GPT-2's 50,257-token vocabulary (the same one TinyStories models use);
the `micro` preset uses a small BPE trained here, because at d=256 a 50k-row embedding would
hold most of the controller's parameters.

Trained tokenizers follow GPT-2's byte-level scheme (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners", sec. 2.2): every byte is in the base alphabet, so nothing is
ever unknown and decode(encode(text)) == text for any string. `<|endoftext|>` is the only
special token and gets id 0 (the `tokenizers` trainer puts special tokens first; GPT-2 has it
last, at 50256). It serves as eos, bos, unk and pad, as in GPT-2.

CLI:  dpsnr tokenizer --files a.txt b.txt --vocab-size 4096 --output-dir out/
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging

from dpsnr.scripting import parse_dataclasses

logger = logging.get_logger(__name__)

EOS_TOKEN = "<|endoftext|>"
GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer_files" / "gpt2"


def load_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from the package folder (no network): 50,257 tokens, EOS = pad = 50256."""
    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER_DIR))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):  # guards a future change of AutoTokenizer
        raise TypeError(f"{GPT2_TOKENIZER_DIR} loaded as {type(tokenizer).__name__}, not a fast tokenizer")
    return tokenizer


def _training_text(paths: Sequence[Path]) -> Iterator[str]:
    # The separator is a special token, not text: drop it so no merges are spent on "<|", "endoftext".
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield from (piece for piece in line.split(EOS_TOKEN) if piece)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Cleaning spaces before punctuation is lossy for byte-level BPE (" ," → ","); keep text exact.
        clean_up_tokenization_spaces=False,
    )


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    output_dir: Optional[str | os.PathLike] = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `files` and (if `output_dir`) save it for `AutoTokenizer.from_pretrained`.

    `vocab_size` counts everything: `<|endoftext|>` (id 0), the 256 byte symbols and the merges.
    A corpus too small to supply enough merges of `min_frequency` gives a smaller vocabulary
    (logged as a warning); `len(tokenizer)` is the size to give the model.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("train_bpe_tokenizer needs at least one file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"tokenizer training file is empty: {path}")
    n_base = 1 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= n_base:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {n_base} base tokens (256 bytes + {EOS_TOKEN})")

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word of a text is encoded as written, as in GPT-2.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(paths), trainer)
    if backend.get_vocab_size() < vocab_size:
        logger.warning(
            "BPE vocabulary has %d tokens, fewer than the %d requested: the corpus has no more "
            "pairs seen >= %d times", backend.get_vocab_size(), vocab_size, min_frequency,
        )
    tokenizer = _wrap(backend)
    if output_dir is not None:
        tokenizer.save_pretrained(str(output_dir))
    return tokenizer


@dataclass
class TokenizerArguments:
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it for AutoTokenizer."""

    files: list[str] = field(metadata={"help": "UTF-8 text files to train on."})
    vocab_size: int = field(metadata={"help": "Total size incl. 256 bytes and <|endoftext|>."})
    output_dir: str = field(metadata={"help": "Folder for tokenizer.json + tokenizer_config.json."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count for a merge."})


def main(argv: Optional[Sequence[str]] = None) -> None:
    (args,) = parse_dataclasses((TokenizerArguments,), None if argv is None else list(argv),
                                description=TokenizerArguments.__doc__)
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(args.files, args.vocab_size, args.output_dir, args.min_frequency)
    print(json.dumps({
        "output_dir": str(args.output_dir),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seconds": round(time.perf_counter() - start, 2),
    }))


if __name__ == "__main__":
    main()
