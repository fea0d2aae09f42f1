"""The halting curve of a model with trained exits: held-out perplexity against mean steps as the
exit threshold moves.

A model trained with `loop_halting="exits"` (halting.TrainedExits) has an exit distribution per
token; at inference the token stops where its CDF reaches q (`loop_exit_threshold`). One trained
model therefore gives a whole curve of operating points, from early exits (small q) to every step
(q near 1). For each q this scores the same sliding windows as `dpsnr perplexity` and reports the
perplexity and the mean steps of the positions that predicted the scored tokens, and plots
perplexity against mean steps (with the steps histogram per q). With `--decode-new-tokens N` it also
times greedy decoding at each q (thresholds alternated, median of rounds). Time follows steps: each q's
forward time (eager driver: halted tokens cost nothing more) against the deepest q's, beside the
cost model's FLOPs ratio (`DPSNRForCausalLM.estimate_flops` at the mean steps, half the window as
context) — run thresholds one after another on an otherwise idle machine for that ratio to mean much.

    dpsnr exit-curve --model runs/micro-tinystories-exits --dataset tinystories --split validation \\
        --max-length 256 --stride 128 --thresholds 0.2 0.35 0.5 0.65 0.8 0.95 [--output-dir eval/results]
Writes <output-dir>/<name>.json and .png; prints one JSON line last.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ExitCurveArguments:
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5, 0.65, 0.8, 0.95],
                                    metadata={"help": "Exit thresholds q to evaluate, each in (0, 1)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Write <name>.json and <name>.png here."})
    name: str = field(default="exit_curve", metadata={"help": "File name stem of the outputs."})
    decode_new_tokens: int = field(default=0, metadata={
        "help": "Also time greedy decoding (batch 1, KV cache) of this many tokens per prompt at each q; 0: off."})
    decode_prompts: int = field(default=2, metadata={"help": "Prompts for the decoding timing (32-token openings of the text)."})
    decode_repeats: int = field(default=3, metadata={"help": "Timing rounds, thresholds alternated in each; the median is kept."})

    def __post_init__(self) -> None:
        bad = [q for q in self.thresholds if not 0.0 < q < 1.0]
        if not self.thresholds or bad:
            raise ValueError(f"--thresholds must be numbers in (0, 1), got {self.thresholds}")
        if self.decode_new_tokens < 0 or self.decode_prompts < 1 or self.decode_repeats < 1:
            raise ValueError("--decode-new-tokens must be ≥ 0 and --decode-prompts, --decode-repeats ≥ 1")


def exit_policy(model):
    """The model's TrainedExits policy; a clear error for any other model."""
    from modeling_dpsnr.halting import TrainedExits

    policy = getattr(getattr(getattr(model, "model", None), "loop", None), "policy", None)
    if not isinstance(policy, TrainedExits):
        halting = getattr(getattr(model, "config", None), "loop_halting", None)
        raise ValueError(f"the exit curve needs a DPSN-R model trained with loop_halting='exits', got "
                         f"{type(model).__name__} with loop_halting={halting!r}")
    return policy


@contextmanager
def stopping_at(model, q: float):
    """The model's trained exits stop at exit threshold `q` inside the block; the saved one after it."""
    policy = exit_policy(model)
    original, policy.threshold = policy.threshold, float(q)
    try:
        yield policy
    finally:
        policy.threshold = original


def exit_curve(model, ids: torch.Tensor, max_length: int, stride: int, thresholds: list[float],
               batch_size: int = 1) -> list[dict]:
    """Per threshold q: perplexity, mean steps and the steps histogram over the scored targets."""
    from .perplexity import iter_scored_windows

    max_steps = model.config.loop_max_steps
    rows = []
    for q in thresholds:
        nll_sum, scored, steps = 0.0, 0, []
        start = time.perf_counter()
        with stopping_at(model, q), torch.no_grad():
            for sw in iter_scored_windows(model, ids, max_length, stride, batch_size, extras=("reasoning_steps",)):
                nll_sum += sw.nll.double().sum().item()
                scored += sw.nll.numel()
                steps.append(sw.extras["reasoning_steps"].long())
        seconds = time.perf_counter() - start
        steps = torch.cat(steps)
        hist = torch.bincount(steps, minlength=max_steps + 1)[1:max_steps + 1]
        mean_steps = steps.double().mean().item()
        rows.append({"threshold": float(q), "ppl": math.exp(nll_sum / scored), "nll": nll_sum / scored,
                     "mean_steps": mean_steps, "tokens_scored": scored,
                     "steps_histogram": {str(s + 1): int(n) for s, n in enumerate(hist)},
                     "flops_per_token": model.estimate_flops(mean_steps, max_length / 2), "seconds": seconds})
    # Time follows steps: each threshold's forward speed against the deepest one's, and the cost model's ratio.
    deepest = max(rows, key=lambda r: (r["mean_steps"], r["seconds"]))
    for r in rows:
        r["speedup_vs_deepest"] = deepest["seconds"] / r["seconds"]
        r["cost_model_speedup"] = deepest["flops_per_token"] / r["flops_per_token"]
    return rows


@torch.no_grad()
def decode_speeds(model, ids: torch.Tensor, thresholds: list[float], new_tokens: int, prompts: int = 2,
                  repeats: int = 3, prompt_len: int = 32) -> dict[float, dict]:
    """Greedy decoding tokens/s (batch 1, KV cache, prefill included) and mean steps of the generated
    tokens at each q; thresholds alternate within each round so a slow spell of a shared machine lands on
    all of them, and each q keeps its median round."""
    import statistics

    from .perplexity import _model_device

    starts = torch.linspace(0, max(0, ids.numel() - prompt_len - 1), prompts).long().tolist()
    batch = [ids[s:s + prompt_len].view(1, -1).to(_model_device(model)) for s in starts]
    times: dict[float, list[float]] = {q: [] for q in thresholds}
    steps: dict[float, float] = {}
    with stopping_at(model, thresholds[0]):
        model.generate(batch[0], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    for _ in range(repeats):
        for q in thresholds:
            start, used = time.perf_counter(), []
            with stopping_at(model, q):
                for prompt in batch:
                    _, stats = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, return_reasoning_stats=True)
                    used.append(stats["avg_loops"])
            times[q].append(time.perf_counter() - start)
            steps[q] = sum(used) / len(used)
    tokens = prompts * new_tokens
    return {q: {"decode_tokens_per_second": tokens / statistics.median(times[q]), "decode_mean_steps": steps[q]}
            for q in thresholds}


def plot_curve(rows: list[dict], path, title: str) -> None:
    from .common import new_figure, save_figure

    fig, axes = new_figure(2, width=4.5)
    curve, hist = axes[0]
    curve.plot([r["mean_steps"] for r in rows], [r["ppl"] for r in rows], marker="o")
    for r in rows:
        curve.annotate(f"q={r['threshold']:g}", (r["mean_steps"], r["ppl"]), fontsize=7)
    curve.set(xlabel="mean reasoning steps", ylabel="held-out perplexity", title=title)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [int(s) + (i - len(rows) / 2) * width for s in r["steps_histogram"]]
        total = max(1, r["tokens_scored"])
        hist.bar(xs, [n / total for n in r["steps_histogram"].values()], width=width, label=f"q={r['threshold']:g}")
    hist.set(xlabel="reasoning steps", ylabel="share of tokens", title="Steps per token")
    hist.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict:
    from pathlib import Path

    from dpsnr.scripting import parse_dataclasses

    from .common import EvalArguments, json_line, prepare_eval, write_json

    args, curve_args = parse_dataclasses((EvalArguments, ExitCurveArguments), argv)
    model, _, ids, info, stride = prepare_eval(args)
    exit_policy(model)
    rows = exit_curve(model, ids, args.max_length, stride, curve_args.thresholds, args.batch_size)
    if curve_args.decode_new_tokens:
        speeds = decode_speeds(model, ids, curve_args.thresholds, curve_args.decode_new_tokens,
                               curve_args.decode_prompts, curve_args.decode_repeats)
        deepest = max(rows, key=lambda r: r["mean_steps"])["threshold"]
        for r in rows:
            r.update(speeds[r["threshold"]])
            r["decode_speedup_vs_deepest"] = r["decode_tokens_per_second"] / speeds[deepest]["decode_tokens_per_second"]
    record = {"model": args.model, **info, "context": args.max_length, "stride": stride,
              "loop_max_steps": model.config.loop_max_steps, "trained_threshold": model.config.loop_exit_threshold,
              "curve": rows}
    if curve_args.output_dir:
        out = Path(curve_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{curve_args.name}.json", record)
        plot_curve(rows, out / f"{curve_args.name}.png", f"Trained exits: {Path(args.model).name}")
    print(json_line(record))
    return record


if __name__ == "__main__":
    from dpsnr.scripting import setup_script_logging

    setup_script_logging()
    main()
