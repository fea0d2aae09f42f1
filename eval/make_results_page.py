"""Build docs/results.md from the JSON files the eval scripts wrote to eval/results/.

Every figure on the page is read from a results file, with the command that produced it and the
machine it ran on; nothing is typed by hand. Sections whose results file is missing say so.

    dpsnr results-page [--results eval/results] [--output docs/results.md]
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _rel(path: Path, page: Path) -> str:
    return os.path.relpath(path, page.parent)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |")
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def section_compare(results: Path, page: Path, name: str = "compare",
                    title: str = "DPSN-R vs a dense controller at equal training tokens") -> list[str]:
    data = _load(results / f"{name}.json")
    lines = [f"## {title}", ""]
    if data is None:
        return lines + [f"_Not run yet: `dpsnr compare --output-name {name}`._", ""]
    lines += [f"Command: `{data['command']}`  ", f"Machine: {data['machine']}  ",
              f"Budget: {data['train_tokens']:,} training tokens per run, {data['tokens_per_step']:,} tokens per step."
              + (f" Whole comparison: {data['wall_seconds'] / 60:.0f} min wall clock." if "wall_seconds" in data else ""), ""]
    for ds, rows in data["results"].items():
        dense = next((r for r in rows if r["kind"] == "dense"), None)
        for r in rows:
            r["vs_dense_ppl_pct"] = round(100 * (r["heldout_perplexity"] / dense["heldout_perplexity"] - 1), 2) if dense else None
        lines += [f"### {ds}", ""] + _table(rows, [
            ("variant", "variant"), ("held-out loss", "heldout_loss"), ("perplexity", "heldout_perplexity"),
            ("ppl vs dense (%)", "vs_dense_ppl_pct"), ("train tokens/s", "tokens_per_second"),
            ("mean steps", "mean_steps"), ("total params", "total_params"), ("active params", "active_params"),
            ("passes over the train split", "epochs"),
        ]) + [""]
    if (results / f"{name}_curves.png").exists():
        lines += [f"![loss curves]({_rel(results / f'{name}_curves.png', page)})", ""]
    return lines


def section_seed_spread(results: Path, pattern: str = "gpu/compare_gpu_seed*.json") -> list[str]:
    """Held-out perplexity over several seeds of the same comparison: mean, spread, and the
    DPSN-R-vs-dense reduction seed by seed (each seed's two runs share data order and init seed)."""
    files = sorted(results.glob(pattern))
    lines = ["## Seed spread of the comparison", ""]
    if not files:
        return lines + [f"_Not run yet (no `{pattern}` in eval/results)._", ""]
    runs = [json.loads(f.read_text()) for f in files]
    seeds = [r["settings"]["seed"] for r in runs]
    lines += [f"Commands: `{runs[0]['command']}` with `--seed` {', '.join(map(str, seeds))}  ",
              f"Machine: {runs[0]['machine']}  ",
              f"Budget: {runs[0]['train_tokens']:,} training tokens per run (the CPU grid's budget).", ""]
    for ds in runs[0]["results"]:
        per_variant: dict[str, list[float]] = {}
        for run in runs:
            for row in run["results"].get(ds, []):
                per_variant.setdefault(row["variant"], []).append(row["heldout_perplexity"])
        dense = per_variant.get("dense-llama")
        rows = []
        for name, ppl in per_variant.items():
            row = {"variant": name, "seeds": len(ppl), "mean": round(statistics.mean(ppl), 2),
                   "sd": round(statistics.stdev(ppl), 2) if len(ppl) > 1 else None,
                   "min": round(min(ppl), 2), "max": round(max(ppl), 2)}
            if dense and name != "dense-llama" and len(dense) == len(ppl):
                cut = [100 * (1 - a / b) for a, b in zip(ppl, dense)]
                row["cut"] = f"{min(cut):.1f} … {max(cut):.1f}"
            rows.append(row)
        lines += [f"### {ds}", ""] + _table(rows, [
            ("variant", "variant"), ("seeds", "seeds"), ("mean perplexity", "mean"), ("sd", "sd"),
            ("min", "min"), ("max", "max"), ("ppl reduction vs dense, per seed (%)", "cut")]) + [""]
    return lines


def section_ponder_sweep(results: Path) -> list[str]:
    """Halting vs ponder cost: the sweep's rows beside the grid's own `micro` (0.01) and ACT-off rows."""
    sweep, grid = _load(results / "compare_ponder.json"), _load(results / "compare.json")
    lines = ["## Ponder cost: when does halting become selective?", ""]
    if sweep is None or grid is None:
        return lines + ["_Not run yet: `dpsnr compare --jobs 2 --variants ponder-x3 ponder-x10 ponder-x30 "
                        "--output-name compare_ponder` (and the grid)._", ""]
    lines += [f"Command: `{sweep['command']}`, beside the grid's `dpsnr-micro` (ponder weight 0.01), `act-off` and fixed-step rows "
              "(same budget, data, seed): halting that spends fewer steps should beat a fixed loop of as many steps. The ponder term starts after the first 25 % of steps (`ponder_warmup_ratio`). "
              "Tokens/s come from two separate runs on a shared machine: compare them within one run only.", ""]
    for ds, rows in sweep["results"].items():
        base = [r for r in grid["results"].get(ds, []) if r["variant"] in ("dpsnr-micro", "act-off", "steps-1", "steps-2", "dense-llama")]
        table = []
        for r in base + rows:
            weight = r["overrides"].get("loop_ponder_weight", 0.01 if r["kind"] == "dpsnr" else None)
            fixed = r["variant"] == "act-off" or r["variant"].startswith("steps-")
            table.append({**r, "ponder_weight": None if fixed else weight})
        lines += [f"### {ds}", ""] + _table(table, [
            ("variant", "variant"), ("ponder weight", "ponder_weight"), ("mean steps (held-out)", "mean_steps"),
            ("held-out loss", "heldout_loss"), ("perplexity", "heldout_perplexity"), ("train tokens/s", "tokens_per_second")]) + [""]
    return lines


def section_perplexity(results: Path) -> list[str]:
    """The sliding-window perplexity records (`dpsnr perplexity --output FILE`)."""
    records = [json.loads(f.read_text()) for f in sorted(results.glob("perplexity_*.json"))]
    lines = ["## Sliding-window perplexity of the main job's model", "",
             "The TinyStories record is today's default main job; the WikiText records were measured on the "
             "first design's main-job model (an earlier session) and not rerun.", ""]
    if not records:
        return lines + ["_Not run yet (no `perplexity_*.json` in eval/results)._", ""]
    rows = []
    for r in records:
        rows.append({**r, "window": f"{r['context']} / {r['stride']}", "command": f"`dpsnr perplexity --model {r['model']} --dataset {r['dataset']} --split {r['split']} "
                                     f"--max-length {r['context']} --stride {r['stride']} --batch-size {r['batch_size']}`"})
    lines += ["Perplexity from the token cross-entropy over strided windows: each token is scored once, with at "
              "least `context - stride` tokens of left context except at the start; bits per byte over the UTF-8 text. "
              "The model was trained on TinyStories only: the WikiText rows measure the tool, not a claim.", ""]
    lines += _table(rows, [("dataset", "dataset"), ("split", "split"), ("tokens scored", "tokens_scored"),
                           ("perplexity", "ppl"), ("bits/byte", "bits_per_byte"), ("context / stride", "window"),
                           ("command", "command")]) + [""]
    return lines


def section_exit_curves(results: Path, page: Path) -> list[str]:
    """`dpsnr exit-curve` records: perplexity and mean steps per exit threshold, and time against steps."""
    lines = ["## Trained exits: perplexity against mean steps as the exit threshold moves", ""]
    files = sorted(results.glob("exit_curve_*.json"))
    if not files:
        return lines + ["_Not run yet (no `exit_curve_*.json` in eval/results)._", ""]
    lines += ["Each row scores the same held-out windows; forward time is the eager driver's (halted tokens cost "
              "nothing more), relative to the deepest threshold's, beside the cost model's FLOPs ratio.", ""]
    for f in files:
        d = json.loads(f.read_text())
        qs = " ".join(f"{r['threshold']:g}" for r in d["curve"])
        lines += [f"**{d['model']}** ({d['dataset']} {d['split']}, windows {d['context']} / {d['stride']}): "
                  f"`dpsnr exit-curve --model {d['model']} --dataset {d['dataset']} --split {d['split']} "
                  f"--max-length {d['context']} --stride {d['stride']} --thresholds {qs}`", ""]
        lines += _table(d["curve"], [("q", "threshold"), ("perplexity", "ppl"), ("mean steps", "mean_steps"),
                                     ("forward speed-up vs deepest", "speedup_vs_deepest"),
                                     ("cost-model speed-up", "cost_model_speedup"),
                                     ("decode tokens/s", "decode_tokens_per_second"), ("decode steps", "decode_mean_steps"),
                                     ("decode speed-up vs deepest", "decode_speedup_vs_deepest"),
                                     ("steps histogram", "steps_histogram")])
        png = f.with_suffix(".png")
        lines += ([f"![{png.stem}]({_rel(png, page)})"] if png.exists() else []) + [""]
    return lines


def section_json(title: str, path: Path, page: Path, pngs: list[Path]) -> list[str]:
    data = _load(path)
    lines = [f"## {title}", ""]
    if data is None:
        return lines + [f"_Not run yet (`{path.relative_to(ROOT)}` missing)._", ""]
    cmd = data.get("command") if isinstance(data, dict) else None
    if cmd:
        lines += [f"Command: `{cmd}`", ""]
    lines += ["```json", json.dumps({k: v for k, v in data.items() if k != "command"}, indent=1)[:4000], "```", ""]
    lines += [f"![{p.stem}]({_rel(p, page)})" for p in pngs if p.exists()] + [""]
    return lines


def _study_pool_health(rows: list[dict]) -> list[str]:
    """`eval/pool_health.py`'s figures for every DPSN-R row above, one line per pool partition."""
    table = []
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        for name, u in (r.get("pool_usage") or {}).items():
            table.append({"variant": r["variant"], "partition": name, "read": pct(u.get("frac_rows_read")),
                          "kl": u.get("kl_uniform_counts"), "gini": u.get("gini_counts"),
                          "m50": pct(u.get("frac_rows_mass_50")), "m90": pct(u.get("frac_rows_mass_90")),
                          "m99": pct(u.get("frac_rows_mass_99"))})
    if not table:
        return []
    return ["Pool health of the same runs on the held-out text (`eval/pool_health.py`'s measures; KL of the read "
            "counts from uniform, in nats; Gini of the read counts; the rows holding 50 / 90 / 99 % of the softmax "
            "mass, as % of the partition's rows):", ""] + _table(table, [
        ("variant", "variant"), ("partition", "partition"), ("rows read %", "read"), ("KL", "kl"), ("Gini", "gini"),
        ("50 % of mass", "m50"), ("90 %", "m90"), ("99 %", "m99")]) + [""]


def section_study(results: Path, page: Path) -> list[str]:
    """The loop and pool study (eval/study.py): one row per variant, its best learning rate."""
    rows = _load(results / "study.json")
    lines = ["## Loop and pool study: equal tokens, swept learning rates", ""]
    if not rows:
        return lines + ["_Not run yet: `dpsnr study run` then `dpsnr study report`._", ""]
    lines += ["Each run trains with the main job's recipe (micro, 256-token blocks, batch 8, cosine, wd 0.1) at the "
              "stated budget; each row is a variant at its best learning rate of those tried (in brackets: perplexity "
              "per rate), seeds averaged where two exist. Every run's command, commit, machine and versions are in its "
              "record, `eval/results/study/<run>.json`; the protocol is `eval/study.py`'s docstring. Tokens/s come "
              "from two runs sharing 2 cores: read them as rough.", ""]
    for ds, tokens in sorted({(r["dataset"], r["tokens"]) for r in rows}):
        sub = sorted((r for r in rows if r["dataset"] == ds and r["tokens"] == tokens), key=lambda r: r["heldout_perplexity"])
        table = []
        for r in sub:
            usage = r.get("pool_usage") or {}
            table.append({
                "variant": r["variant"], "ppl": f"{r['heldout_perplexity']:.2f}",
                "seeds": ", ".join(f"{p:.2f}" for p in r["ppl_by_seed"]),
                "lr": f"{r['best_lr']:g} (" + ", ".join(f"{k}: {v:.2f}" for k, v in r["lrs"].items()) + ")",
                "steps": r["mean_steps"], "hist": r.get("step_histogram"),
                "gflops": r["flops_per_token_train"] / 1e9, "train": r["train_tokens_per_second"],
                "decode": r["decode_tokens_per_second"],
                "read": " / ".join(f"{100 * u['frac_rows_read']:.1f}" for u in usage.values()) or None,
                "mass90": " / ".join("–" if u.get("frac_rows_mass_90") is None else f"{100 * u['frac_rows_mass_90']:.1f}"
                                     for u in usage.values()) or None,
            })
        lines += [f"### {ds}, {tokens:,} training tokens", ""] + _table(table, [
            ("variant", "variant"), ("held-out ppl", "ppl"), ("per seed", "seeds"), ("lr (ppl per lr)", "lr"),
            ("mean steps", "steps"), ("steps 1..S", "hist"), ("train GFLOPs/token", "gflops"), ("train tok/s", "train"),
            ("decode tok/s", "decode"), ("rows read % (per partition)", "read"), ("rows holding 90 % of mass %", "mass90")]) + [""]
        lines += _study_pool_health(sub)
    png = results / "study_ppl_vs_flops.png"
    if png.exists():
        lines += [f"![perplexity vs FLOPs]({_rel(png, page)})", ""]
    scaling = _load(results / "study_pool_scaling.json") or {}
    if scaling:
        lines += ["### Pool scaling at flat compute (the default, F-fixed4, main-job budget; one curve per learning rate every size ran at)", ""]
        for ds, pts in sorted(scaling.items()):
            lines += [f"{ds}: " + "; ".join(
                f"{p['pool_entries']:,} entries → ppl {p['heldout_perplexity']:.2f}, rows read "
                f"{100 * (p['frac_rows_read'] or 0):.1f} %, train {p['train_tokens_per_second']:.0f} tok/s" for p in pts), ""]
        png = results / "study_pool_scaling.png"
        if png.exists():
            lines += [f"![pool scaling]({_rel(png, page)})", ""]
    legend = [r for r in rows if r["overrides"]]
    if legend:
        lines += ["Variants (config fields each sets; `F-fixed4` is the presets' loop and pool, and `F-fixed4-hashed` "
                  "`micro`'s layout, which adds a hashed n-gram partition; `dense-N` is a transformers Llama of the "
                  "controller's width with N layers):", ""]
        lines += [f"- `{v}`: `{json.dumps(o, sort_keys=True)}`"
                  for v, o in sorted({r["variant"]: r["overrides"] for r in legend}.items())] + [""]
    return lines


def build(results: Path, page: Path) -> str:
    lines = ["# Measured results", "",
             "Generated by `dpsnr results-page` from the JSON files in `eval/results/`; "
             "each section names the command that produced its figures.", ""]
    lines += section_study(results, page)
    lines += section_json("Throughput: DPSN-R vs its dense twin, and vs pool size", results / "bench_throughput.json", page,
                          [results / "bench_throughput.png"])
    lines += section_json("Decoding compiled (static KV cache, torch.compile'd decoding steps) for both models",
                          results / "bench_throughput_compiled_decode.json", page, [results / "bench_throughput_compiled_decode.png"])
    lines += section_json("Pool size at the main job's batch shape (8 x 256): the pool-scaling curve's speed",
                          results / "bench_throughput_pool_recipe.json", page, [results / "bench_throughput_pool_recipe.png"])
    lines += section_json("Routed halting against every step, same process (time follows steps)",
                          results / "bench_throughput_threshold.json", page, [results / "bench_throughput_threshold.png"])
    lines += section_json("Trained exits against every step, same process (training runs every exit)",
                          results / "bench_throughput_exits.json", page, [results / "bench_throughput_exits.png"])
    lines += section_json("Retrofitting a memory into a pretrained model", results / "retrofit_study.json", page, [])
    lines += section_json("Main job (`make demo`)", results / "main_job.json", page, [])
    lines += section_json("The same main job rerun at a later commit (reproduces it exactly)", results / "main_job_rerun.json",
                          page, [])
    lines += section_json("Reasoning analytics of the main job's model", results / "reasoning_analytics.json", page,
                          [results / "reasoning_analytics.png"])
    lines += section_json("Pool health of the main job's model", results / "pool_health.json", page, [results / "pool_health.png"])
    lines += section_json("The main job with trained exits as `micro`'s halting (q = 0.4, entropy weight 0.1; tried as the "
                          "default and withdrawn)", results / "main_job_exits_default.json", page, [])
    lines += section_json("Reasoning analytics of that model (q = 0.4)", results / "reasoning_analytics_exits_default.json", page,
                          [results / "reasoning_analytics_exits_default.png"])
    lines += section_json("Pool health of that model", results / "pool_health_exits_default.json", page,
                          [results / "pool_health_exits_default.png"])
    lines += section_json("The main job before `micro` had its hashed n-gram memory (one shared product-key pool only)",
                          results / "main_job_without_ngram.json", page, [])
    lines += section_json("Pool health of that model", results / "pool_health_without_ngram.json", page,
                          [results / "pool_health_without_ngram.png"])
    lines += section_json("The main job with routed halting (`loop_halting=threshold`, the presets' default before the study "
                          "chose every step)", results / "main_job_threshold.json", page, [])
    lines += section_json("The main job with a fixed 2-step loop (`loop_max_steps=2`)", results / "main_job_fixed2.json", page, [])
    lines += section_json("The main job with trained exits, an earlier run (commit 36b7ba6; held-out at q = 0.5)",
                          results / "main_job_exits.json", page, [])
    lines += section_json("Trained exits learning from one drawn earlier exit per forward (`--exit_samples 1`; q = 0.4)",
                          results / "main_job_exits_s1.json", page, [])
    lines += section_json("Its second stage: the exit head alone, fitted to whether each next step helped "
                          "(`--exit_gate_stage`, 100 steps)", results / "main_job_exits_gate.json", page, [])
    lines += section_json("Trained exits with a 5× smaller entropy weight (0.02)", results / "main_job_exits_beta0.02.json", page, [])
    lines += section_exit_curves(results, page)
    lines += section_json("Reasoning analytics with trained exits (q = 0.5)", results / "reasoning_analytics_exits.json", page,
                          [results / "reasoning_analytics_exits.png"])
    lines += section_json("Reasoning analytics after the exit-gate stage (q = 0.5)", results / "reasoning_analytics_exits_gate.json",
                          page, [results / "reasoning_analytics_exits_gate.png"])
    lines += section_json("The main job with routed halting, before `micro` had its n-gram memory",
                          results / "main_job_threshold_without_ngram.json", page, [])
    lines += section_json("Reasoning analytics of that model", results / "reasoning_analytics_threshold_without_ngram.json", page,
                          [results / "reasoning_analytics_threshold_without_ngram.png"])
    lines += section_json("Reasoning analytics with routed halting: steps per token class",
                          results / "reasoning_analytics_threshold.json", page, [results / "reasoning_analytics_threshold.png"])
    lines += section_json("Pool health with routed halting", results / "pool_health_threshold.json", page,
                          [results / "pool_health_threshold.png"])
    lines += section_compare(results, page, "compare_today",
                             "The equal-budget comparison rerun on today's micro (same grid and rate as the earlier one below)")
    lines += ["## Earlier comparisons (one learning rate for every model: superseded by the study above)", "",
              "These runs gave every model the learning rate tuned for DPSN-R (3e-3); the dense twin does much better "
              "at 1e-3, so their DPSN-R-vs-dense gaps overstate DPSN-R's advantage. Kept for the ablations' record.", ""]
    lines += section_compare(results, page)
    lines += section_seed_spread(results)
    lines += section_compare(results, page, "gpu/compare_gpu_10x", "Ten times the budget (GPU)")
    lines += section_ponder_sweep(results)
    lines += section_compare(results, page, "gpu/compare_gpu_10x_ponder",
                             "Ten times the budget: ponder weight 0.3 vs a fixed 2-step loop (GPU; compare with the 10x table above)")
    lines += section_perplexity(results)
    lines += section_json("Pool optimizer step time", results / "bench_optimizer.json", page, [results / "bench_optimizer.png"])
    lines += section_json("Pool scale: memory-mapped pools", results / "bench_pool_scale.json", page, [results / "bench_pool_scale.png"])
    lines += section_json("Pool scale: a hashed n-gram pool memory-mapped (rows prefetched from the token ids)",
                          results / "pool_scale_hashed" / "bench_pool_scale.json", page,
                          [results / "pool_scale_hashed" / "bench_pool_scale.png"])
    lines += section_json("CUDA checks (`scripts/check_gpu.sh`)", results / "gpu" / "check_gpu.json", page, [])
    lines += section_json("Training on one GPU (accelerate, bf16)", results / "gpu" / "train_runs.json", page, [])
    lines += section_json("Throughput on one GPU: DPSN-R vs its dense twin, and vs pool size", results / "gpu" / "bench_throughput.json",
                          page, [results / "gpu" / "bench_throughput.png"])
    lines += section_json("The same GPU benchmark with CPU-cache-sized read chunks (before a6e6fc1)",
                          results / "gpu" / "bench_throughput_cache_chunks.json", page, [])
    return "\n".join(lines) + "\n"


@dataclass
class ResultsPageArguments:
    results: str = str(ROOT / "eval" / "results")
    output: str = str(ROOT / "docs" / "results.md")


def main(argv: list[str] | None = None) -> None:
    from dpsnr.scripting import parse_dataclasses

    (args,) = parse_dataclasses((ResultsPageArguments,), argv, description=__doc__.split("\n\n")[0])
    page = Path(args.output)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(build(Path(args.results), page))
    print(json.dumps({"page": str(page)}))


if __name__ == "__main__":
    main()
