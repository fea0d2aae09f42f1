"""Pool health: how evenly the reasoning loop reads each partition of the parameter pool.

A pool that keeps being read from the same few rows wastes its size: the rest never trains.
Lample et al. (2019, "Large Memory Layers with Product Keys", sec. 4.3) track two numbers:
the fraction of memory rows accessed, and the KL divergence between the access distribution
and the uniform one. Per partition of N rows, over an evaluation text, this module reports:

- % rows read: rows with at least one read / N.
- KL to uniform, in nats, of two distributions: the *count* distribution (reads of row i / all
  reads; PKM's "KL") and the *mass* distribution (softmax weight row i received / total weight).
  KL(p‖U) = Σ p_i log(N p_i) = log N − H(p): 0 for uniform use, log N when one row takes all.
- Gini coefficient of counts and of mass: 0 for equal use, (N − 1)/N when one row takes all.
- Rows holding 50 / 90 / 99 % of the mass: the fewest rows (largest first) whose mass reaches
  that share, as a number and as % of N.

`usage_statistics(counts, mass)` is a pure function of the two (N,) tensors that
`ParameterPool.track_usage()` fills, so training can log it too; this module imports only torch
at module level (matplotlib is loaded when a plot is drawn).

CLI (markdown + PNG Lorenz / rank curves + JSON in --output-dir; one JSON line last):
    python -m eval.pool_health --model PATH --dataset tinystories --split test \\
        --max-length 512 [--stride 512] [--max-tokens N] [--output-dir eval/results]
Windows default to disjoint (stride = max_length) so that every token is processed once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

MASS_LEVELS = (0.5, 0.9, 0.99)
# Slack when comparing cumulative shares with the levels: the pool accumulates mass in float32
# (relative error ~1e-7), so 0.7 + 0.2 of the mass must count as reaching 90 %.
_TOL = 1e-6


def usage_statistics(counts: torch.Tensor, mass: torch.Tensor, levels: tuple[float, ...] = MASS_LEVELS) -> dict:
    """Usage statistics of one partition from per-row read counts and weight mass (both (N,)).

    Distribution statistics are None when their total is 0 (a partition no step read).
    """
    counts, mass = _check_usage(counts, mass)
    n = counts.numel()
    rows_read = int((counts > 0).sum())
    stats = {
        "rows": n,
        "reads": int(counts.sum()),
        "rows_read": rows_read,
        "frac_rows_read": rows_read / n,
        "kl_max": math.log(n),  # KL of a one-row distribution: the scale of the two KL values
        "kl_uniform_counts": kl_to_uniform(counts),
        "kl_uniform_mass": kl_to_uniform(mass),
        "gini_counts": gini(counts),
        "gini_mass": gini(mass),
    }
    for level in levels:
        k = rows_for_share(mass, level)
        key = f"{level * 100:g}"
        stats[f"rows_mass_{key}"] = k
        stats[f"frac_rows_mass_{key}"] = None if k is None else k / n
    return stats


def _check_usage(counts: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts, mass = torch.as_tensor(counts), torch.as_tensor(mass)
    if counts.dim() != 1 or counts.shape != mass.shape or counts.numel() == 0:
        raise ValueError(
            f"counts and mass must be non-empty 1-D tensors of one length, got {tuple(counts.shape)} and {tuple(mass.shape)}"
        )
    counts, mass = counts.detach().cpu().double(), mass.detach().cpu().double()
    if bool((counts < 0).any()) or bool((mass < 0).any()) or not bool(torch.isfinite(mass).all()):
        raise ValueError("counts and mass must be finite and non-negative")
    return counts, mass


def kl_to_uniform(values: torch.Tensor) -> Optional[float]:
    """KL(p ‖ uniform) in nats, p = values / Σ values (0·log 0 = 0); None if Σ values = 0."""
    values = values.double()
    total = values.sum()
    if total <= 0:
        return None
    p = values / total
    nz = p[p > 0]
    return max(0.0, float((nz * torch.log(nz * values.numel())).sum()))


def gini(values: torch.Tensor) -> Optional[float]:
    """Gini coefficient (x sorted ascending, i = 1..n): 2 Σ i·x_i / (n Σ x) − (n + 1) / n."""
    x = values.double().sort().values
    total = x.sum()
    if total <= 0:
        return None
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max(0.0, float(2 * (i * x).sum() / (n * total) - (n + 1) / n))


def rows_for_share(mass: torch.Tensor, share: float) -> Optional[int]:
    """Fewest rows, largest first, whose mass reaches `share` of the total; None if the total is 0."""
    m = mass.double().sort(descending=True).values
    total = m.sum()
    if total <= 0:
        return None
    cum = m.cumsum(0) / total
    return min(m.numel(), int((cum < share - _TOL).sum()) + 1)


def lorenz_curve(values: torch.Tensor, points: int = 512) -> tuple[list[float], list[float]]:
    """(share of rows, share of the total held by them), rows sorted from least to most used."""
    x = values.double().sort().values
    n, total = x.numel(), x.sum()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), x.cumsum(0) / (total if total > 0 else 1.0)])
    idx = torch.linspace(0, n, min(points, n + 1)).round().long()
    return (idx.double() / n).tolist(), cum[idx].tolist()


# ----------------------------------------------------------------------------- model runner


def evaluate_pool_usage(
    model: torch.nn.Module, ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 1
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Run `model` over the windows of `ids` with usage tracking on; (report, raw usage tensors)."""
    from .perplexity import compute_perplexity, sliding_windows

    pool = getattr(model, "pool", None)
    if pool is None or not hasattr(pool, "track_usage"):
        raise ValueError(f"{type(model).__name__} has no parameter pool with track_usage(): pool health needs a DPSN-R model")
    with pool.track_usage() as usage:
        ppl = compute_perplexity(model, ids, max_length, stride, batch_size)
    processed = sum(w.end - w.begin for w in sliding_windows(int(ids.numel()), max_length, stride))
    usage = {name: {k: v.cpu() for k, v in u.items()} for name, u in usage.items()}
    partitions = {}
    for name, u in usage.items():
        stats = usage_statistics(u["counts"], u["mass"])
        stats["reads_per_token"] = stats["reads"] / processed
        partitions[name] = stats
    report = {"partitions": partitions, "tokens_processed": processed, "perplexity": ppl.as_dict()}
    return report, usage


def write_pool_report(report: dict, usage: dict[str, dict[str, torch.Tensor]], out_dir: str | Path, name: str) -> dict[str, Path]:
    """`<name>.md`, `<name>.png` and `<name>.json` in `out_dir`."""
    from .common import markdown_table, new_figure, save_figure, write_json

    out_dir = Path(out_dir)
    levels = [f"{lv * 100:g}" for lv in MASS_LEVELS]
    rows = []
    for part, s in report["partitions"].items():
        mass_cells = [
            None if s[f"rows_mass_{lv}"] is None else f"{s[f'rows_mass_{lv}']:,} ({100 * s[f'frac_rows_mass_{lv}']:.2f} %)"
            for lv in levels
        ]
        rows.append([part, s["rows"], f"{100 * s['frac_rows_read']:.2f} %", s["reads_per_token"],
                     s["kl_uniform_counts"], s["kl_uniform_mass"], s["kl_max"], s["gini_counts"], s["gini_mass"],
                     *mass_cells])
    headers = ["partition", "rows", "rows read", "reads / token", "KL(count‖U)", "KL(mass‖U)", "log N",
               "Gini count", "Gini mass", *[f"rows with {lv} % mass" for lv in levels]]
    md = "\n".join([
        f"# Pool health: {report.get('model', '')}",
        "",
        f"Text: {report.get('text_rule', '')}; {report['tokens_processed']:,} token positions processed "
        f"(windows of {report.get('context')} tokens, stride {report.get('stride')}).",
        "",
        markdown_table(headers, rows),
        "",
        "KL to uniform in nats (log N = the value when one row takes everything); *count* = distribution of reads, "
        "*mass* = distribution of softmax weight. Rows with q % mass: fewest rows, largest first, holding q % of the "
        "weight. Reads / token = reads of the partition per token position (heads × k per step on it).",
        "",
    ])
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["md"].write_text(md, encoding="utf-8")
    write_json(paths["json"], report)

    fig, axes = new_figure(2)
    lorenz, rank = axes[0][0], axes[0][1]
    lorenz.plot([0, 1], [0, 1], color="grey", linestyle=":", label="equal use")
    for part, u in usage.items():
        x, y = lorenz_curve(u["mass"])
        lorenz.plot(x, y, label=f"{part} (Gini {report['partitions'][part]['gini_mass'] or 0:.2f})")
        m = u["mass"].double().sort(descending=True).values
        if m.sum() > 0:
            share = (m / m.sum()).numpy()
            ranks = torch.arange(1, m.numel() + 1).numpy()
            keep = share > 0
            rank.loglog(ranks[keep], share[keep], label=part)
    lorenz.set(xlabel="share of rows (least used first)", ylabel="share of weight mass", title="Lorenz curves")
    rank.set(xlabel="row rank by mass", ylabel="share of weight mass", title="Sorted usage")
    lorenz.legend(fontsize=8)
    rank.legend(fontsize=8)
    save_figure(fig, paths["png"])
    return paths


def main(argv: Optional[list[str]] = None) -> dict:
    from .common import EvalArguments, ReportArguments, json_line, parse_cli, prepare_eval

    args, out = parse_cli((EvalArguments, ReportArguments), argv)
    # disjoint windows by default, so each token's reads are counted once
    model, tokenizer, ids, info, stride = prepare_eval(args, default_stride_fraction=1.0)
    report, usage = evaluate_pool_usage(model, ids, args.max_length, stride, args.batch_size)
    report.update(model=args.model, context=args.max_length, stride=stride, **info)
    paths = write_pool_report(report, usage, out.output_dir, out.name or "pool_health")
    summary = {"model": args.model, "dataset": args.dataset, "files": [str(p) for p in paths.values()],
               **{f"{p}/{k}": s[k] for p, s in report["partitions"].items()
                  for k in ("frac_rows_read", "kl_uniform_counts", "kl_uniform_mass", "gini_mass")}}
    print(json_line(summary))
    return report


if __name__ == "__main__":
    from .common import setup_script_logging

    setup_script_logging()
    main()
