"""Dynamic-compute analytics: how many reasoning steps (and active parameters) DPSN-R spends per
token, by kind of token, and whether it spends more where prediction is harder.

Alignment. The loop at position t reads the context up to token t and its output predicts token
t + 1. Every record pairs position t's `reasoning_steps` / `active_params` with the NLL of target
t + 1, for each target scored by the sliding windows of `eval.perplexity` (each target once, with
at least `max_length − stride` tokens of context).

Token classes (rule stated in every report):
- trivial: the token's text, stripped, is empty (whitespace), made only of Unicode punctuation
  or symbol characters (categories P*, S*; U+FFFD byte fragments excepted), is a special token
  (EOS, ...), or, lower-cased, is one of `FUNCTION_WORDS` (English function words, below).
- medium / complex: the other ("content") tokens, split by frequency in the evaluated stream.
  f(id) = occurrences of that token id in the evaluated token ids; m = median of f over all
  content-token *occurrences* (linear interpolation for an even count). medium if f > m,
  complex if f ≤ m: frequent content tokens versus rare ones.
Tables are given both by the class of the token *at* position t (the token whose loop ran) and
by the class of the *target* t + 1 (the token the loop's output predicts).

Also: the histogram of steps (1 .. loop_max_steps) and the Pearson and Spearman correlations
(Spearman = Pearson of average ranks, ties shared) between steps at t and the NLL of t + 1.

CLI (markdown + PNG + JSON in --output-dir; one JSON line last):
    dpsnr analytics --model PATH --dataset tinystories --split test \\
        --max-length 512 --stride 256 [--max-tokens N] [--output-dir eval/results]
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CLASSES = ("trivial", "medium", "complex")
TRIVIAL, MEDIUM, COMPLEX = range(3)

# English function words: articles and determiners, pronouns, prepositions, conjunctions,
# auxiliary and modal verbs, particles and a few grammatical adverbs.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each either neither all both half such what which whose
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one who whom whoever whatever whichever
of in on at to for from by with without about above below over under into onto upon out off up down
through across along around among between before after during until till since within toward towards
against beyond behind beside besides near via per than like unlike despite except amid
and or but nor so yet if then else because although though while whereas unless whether as once
be am is are was were been being have has had having do does did doing done
will would shall should can could may might must ought
not n't 's 're 've 'd 'll 'm s t d ll re ve m
there here where when why how very too also just only even still
""".split())

CLASS_RULE = (
    "trivial = whitespace, punctuation/symbol-only (Unicode P*, S*), special tokens, or one of "
    f"{len(FUNCTION_WORDS)} English function words (eval/reasoning_analytics.py FUNCTION_WORDS); "
    "medium = other tokens whose frequency in the evaluated stream is above the median frequency of "
    "content-token occurrences (m); complex = at or below m"
)


def is_trivial_text(text: str) -> bool:
    """Whitespace, punctuation/symbols only, or a function word (see the module docstring)."""
    s = text.strip()
    if not s:
        return True
    if all(unicodedata.category(c)[0] in "PS" and c != "\ufffd" for c in s):
        return True
    return s.lower() in FUNCTION_WORDS


def classify_tokens(
    ids: torch.Tensor, token_text: Callable[[int], str], special_ids: Iterable[int] = ()
) -> tuple[torch.Tensor, dict]:
    """Class (TRIVIAL / MEDIUM / COMPLEX) of every token of the stream `ids` (1-D), and the rule's numbers."""
    uniq, inverse, freq = torch.unique(ids, return_inverse=True, return_counts=True)
    special = set(int(i) for i in special_ids)
    trivial_type = torch.tensor([int(i) in special or is_trivial_text(token_text(int(i))) for i in uniq.tolist()],
                                dtype=torch.bool)
    trivial = trivial_type[inverse]  # (n,)
    occ_freq = freq[inverse]  # (n,) frequency of each occurrence's token id
    content_freq = occ_freq[~trivial].double()
    median = float(torch.quantile(content_freq, 0.5)) if content_freq.numel() else float("nan")
    classes = torch.full_like(ids, COMPLEX)
    classes[occ_freq.double() > median] = MEDIUM
    classes[trivial] = TRIVIAL
    info = {"rule": CLASS_RULE, "median_content_frequency": median,
            "types": int(uniq.numel()), "trivial_types": int(trivial_type.sum())}
    return classes, info


def tokenizer_text(tokenizer) -> Callable[[int], str]:
    return lambda i: tokenizer.decode([i], clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- statistics


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Pearson r; None when fewer than 2 values or either side is constant (r undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else None


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    return pearson(average_ranks(np.asarray(x)), average_ranks(np.asarray(y)))


def _class_table(classes: torch.Tensor, steps: torch.Tensor, active: torch.Tensor, nll: torch.Tensor) -> list[dict]:
    rows = []
    n = classes.numel()
    for c, name in enumerate(CLASSES):
        m = classes == c
        k = int(m.sum())
        rows.append({
            "class": name, "tokens": k, "share": k / n if n else None,
            "mean_steps": steps[m].double().mean().item() if k else None,
            "mean_active_params": active[m].double().mean().item() if k else None,
            "mean_nll": nll[m].double().mean().item() if k else None,
        })
    rows.append({"class": "all", "tokens": n, "share": 1.0, "mean_steps": steps.double().mean().item(),
                 "mean_active_params": active.double().mean().item(), "mean_nll": nll.double().mean().item()})
    return rows


def summarize(
    ids: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor, active: torch.Tensor, nll: torch.Tensor,
    classes: torch.Tensor, max_steps: int,
) -> dict:
    """Tables by class, steps histogram and steps–loss correlations from per-position records.

    positions (m,): predicting positions t; steps / active (m,) at t; nll (m,) of target t + 1;
    classes (n,) for the whole stream `ids`.
    """
    hist = torch.bincount(steps.long(), minlength=max_steps + 1)[1 : max_steps + 1]
    mean_nll_by_steps = [nll[steps == s].double().mean().item() if hist[s - 1] > 0 else None
                         for s in range(1, max_steps + 1)]
    x, y = steps.double().numpy(), nll.double().numpy()
    return {
        "records": int(positions.numel()),
        "by_input_token": _class_table(classes[positions], steps, active, nll),
        "by_target_token": _class_table(classes[positions + 1], steps, active, nll),
        "steps_histogram": {str(s): int(hist[s - 1]) for s in range(1, max_steps + 1)},
        "mean_nll_by_steps": {str(s): v for s, v in zip(range(1, max_steps + 1), mean_nll_by_steps)},
        "correlation_steps_nll": {
            "pairs": "reasoning_steps at position t vs NLL of target token t+1",
            "pearson": pearson(x, y), "spearman": spearman(x, y), "n": len(x),
        },
    }


# ----------------------------------------------------------------------------- model runner


def collect_records(
    model: torch.nn.Module, ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Per scored target j: predicting position t = j − 1, steps and active params at t, NLL of j."""
    from .perplexity import iter_scored_windows

    pos, steps, active, nll = [], [], [], []
    for sw in iter_scored_windows(model, ids, max_length, stride, batch_size, extras=("reasoning_steps", "active_params")):
        w = sw.window
        pos.append(torch.arange(w.first_target - 1, w.end - 1))
        steps.append(sw.extras["reasoning_steps"].long())
        active.append(sw.extras["active_params"].long())
        nll.append(sw.nll)
    return {"positions": torch.cat(pos), "steps": torch.cat(steps), "active": torch.cat(active), "nll": torch.cat(nll)}


def reasoning_analytics(
    model: torch.nn.Module, tokenizer, ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 1
) -> dict:
    """Run the model over `ids` and summarise its per-token compute (see the module docstring)."""
    max_steps = getattr(getattr(model, "config", None), "loop_max_steps", None)
    if max_steps is None:
        raise ValueError(f"{type(model).__name__} has no config.loop_max_steps: reasoning analytics needs a DPSN-R model")
    rec = collect_records(model, ids, max_length, stride, batch_size)
    classes, rule = classify_tokens(ids, tokenizer_text(tokenizer), tokenizer.all_special_ids)
    summary = summarize(ids, rec["positions"], rec["steps"], rec["active"], rec["nll"], classes, max_steps)
    return {"classes": rule, "loop_max_steps": max_steps, **summary}


def write_analytics_report(report: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    """`<name>.md`, `<name>.png` and `<name>.json` in `out_dir`."""
    from .common import markdown_table, new_figure, save_figure, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = ["class", "tokens", "share", "mean steps", "mean active params", "mean NLL of target"]

    def table(rows: list[dict]) -> str:
        return markdown_table(headers, [[r["class"], r["tokens"], r["share"], r["mean_steps"],
                                         None if r["mean_active_params"] is None else int(round(r["mean_active_params"])),
                                         r["mean_nll"]] for r in rows])

    corr = report["correlation_steps_nll"]
    hist = report["steps_histogram"]
    md = "\n".join([
        f"# Reasoning analytics: {report.get('model', '')}",
        "",
        f"Text: {report.get('text_rule', '')}; {report['records']:,} scored tokens "
        f"(windows of {report.get('context')} tokens, stride {report.get('stride')}). "
        "Position t's steps and active parameters are paired with the NLL of target t+1 (the token its output predicts).",
        "",
        "## By the token at position t (the token whose loop ran)",
        "",
        table(report["by_input_token"]),
        "",
        "## By the predicted token t+1",
        "",
        table(report["by_target_token"]),
        "",
        "## Steps",
        "",
        markdown_table(["steps", *hist], [["tokens", *hist.values()],
                                          ["mean NLL of t+1", *report["mean_nll_by_steps"].values()]]),
        "",
        f"Correlation of steps at t with NLL of t+1 over {corr['n']:,} tokens: Pearson "
        f"{_fmt(corr['pearson'])}, Spearman {_fmt(corr['spearman'])} (— : undefined, e.g. every token ran the same steps).",
        "",
        f"Classes: {report['classes']['rule']}; here m = {_fmt(report['classes']['median_content_frequency'])}.",
        "",
    ])
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    paths["md"].write_text(md, encoding="utf-8")
    write_json(paths["json"], report)

    fig, axes = new_figure(3, width=4.5)
    bars, histo, loss = axes[0]
    x = np.arange(len(CLASSES))
    for offset, key, label in ((-0.2, "by_input_token", "token at t"), (0.2, "by_target_token", "target t+1")):
        vals = [r["mean_steps"] or 0.0 for r in report[key][: len(CLASSES)]]
        bars.bar(x + offset, vals, width=0.4, label=label)
    bars.set(xticks=x, xticklabels=CLASSES, ylabel="mean reasoning steps", title="Steps by token class")
    bars.legend(fontsize=8)
    steps_axis = [int(s) for s in hist]
    histo.bar(steps_axis, list(hist.values()))
    histo.set(xlabel="reasoning steps", ylabel="tokens", title="Steps histogram", xticks=steps_axis)
    nll_vals = [v if v is not None else float("nan") for v in report["mean_nll_by_steps"].values()]
    loss.plot(steps_axis, nll_vals, marker="o")
    loss.set(xlabel="reasoning steps at t", ylabel="mean NLL of t+1", xticks=steps_axis,
             title=f"Loss vs steps (Spearman {_fmt(corr['spearman'])})")
    save_figure(fig, paths["png"])
    return paths


def _fmt(v: Optional[float]) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def main(argv: Optional[list[str]] = None) -> dict:
    from .common import EvalArguments, ReportArguments, json_line, prepare_eval
    from dpsnr.scripting import parse_dataclasses

    args, out = parse_dataclasses((EvalArguments, ReportArguments), argv)
    model, tokenizer, ids, info, stride = prepare_eval(args)
    report = reasoning_analytics(model, tokenizer, ids, args.max_length, stride, args.batch_size)
    report.update(model=args.model, context=args.max_length, stride=stride, **info)
    paths = write_analytics_report(report, out.output_dir, out.name or "reasoning_analytics")
    by_class = {r["class"]: r["mean_steps"] for r in report["by_input_token"]}
    print(json_line({"model": args.model, "dataset": args.dataset, "files": [str(p) for p in paths.values()],
                     "mean_steps": by_class, **{k: report["correlation_steps_nll"][k] for k in ("pearson", "spearman")}}))
    return report


if __name__ == "__main__":
    from dpsnr.scripting import setup_script_logging

    setup_script_logging()
    main()
