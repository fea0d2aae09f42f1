"""Strided sliding-window perplexity of any causal LM (DPSN-R or a transformers baseline).

The method of transformers' guide "Perplexity of fixed-length models": windows of `max_length`
tokens start every `stride` tokens; a window scores only the tokens that no earlier window
scored, and everything before them is context. With `stride < max_length` every scored token
sees at least `max_length - stride` tokens of context.

    ids        t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          max_length 4, stride 2
    window 0   [t0 t1 t2 t3]                          targets t1 t2 t3   (t0 has no context)
    window 1         [t2 t3 t4 t5]                    targets t4 t5
    window 2               [t4 t5 t6 t7]              targets t6 t7
    window 3                     [t6 t7 t8 t9]        targets t8 t9      → 9 = n − 1 targets

Position p's logits predict token p + 1, so a target needs one token before it *inside its
window*: targets of a window are ids[max(prev_end, begin + 1) : end]. With `stride < max_length`
that is the guide's `end - prev_end` tokens and exactly n − 1 tokens are scored in all. With
`stride == max_length` (disjoint windows) the first token of every window has no context and is
not scored: n − (number of windows) targets.

    NLL = Σ −log p(target | context) / (number of targets),   PPL = exp(NLL)

computed in float32 from the logits. `outputs.loss` is never used: DPSN-R's loss adds the
ponder cost, and the guide's `loss × (trg_len − 1)` weighting counts one target too few per
window. Bits per byte (NLL summed, in bits, over the UTF-8 bytes of the text) compares models
with different tokenizers; it is reported when the whole text is scored.

CLI (prints one JSON line last):
    dpsnr perplexity --model PATH --dataset wikitext2 --split test \\
        --max-length 512 --stride 256 [--max-tokens N] [--batch-size 4] [--output out.json]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Window:
    """Input ids[begin:end]; scored targets ids[first_target:end] (absolute stream indices)."""

    begin: int
    end: int
    first_target: int

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def sliding_windows(seq_len: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows, each with the targets it alone scores (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {seq_len}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        first = max(prev_end, begin + 1)  # a target needs a context token inside its window
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == seq_len:
            break
    return windows


@dataclass
class ScoredWindow:
    window: Window
    nll: torch.Tensor  # (num_targets,) float32: −log p(ids[j] | ids[begin:j]) for j in the targets
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per predicting position, (num_targets, ...)


@torch.inference_mode()
def iter_scored_windows(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    extras: Sequence[str] = (),
) -> Iterator[ScoredWindow]:
    """Run `model` over the windows of the 1-D stream `ids` and yield each window's target NLLs.

    `extras` names per-position output fields (e.g. DPSN-R's `reasoning_steps`, `active_params`)
    to return for the *predicting* positions: the position before each target, whose output is
    that target's prediction. Windows of equal length share a forward (all but the last).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be one 1-D token stream, got shape {tuple(ids.shape)}")
    device = _model_device(model)
    windows = sliding_windows(int(ids.numel()), max_length, stride)
    batches = _batches(windows, batch_size)
    for i, batch in enumerate(batches):
        inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)  # (b, L)
        out = model(input_ids=inputs, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]  # (b, L, V)
        fields = {}
        for name in extras:
            value = getattr(out, name, None)
            if value is None:
                raise ValueError(f"{type(model).__name__} output has no {name!r}: this evaluation needs a DPSN-R model")
            fields[name] = value
        for b, w in enumerate(batch):
            off = w.first_target - w.begin  # first target's position in the window (≥ 1)
            pred = slice(off - 1, w.end - w.begin - 1)  # the positions whose logits predict the targets
            nll = F.cross_entropy(logits[b, pred].float(), inputs[b, off:], reduction="none")  # (num_targets,)
            yield ScoredWindow(w, nll.cpu(), {k: v[b, pred].cpu() for k, v in fields.items()})
        if (i + 1) % 50 == 0:
            logger.info("scored %d / %d forward batches", i + 1, len(batches))


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])
    return batches


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class PerplexityResult:
    nll_sum: float  # Σ NLL over scored targets, nats
    tokens_scored: int
    windows: int
    tokens: int  # length of the stream

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "nll_sum": self.nll_sum, "tokens_scored": self.tokens_scored,
                "windows": self.windows, "tokens": self.tokens}


def compute_perplexity(
    model: torch.nn.Module, ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 1
) -> PerplexityResult:
    """Sliding-window perplexity of `model` on the stream `ids` (1-D int64)."""
    nll_sum, scored, windows = 0.0, 0, 0
    for sw in iter_scored_windows(model, ids, max_length, stride, batch_size):
        nll_sum += sw.nll.double().sum().item()
        scored += sw.nll.numel()
        windows += 1
    return PerplexityResult(nll_sum=nll_sum, tokens_scored=scored, windows=windows, tokens=int(ids.numel()))


@dataclass
class PerplexityArguments:
    output: Optional[str] = field(default=None, metadata={"help": "Also write the JSON record to this file."})


def main(argv: Optional[list[str]] = None) -> dict:
    from .common import EvalArguments, json_line, prepare_eval, write_json
    from dpsnr.scripting import parse_dataclasses

    args, out_args = parse_dataclasses((EvalArguments, PerplexityArguments), argv)
    model, tokenizer, ids, info, stride = prepare_eval(args)

    start = time.perf_counter()
    result = compute_perplexity(model, ids, args.max_length, stride, args.batch_size)
    seconds = time.perf_counter() - start
    bpb = result.nll_sum / math.log(2) / info["text_bytes"] if info["text_bytes"] else None
    record = {
        **result.as_dict(), "bits_per_byte": bpb,
        "model": args.model, "tokenizer": args.tokenizer or args.model, **info,
        "context": args.max_length, "stride": stride, "batch_size": args.batch_size, "dtype": args.dtype,
        "seconds": seconds, "scored_tokens_per_second": result.tokens_scored / seconds if seconds > 0 else None,
    }
    if out_args.output:
        write_json(out_args.output, record)
    print(json_line(record))
    return record


if __name__ == "__main__":
    from dpsnr.scripting import setup_script_logging

    setup_script_logging()
    main()
