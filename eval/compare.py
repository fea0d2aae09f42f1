"""Equal-budget comparison: `micro` DPSN-R vs a dense controller of the same dimensions, plus ablations.

Every run sees the same training tokens (same tokenizer, data, block size, batch, seed, learning
rate and schedule); only the model differs. The dense baseline is a transformers `LlamaForCausalLM`
with the `micro` controller's dimensions (hidden, layers, heads, MLP, vocabulary, context) and no
pool or loop. Ablations change one thing of `micro`: max steps 1/2/4/8, pool size ×1/×4/×16, ACT
on/off, pool balance on/off.

Metric: held-out loss = mean next-token NLL over the validation blocks from the LM loss only
(never the ponder term); perplexity = exp(held-out loss). Also reported: training tokens/s (wall
clock of the training loop on this machine, so compare ratios within one run of this script),
mean reasoning steps on the held-out set, total and active parameters, and per partition the
held-out pool utilisation (% rows read, KL of read counts to uniform) — the `balance-on` row
against `dpsnr-micro` is the measured effect of pool balancing.

    dpsnr compare --jobs 2     # the full grid, both datasets side by side: 31 min on 2 cores
Writes eval/results/compare.json, compare.md and compare_curves.png; prints one JSON line last.
`--jobs N` runs the datasets in N processes of one torch thread each and merges their results, so
tokens/s are measured with the other process busy: compare them within a dataset's table only.
Arguments: `RunsArguments` (which runs), `BudgetArguments` (what each run gets), `RunnerArguments`
(where they run, where results go); `--config file.yaml` gives any of them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed

import modeling_dpsnr  # noqa: F401
from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

from dpsnr.eval.pool_health import usage_statistics
from dpsnr.scripting import parse_dataclasses
from dpsnr.training.data import DataArguments, build_datasets, resolve_data_path
from dpsnr.training.tokenizer import train_bpe_tokenizer
from dpsnr.training.trainer import DPSNRTrainer, DPSNRTrainingArguments

RESULTS = Path(__file__).resolve().parent / "results"

DATASETS = {
    # name: (DataArguments kwargs, file the BPE is learned from)
    "tinystories": (dict(train_file="tinystories/TinyStories-train.head-2316.txt", validation_split_percentage=5),
                    "tinystories/TinyStories-train.head-2316.txt"),
    "wikitext2": (dict(train_file="wikitext-2/train.txt", validation_file="wikitext-2/valid.txt"),
                  "wikitext-2/train.txt"),
}

# name → (kind, micro config overrides). `micro` itself has loop_max_steps=4, pool 65,536, ACT, no balance.
VARIANTS = {
    "dpsnr-micro": ("dpsnr", {}),
    "dense-llama": ("dense", {}),
    "steps-1": ("dpsnr", dict(loop_max_steps=1)),
    "steps-2": ("dpsnr", dict(loop_max_steps=2)),
    "steps-8": ("dpsnr", dict(loop_max_steps=8)),
    "pool-x4": ("dpsnr", dict(pool_size=4 * 65536)),
    "pool-x16": ("dpsnr", dict(pool_size=16 * 65536)),
    "act-off": ("dpsnr", dict(loop_halting="none")),
    "balance-on": ("dpsnr", dict(pool_balance="bias")),
    # the design's literal query, from the contextual state only (see pool_query_input in the config)
    "query-state": ("dpsnr", dict(pool_query_input="state")),
    # a heavier ponder cost (micro: 0.01): does halting become selective, and at what cost in loss?
    "ponder-x3": ("dpsnr", dict(loop_ponder_weight=0.03)),
    "ponder-x10": ("dpsnr", dict(loop_ponder_weight=0.1)),
    "ponder-x30": ("dpsnr", dict(loop_ponder_weight=0.3)),
}
GRID = [name for name in VARIANTS if not name.startswith("ponder-")]  # the default run: the grid


@dataclass
class RunsArguments:
    """Which runs: every variant on every dataset, unless restricted per dataset."""

    datasets: list[str] = field(default_factory=lambda: list(DATASETS), metadata={"choices": list(DATASETS)})
    variants: list[str] = field(default_factory=lambda: list(GRID), metadata={
        "choices": list(VARIANTS), "help": "Default: every variant except the ponder-weight sweep."})
    dataset_variants: list[str] = field(default_factory=list, metadata={
        "metavar": "DATASET=V1,V2", "help": "Restrict the variants run on one dataset, e.g. wikitext2=dpsnr-micro,dense-llama."})

    def __post_init__(self):
        for item in self.dataset_variants:
            ds, _, names = item.partition("=")
            if ds not in DATASETS or not names or any(n not in VARIANTS for n in names.split(",")):
                raise ValueError(f"--dataset-variants {item!r}: expected DATASET=V1,V2 with known names")

    def variants_for(self, dataset: str) -> list[str]:
        restricted = [names for ds, _, names in (item.partition("=") for item in self.dataset_variants) if ds == dataset]
        return restricted[-1].split(",") if restricted else self.variants


@dataclass
class BudgetArguments:
    """What every run gets: the same tokens, data, tokenizer size, optimizer and seed."""

    train_tokens: int = field(default=122_880, metadata={"help": "Training tokens per run (the equal budget)."})
    block_size: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    pool_lr: float = 1e-2
    vocab_size: int = field(default=4096, metadata={"help": "BPE learned on each dataset's train file (micro's vocabulary)."})
    max_eval_blocks: int = 256
    seed: int = 42

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


@dataclass
class RunnerArguments:
    """Where the runs execute and where their results go."""

    device: str = field(default="cpu", metadata={"choices": ["cpu", "cuda"], "help": "Where every run trains (float32)."})
    jobs: int = field(default=1, metadata={"help": "Datasets run in this many processes (one torch thread each)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    output_dir: str = str(RESULTS)
    output_name: str = field(default="compare", metadata={"help": "Stem of the JSON/markdown/PNG files written."})

    def __post_init__(self):
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")


ARGUMENT_TYPES = (RunsArguments, BudgetArguments, RunnerArguments)
# Options each child process of `--jobs N` gets its own value of (run_datasets_in_parallel).
PER_PROCESS_OPTIONS = {"--jobs", "--datasets", "--threads", "--output-dir", "--output-name"}


def dense_twin(cfg: DPSNRConfig) -> LlamaConfig:
    """A Llama with the DPSN-R controller's dimensions and nothing else."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def run_variant(name, kind, overrides, data, tokenizer, budget: BudgetArguments, device: str, workdir):
    set_seed(budget.seed)
    cfg = DPSNRConfig.from_preset("micro", eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **overrides)
    tokens_per_step = budget.tokens_per_step
    steps = max(1, budget.train_tokens // tokens_per_step)
    common = dict(
        output_dir=str(workdir / name), max_steps=steps, per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=32, learning_rate=budget.lr, weight_decay=0.1, warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=max(1, steps // 20), save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=device == "cpu", disable_tqdm=True, seed=budget.seed,
    )
    if kind == "dense":
        model = LlamaForCausalLM(dense_twin(cfg))
        total = sum(p.numel() for p in model.parameters())
        active = total - model.model.embed_tokens.weight.numel()
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data["train"],
                          data_collator=default_data_collator)
    else:
        model = DPSNRForCausalLM(cfg)
        total, active = model.count_parameters()
        trainer = DPSNRTrainer(model=model, args=DPSNRTrainingArguments(pool_learning_rate=budget.pool_lr, **common),
                               train_dataset=data["train"], data_collator=default_data_collator)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    usage = model.pool.track_usage() if kind == "dpsnr" else None
    if usage is not None:
        with usage as counts:
            heldout, mean_steps = heldout_loss(model, data["validation"])
        utilisation = {name: {"pct_rows_read": round(100 * st["frac_rows_read"], 2),
                              "kl_uniform_counts": None if st["kl_uniform_counts"] is None else round(st["kl_uniform_counts"], 4)}
                       for name, c in counts.items() for st in [usage_statistics(c["counts"], c["mass"])]}
    else:
        heldout, mean_steps = heldout_loss(model, data["validation"])
        utilisation = None
    curve = [(h["step"], h.get("lm_loss", h["loss"])) for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": name, "kind": kind, "overrides": overrides, "train_steps": steps,
        "train_tokens": steps * tokens_per_step, "epochs": round(trainer.state.epoch, 3), "train_seconds": round(seconds, 1),
        "tokens_per_second": round(steps * tokens_per_step / seconds, 1),
        "heldout_loss": round(heldout, 4), "heldout_perplexity": round(math.exp(heldout), 3),
        "mean_steps": None if mean_steps is None else round(mean_steps, 3),
        "total_params": total, "active_params": active, "pool_utilisation": utilisation, "curve": curve,
    }


@torch.no_grad()
def heldout_loss(model, dataset, batch_size: int = 32) -> tuple[float, float | None]:
    """Mean next-token NLL over the held-out blocks, from the logits (LM part only)."""
    model.eval()
    nll, count, steps = 0.0, 0, 0.0
    for i in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[i:i + batch_size]["input_ids"], device=model.device)
        out = model(ids)
        logp = out.logits[:, :-1].float().log_softmax(-1)
        nll += -logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
        if getattr(out, "reasoning_steps", None) is not None:
            steps += out.reasoning_steps[:, :-1].float().sum().item()
    model.train()
    return nll / count, (steps / count if steps else None)


def _util(row: dict, key: str) -> str:
    u = row.get("pool_utilisation")
    if not u:
        return "–"
    return " / ".join("–" if v[key] is None else f"{v[key]:g}" for v in u.values())


def write_outputs(report: dict, out_dir: Path, name: str = "compare") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [f"Equal budget: {report['train_tokens']:,} training tokens per run; command: `{report['command']}`", ""]
    for ds, rows in report["results"].items():
        lines += [f"### {ds}", "", "| variant | held-out loss | perplexity | vs dense | tokens/s | mean steps | total params | active params | rows read % (k/r/g) | KL to uniform (k/r/g) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        dense = next((r for r in rows if r["kind"] == "dense"), None)
        for r in rows:
            rel = f"{100 * (r['heldout_perplexity'] / dense['heldout_perplexity'] - 1):+.1f} %" if dense else "–"
            lines.append(f"| {r['variant']} | {r['heldout_loss']:.4f} | {r['heldout_perplexity']:.2f} | {rel} | "
                         f"{r['tokens_per_second']:.0f} | {r['mean_steps'] if r['mean_steps'] is not None else '–'} | "
                         f"{r['total_params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.2f}M | {_util(r, 'pct_rows_read')} | {_util(r, 'kl_uniform_counts')} |")
        lines.append("")
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["results"]), figsize=(7 * len(report["results"]), 4.5), squeeze=False)
    for ax, (ds, rows) in zip(axes[0], report["results"].items()):
        for r in rows:
            xs = [s * report["tokens_per_step"] for s, _ in r["curve"]]
            ax.plot(xs, [l for _, l in r["curve"]], label=r["variant"], lw=2 if r["kind"] == "dense" or r["variant"] == "dpsnr-micro" else 1)
        ax.set_title(f"{ds}: training LM loss at equal tokens")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("LM loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}_curves.png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    runs, budget, runner = parse_dataclasses(ARGUMENT_TYPES, argv, description=__doc__.split("\n\n")[0])
    if runner.threads:
        torch.set_num_threads(runner.threads)
    report = {"command": "dpsnr compare " + " ".join(argv),
              "train_tokens": budget.train_tokens, "tokens_per_step": budget.tokens_per_step,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name()}" if runner.device == "cuda" else ""),
              "settings": {**asdict(runs), **asdict(budget), **asdict(runner)}, "results": {}}
    started = time.time()
    if runner.jobs > 1 and len(runs.datasets) > 1:
        report["results"] = run_datasets_in_parallel(argv, runs.datasets, runner)
        report["wall_seconds"] = round(time.time() - started)
        write_outputs(report, Path(runner.output_dir), runner.output_name)
        return summarise(report, budget, runner)
    workdir = Path(tempfile.mkdtemp(prefix="dpsnr-compare-"))
    try:
        for ds in runs.datasets:
            data_kwargs, bpe_file = DATASETS[ds]
            tok = train_bpe_tokenizer([str(resolve_data_path(bpe_file))], budget.vocab_size, output_dir=str(workdir / f"tok-{ds}"))
            data = build_datasets(DataArguments(block_size=budget.block_size, max_eval_samples=budget.max_eval_blocks, **data_kwargs),
                                  tok, model_max_positions=512, model_vocab_size=budget.vocab_size)
            rows = []
            for name in runs.variants_for(ds):
                kind, overrides = VARIANTS[name]
                row = run_variant(name, kind, overrides, data, tok, budget, runner.device, workdir / ds)
                rows.append(row)
                print(json.dumps({"dataset": ds, **{k: v for k, v in row.items() if k != "curve"}}), flush=True)
                report["results"][ds] = rows
                report["wall_seconds"] = round(time.time() - started)
                write_outputs(report, Path(runner.output_dir), runner.output_name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summarise(report, budget, runner)


def _drop_options(argv: list[str], names: set[str]) -> list[str]:
    """argv without the named options and their values (values are the tokens up to the next option).
    `names` are spelled with hyphens; `--output_name` and `--output-name` are the same option."""
    out, skipping = [], False
    for tok in argv:
        if tok.startswith("--"):
            skipping = tok.split("=", 1)[0].replace("_", "-") in names
        if not skipping:
            out.append(tok)
    return out


def run_datasets_in_parallel(argv: list[str], datasets: list[str], runner: RunnerArguments) -> dict:
    """One child process per dataset (at most `runner.jobs` at a time), one torch thread each; merged results."""
    base = _drop_options(argv, PER_PROCESS_OPTIONS)
    parts = Path(tempfile.mkdtemp(prefix="dpsnr-compare-parts-"))
    results, pending, running = {}, list(datasets), []
    try:
        while pending or running:
            while pending and len(running) < runner.jobs:
                ds = pending.pop(0)
                cmd = [sys.executable, "-m", "dpsnr", "compare", *base, "--datasets", ds, "--threads", str(runner.threads or 1),
                       "--output-dir", str(parts), "--output-name", ds]
                running.append((ds, subprocess.Popen(cmd)))
            ds, proc = running.pop(0)
            if proc.wait() != 0:
                for _, other in running:
                    other.kill()
                raise SystemExit(f"dpsnr compare: the {ds} run failed (exit {proc.returncode}); its log is above")
            results[ds] = json.loads((parts / f"{ds}.json").read_text())["results"][ds]
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return {ds: results[ds] for ds in datasets}


def summarise(report: dict, budget: BudgetArguments, runner: RunnerArguments) -> dict:
    summary = {}
    for ds, rows in report["results"].items():
        by = {r["variant"]: r for r in rows}
        if "dpsnr-micro" in by and "dense-llama" in by:
            summary[ds] = round(100 * (1 - by["dpsnr-micro"]["heldout_perplexity"] / by["dense-llama"]["heldout_perplexity"]), 2)
    final = {"metric": "held-out perplexity reduction of dpsnr-micro vs dense-llama (%)", "by_dataset": summary,
             "train_tokens": budget.train_tokens, "results": str(Path(runner.output_dir) / f"{runner.output_name}.json")}
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    main()
