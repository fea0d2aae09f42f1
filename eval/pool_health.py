"""Pool health: how evenly the reasoning loop reads each partition of the parameter pool.

The statistics (% rows read, KL to uniform of counts and of mass, Gini, rows holding 50 / 90 / 99 %
of the mass; Lample et al. 2019, sec. 4.3) are defined in `dpsnr.training.pool_usage`, which the
trainer's logging shares; this module runs a model over an evaluation text with usage tracking on
and writes the report.

CLI (markdown + PNG Lorenz / rank curves + JSON in --output-dir; one JSON line last):
    dpsnr pool-health --model PATH --dataset tinystories --split test \\
        --max-length 512 [--stride 512] [--max-tokens N] [--output-dir eval/results]
Windows default to disjoint (stride = max_length) so that every token is processed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dpsnr.training.pool_usage import (  # noqa: F401  (usage_statistics & co. are part of this module's API)
    MASS_LEVELS, gini, kl_to_uniform, lorenz_curve, rows_for_share, usage_statistics,
)


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
    from .common import EvalArguments, ReportArguments, json_line, prepare_eval
    from dpsnr.scripting import parse_dataclasses

    args, out = parse_dataclasses((EvalArguments, ReportArguments), argv)
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
    from dpsnr.scripting import setup_script_logging

    setup_script_logging()
    main()
