"""The loop and pool study: every DPSN-R variant and baseline trained with the main job's recipe at
an equal token budget, each run a JSON record, the grid resumable and run two at a time.

Protocol (issues "the loop must earn its compute" and "the pool must be used"):
- recipe: `configuration/recipes/micro-tinystories.yaml` — blocks of 256 tokens, batch 8 (2,048
  tokens a step), cosine schedule with 30/350 of the steps as warmup, weight decay 0.1, clipping 1,
  pool learning rate 1e-2; the token budget (716,800 = the main job's 350 steps, or twice it) and
  the learning rate are per run. Every model, baselines included, is run at several learning
  rates and each row reports its best.
- data: TinyStories — a 4,096-token byte-level BPE learned on the main job's file
  (`TinyStories-train.head-2316.txt`), held-out = its last 5 % of stories (the main job's), trained
  on the other 95 % followed by the V2 TinyStories files of ../shared/data (SOURCES.md), so a run
  of 1.4M tokens never repeats a story; WikiText-2 — BPE on train.txt, trained on train.txt,
  held-out = valid.txt (first 256 blocks).
- metrics: held-out loss (mean next-token NLL from the logits, the ponder term never counts) and
  perplexity; mean reasoning steps and their histogram; per partition the pool usage on the
  held-out text (rows read, KL to uniform, Gini, rows holding 50/90/99 % of the weight mass);
  training tokens/s (wall clock of the training loop); greedy decoding tokens/s (batch 1, KV
  cache); FLOPs per token from the cost model (modeling_dpsnr/cost.py) at the measured mean steps.
  Tokens/s come from runs that share the machine with another run: compare them within a run pair
  only; `eval/bench_throughput.py` measures speed properly.

    dpsnr study run --grid configuration/studies/loop_pool.yaml --jobs 2 [--only REGEX]
    dpsnr study one --dataset tinystories --variant block-act --lr 3e-3 [--tokens N] [--seed S]
    dpsnr study report [--grid ...]   # eval/results/study/*.json → study.md + PNG, one JSON line
(`python -m dpsnr.eval.study ...` is the same.)

Records: eval/results/study/<run name>.json (command, budget, machine, commit, versions, metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(os.environ.get("DPSNR_STUDY_RESULTS", Path(__file__).resolve().parent / "results" / "study"))
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DPSNR_STUDY_CACHE", Path.home() / ".cache" / "dpsnr-study"))
MAIN_JOB_TOKENS = 716_800
BLOCK, BATCH = 256, 8

DATASETS = {
    "tinystories": dict(
        bpe="tinystories/TinyStories-train.head-2316.txt",
        train="tinystories/TinyStories-train.head-2316.txt", heldout_percent=5,
        extra=["tinystories/TinyStoriesV2-GPT4-train.head-1726.txt", "tinystories/TinyStoriesV2-GPT4.cs336-sample5M.txt",
               "tinystories/TinyStoriesV2-GPT4-train.sample-eminorhan10M_1.txt"],
    ),
    "wikitext2": dict(bpe="wikitext-2/train.txt", train="wikitext-2/train.txt", validation="wikitext-2/valid.txt", extra=[]),
}

# The base every DPSN-R variant starts from: the micro preset with the first design's loop and pool
# (token step, ACT, three partitions 70/20/10, RMS query norm, raw keys), as when the study began.
# The presets have since adopted F (block step, threshold routing, one shared pool, running query
# norm, unit keys) and micro a hashed n-gram partition; pinning the base keeps a variant's name
# meaning what its records measured.
FIRST_DESIGN = dict(loop_step="token", loop_halting="act", pool_query_norm="rms", pool_key_norm="none",
                    pool_partitions={"knowledge": 0.7, "reasoning": 0.2, "grammar": 0.1}, pool_size=65536,
                    pool_partition_retrieval=None, ngram_prelude_partition=None, loop_phase_schedule=None)

# variant → (kind, config overrides on FIRST_DESIGN, or dense layers).
VARIANTS: dict[str, tuple[str, dict]] = {
    "token-act": ("dpsnr", {}),
    "token-fixed1": ("dpsnr", dict(loop_max_steps=1, loop_halting="fixed")),
    "token-fixed2": ("dpsnr", dict(loop_max_steps=2, loop_halting="fixed")),
    "token-fixed4": ("dpsnr", dict(loop_halting="fixed")),
    "token-threshold": ("dpsnr", dict(loop_halting="threshold")),
    "block-act": ("dpsnr", dict(loop_step="block")),
    "block-fixed1": ("dpsnr", dict(loop_step="block", loop_max_steps=1, loop_halting="fixed")),
    "block-fixed2": ("dpsnr", dict(loop_step="block", loop_max_steps=2, loop_halting="fixed")),
    "block-fixed4": ("dpsnr", dict(loop_step="block", loop_halting="fixed")),
    "block-threshold": ("dpsnr", dict(loop_step="block", loop_halting="threshold")),
    "dense-4": ("dense", dict(num_hidden_layers=4)),  # the controller's twin
    "dense-5": ("dense", dict(num_hidden_layers=5)),
    "dense-6": ("dense", dict(num_hidden_layers=6)),
    "dense-7": ("dense", dict(num_hidden_layers=7)),
}


@dataclass
class RunSpec:
    dataset: str
    variant: str
    lr: float = 3e-3
    tokens: int = MAIN_JOB_TOKENS
    seed: int = 42
    pool_lr: float = 1e-2
    overrides: dict = field(default_factory=dict)  # extra config fields on top of the variant's
    training: dict = field(default_factory=dict)  # extra DPSNRTrainingArguments (e.g. exit_samples), DPSN-R only
    name: str | None = None

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {list(DATASETS)}")
        if self.variant not in VARIANTS and not self.overrides:
            raise ValueError(f"unknown variant {self.variant!r}; known: {list(VARIANTS)} (or give overrides)")
        if self.training and self.variant in VARIANTS and VARIANTS[self.variant][0] == "dense":
            raise ValueError(f"{self.variant}: training arguments {sorted(self.training)} are DPSN-R trainer arguments")
        if self.tokens % (BLOCK * BATCH):
            raise ValueError(f"tokens must be a multiple of {BLOCK * BATCH}, got {self.tokens}")
        if self.name is None:
            budget = f"{self.tokens // 1000}k"
            self.name = f"{self.dataset}.{self.variant}.lr{self.lr:g}.{budget}.s{self.seed}"


# ---------------------------------------------------------------------------- data (cached)
def tokenizer_for(dataset: str):
    from transformers import AutoTokenizer

    from dpsnr.training.data import resolve_data_path
    from dpsnr.training.tokenizer import train_bpe_tokenizer

    folder = CACHE / f"tok-{dataset}"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    tok = train_bpe_tokenizer([str(resolve_data_path(DATASETS[dataset]["bpe"]))], 4096, output_dir=str(folder))
    return tok


def blocks_for(dataset: str, tokenizer) -> dict[str, np.ndarray]:
    """(train, validation) int32 arrays of shape (blocks, 256), cached beside the tokenizer."""
    from dpsnr.training.data import DataArguments, _local_documents, build_datasets, resolve_data_path, tokenize_and_pack

    path = CACHE / f"blocks-{dataset}-{BLOCK}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    spec = DATASETS[dataset]
    common = dict(block_size=BLOCK, max_eval_samples=256)
    if "validation" in spec:
        main = build_datasets(DataArguments(train_file=spec["train"], validation_file=spec["validation"], **common), tokenizer)
    else:
        main = build_datasets(DataArguments(train_file=spec["train"], validation_split_percentage=spec["heldout_percent"], **common), tokenizer)
    train = [np.asarray(main["train"]["input_ids"], dtype=np.int32)]
    for extra in spec["extra"]:  # every story trains: nothing held out of these files
        docs = _local_documents(resolve_data_path(extra), "auto", DataArguments(train_file=extra))
        more = tokenize_and_pack(docs, tokenizer, BLOCK, source=extra)
        train.append(np.asarray(more["input_ids"], dtype=np.int32))
    out = {"train": np.concatenate(train), "validation": np.asarray(main["validation"]["input_ids"], dtype=np.int32)}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


# ---------------------------------------------------------------------------- models
def build_model(spec: RunSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

    kind, overrides = VARIANTS.get(spec.variant, ("dpsnr", {}))
    special = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = DPSNRConfig.from_preset("micro", **special, **({} if kind == "dense" else {**FIRST_DESIGN, **overrides, **spec.overrides}))
    if kind == "dpsnr":
        return kind, cfg, DPSNRForCausalLM(cfg)
    layers = overrides["num_hidden_layers"]
    dense = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **special,
    )
    return kind, dense, LlamaForCausalLM(dense)


def flops_per_token(kind: str, cfg, mean_steps: float | None, training: bool, exit_samples: int | None = None) -> float:
    from modeling_dpsnr.cost import block_macs, flops_per_token as dpsnr_flops

    context = (BLOCK + 1) / 2  # mean keys a query sees over a causal block
    if kind == "dpsnr":
        return dpsnr_flops(cfg, steps=mean_steps, context=context, training=training, exit_samples=exit_samples)
    hd = cfg.hidden_size // cfg.num_attention_heads
    macs = cfg.num_hidden_layers * block_macs(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                                              cfg.intermediate_size, context) + cfg.hidden_size * cfg.vocab_size
    return 2 * macs * (3 if training else 1)


# ---------------------------------------------------------------------------- one run
@torch.no_grad()
def evaluate(model, kind: str, blocks: np.ndarray, max_steps: int | None) -> dict:
    """Held-out NLL (LM part only), mean steps and their histogram, pool usage per partition."""
    from dpsnr.eval.pool_health import usage_statistics

    model.eval()
    nll, count, steps_sum = 0.0, 0, 0.0
    hist = np.zeros((max_steps or 0) + 1, dtype=np.int64)
    usage_ctx = model.pool.track_usage() if kind == "dpsnr" else None
    usage = usage_ctx.__enter__() if usage_ctx is not None else None
    try:
        for i in range(0, len(blocks), 32):
            ids = torch.as_tensor(blocks[i:i + 32], dtype=torch.long)
            out = model(ids, use_cache=False)
            logp = out.logits[:, :-1].float().log_softmax(-1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
            if kind == "dpsnr":
                st = out.reasoning_steps[:, :-1]
                steps_sum += st.float().sum().item()
                hist += np.bincount(st.flatten().numpy(), minlength=len(hist))[: len(hist)]
    finally:
        if usage_ctx is not None:
            usage_ctx.__exit__(None, None, None)
    record = {"heldout_loss": nll / count, "heldout_perplexity": math.exp(nll / count), "heldout_tokens": count}
    if kind == "dpsnr":
        record["mean_steps"] = steps_sum / count
        record["step_histogram"] = hist[1:].tolist()
        record["pool_usage"] = {name: usage_statistics(c["counts"], c["mass"]) for name, c in usage.items()}
        policy = model.model.loop.policy
        if getattr(policy, "trains_exits", False):  # trained exits: the whole halting curve of this model
            record["exit_curve"] = exit_curve_on_blocks(model, blocks)
    return record


EXIT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def exit_curve_on_blocks(model, blocks: np.ndarray, thresholds=EXIT_THRESHOLDS) -> list[dict]:
    """Held-out perplexity and mean steps of a trained-exit model at each exit threshold q."""
    from dpsnr.eval.exit_curve import stopping_at

    rows = []
    for q in thresholds:
        nll, count, steps = 0.0, 0, 0.0
        with stopping_at(model, q):
            for i in range(0, len(blocks), 32):
                ids = torch.as_tensor(blocks[i:i + 32], dtype=torch.long)
                out = model(ids, use_cache=False)
                nll -= out.logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).sum().item()
                count += ids[:, 1:].numel()
                steps += out.reasoning_steps[:, :-1].float().sum().item()
        rows.append({"threshold": q, "heldout_perplexity": math.exp(nll / count), "mean_steps": steps / count})
    return rows


@torch.no_grad()
def decode_speed(model, blocks: np.ndarray, prompts: int = 4, prompt_len: int = 32, new_tokens: int = 48) -> float:
    """Greedy decoding tokens/s, batch 1, KV cache, over a few held-out prompts."""
    model.eval()
    ids = torch.as_tensor(blocks[:prompts, :prompt_len], dtype=torch.long)
    model.generate(ids[:1], max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
    start = time.perf_counter()
    for row in ids:
        model.generate(row[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return prompts * new_tokens / (time.perf_counter() - start)


def run_one(spec: RunSpec, threads: int = 1) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from dpsnr.training.trainer import DPSNRTrainer, DPSNRTrainingArguments

    torch.set_num_threads(threads)
    tok = tokenizer_for(spec.dataset)
    data = blocks_for(spec.dataset, tok)
    set_seed(spec.seed)
    kind, cfg, model = build_model(spec, tok)
    steps = spec.tokens // (BLOCK * BATCH)
    if steps * BATCH > len(data["train"]):
        raise ValueError(f"{spec.name}: {steps * BATCH} blocks needed, {len(data['train'])} available (no repeats)")
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(data["train"]))[: steps * BATCH]  # each block at most once
    train = Dataset.from_dict({"input_ids": data["train"][order].tolist(), "labels": data["train"][order].tolist()})
    common = dict(
        output_dir=str(CACHE / "runs" / spec.name), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=spec.lr, weight_decay=0.1, warmup_steps=max(1, round(steps * 30 / 350)), lr_scheduler_type="cosine",
        max_grad_norm=1.0, logging_steps=max(1, steps // 28), save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=spec.seed, dataloader_drop_last=True,
    )
    if kind == "dpsnr":
        trainer = DPSNRTrainer(model=model, args=DPSNRTrainingArguments(pool_learning_rate=spec.pool_lr, **spec.training, **common),
                               train_dataset=train, data_collator=default_data_collator)
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    record = evaluate(model, kind, data["validation"], cfg.loop_max_steps if kind == "dpsnr" else None)
    record["decode_tokens_per_second"] = decode_speed(model, data["validation"])
    mean_steps = record.get("mean_steps")
    total = sum(p.numel() for p in model.parameters())
    if kind == "dpsnr":
        total, active = model.count_parameters()
    else:
        active = total - model.model.embed_tokens.weight.numel()
    record.update(
        train_seconds=seconds, train_tokens_per_second=spec.tokens / seconds,
        flops_per_token_train=flops_per_token(kind, cfg, mean_steps, training=True,
                                              exit_samples=spec.training.get("exit_samples")),
        flops_per_token_forward=flops_per_token(kind, cfg, mean_steps, training=False),
        total_params=total, active_params=active,
        curve=[(h["step"], h.get("lm_loss", h["loss"])) for h in trainer.state.log_history if "loss" in h],
    )
    if kind == "dpsnr":
        record["curve_steps"] = [(h["step"], h["avg_steps"]) for h in trainer.state.log_history if "avg_steps" in h]
    return {"spec": asdict(spec), "kind": kind, "config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
            "metrics": record, "provenance": provenance()}


def provenance(command: str = "dpsnr study") -> dict:
    import transformers

    from dpsnr.eval.common import git_revision

    return {
        "command": command + " " + " ".join(sys.argv[1:]),
        **git_revision(ROOT),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------- the grid
def load_grid(path: str | os.PathLike) -> list[RunSpec]:
    """A grid YAML: `defaults:` (RunSpec fields) and `runs:` — each a mapping whose list-valued
    fields expand to their product (e.g. `{dataset: [tinystories, wikitext2], variant: block-act, lr: [1e-3, 3e-3]}`)."""
    import itertools

    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    defaults = doc.get("defaults", {})
    specs = []
    for entry in doc["runs"]:
        entry = {**defaults, **entry}
        keys = [k for k, v in entry.items() if isinstance(v, list)]
        for combo in itertools.product(*(entry[k] for k in keys)):
            fields_ = {**entry, **dict(zip(keys, combo))}
            fields_["lr"] = float(fields_.get("lr", 3e-3))
            specs.append(RunSpec(**fields_))
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"{path}: runs named twice: {sorted(dupes)}")
    return specs


def _running_elsewhere() -> set[str]:
    """Names of runs some other `eval.study one` process is training now (from /proc cmdlines)."""
    names = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"eval.study" in b" ".join(argv) and b"--spec" in argv:
            try:
                names.add(json.loads(argv[argv.index(b"--spec") + 1])["name"])
            except (ValueError, KeyError, IndexError):
                continue
    return names


def run_grid(grid: str, jobs: int, only: str | None) -> None:
    """Run the grid's missing runs, `jobs` at a time. The grid file is read again before each start,
    so runs can be added or reordered while it works; runs another process is training are skipped."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    running: list[tuple[RunSpec, subprocess.Popen]] = []
    prepared: set[str] = set()
    while True:
        mine = {spec.name for spec, _ in running}
        busy = _running_elsewhere() | mine
        pending = [s for s in load_grid(grid) if not (RESULTS / f"{s.name}.json").exists() and s.name not in busy
                   and (only is None or re.search(only, s.name))]
        if not pending and not running:
            break
        while pending and len(running) + len(busy - mine) < jobs:
            spec = pending.pop(0)
            if spec.dataset not in prepared:  # tokenizer and blocks once, before runs share them
                blocks_for(spec.dataset, tokenizer_for(spec.dataset))
                prepared.add(spec.dataset)
            cmd = [sys.executable, "-m", "dpsnr.eval.study", "one", "--spec", json.dumps(asdict(spec))]
            log = open(CACHE / f"{spec.name}.log", "w")
            running.append((spec, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
            print(f"study: started {spec.name} ({len(pending)} more pending)", flush=True)
        time.sleep(10)
        for item in list(running):
            spec, proc = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, log {CACHE / (spec.name + '.log')})"
                print(f"study: {spec.name} {status}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the grid's missing runs")
    r.add_argument("--grid", default=str(ROOT / "configuration" / "studies" / "loop_pool.yaml"))
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--only", default=None, help="regex on run names")
    o = sub.add_parser("one", help="one run, written to eval/results/study/<name>.json")
    o.add_argument("--spec", default=None, help="a RunSpec as JSON (what `run` passes)")
    o.add_argument("--dataset", default="tinystories")
    o.add_argument("--variant", default="token-act")
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--tokens", type=int, default=MAIN_JOB_TOKENS)
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--output", default=None, help="JSON path (default: eval/results/study/<name>.json)")
    rep = sub.add_parser("report", help="tables and plots from the records")
    rep.add_argument("--grid", default=None)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run_grid(args.grid, args.jobs, args.only)
    elif args.cmd == "one":
        spec = RunSpec(**json.loads(args.spec)) if args.spec else RunSpec(args.dataset, args.variant, args.lr, args.tokens, args.seed)
        record = run_one(spec, threads=args.threads)
        out = Path(args.output) if args.output else RESULTS / f"{spec.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)
        m = record["metrics"]
        print(json.dumps({"run": spec.name, "heldout_perplexity": round(m["heldout_perplexity"], 3),
                          "mean_steps": m.get("mean_steps"), "train_tokens_per_second": round(m["train_tokens_per_second"], 1)}))
    else:
        from dpsnr.eval.study_report import main as report_main

        report_main(args.grid)


if __name__ == "__main__":
    main()
