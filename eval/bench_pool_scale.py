"""Decode speed and peak memory of a memory-mapped pool, from 2^16 entries to a 20 GB pool file.

The controller is `micro`-shaped (d 256, 4 blocks, neuron entries, 4 heads × 8 rows × 4 steps).
For each pool size the script streams a random fp16 pool into one safetensors file
(dpsnr/pool_tool.py: chunks of 64 MB, never the whole pool in RAM), puts two controllers beside
it (product-key and coordinate retrieval, each head reading 8 rows), and measures each with the
pool opened read-only by `from_pretrained(path, pool_mmap=True)` (row prefetch on, its default:
pool_files.Prefetcher). The reference is the same
controller with a 2^16-entry pool loaded into RAM (`from_pretrained(path)`, fp32), measured just
before each mapped configuration (paired: the machine is shared, its load drifts).

Reads must be as varied as a trained model's, or a memory map looks free: an untrained model
decoding greedily repeats itself and reads the same rows. So tokens are sampled (fixed seed, the
same for every configuration), and the coordinate controllers' position outputs are scaled
(×SPREAD) so windows spread over the stripes: 2,490 distinct rows of 2,528 rows read over 64
tokens on a 2^18-entry pool (product keys: 1,273).

Metric, per configuration, in a fresh subprocess (so peak memory is its own):
- decode tokens/s: `generate` of --new-tokens tokens after a --prompt-len prompt, one thread,
  after one warm-up generation from another prompt; 1 / median time between consecutive
  generated tokens (prefill excluded; the median ignores stalls caused by other processes). The
  pool file is synced and dropped from the page cache before loading, so rows come from disk the
  first time they are read: a cold start, the worst case for the memory map ("repeat": the same
  generation again, every page it reads now cached);
- peak RSS: VmHWM of the process (torch itself included), after loading and generating.
Ratios: decode tokens/s with the mapped pool / with the small in-RAM pool, same retrieval mode.

    dpsnr bench-pool-scale [--max-params 1e10] [--new-tokens 64] [--work-dir /tmp]
Pool files are created in a temporary folder under --work-dir and removed after each size.
Prints one JSON line last; writes eval/results/bench_pool_scale.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MICRO = "micro"
SPREAD = 40.0  # scale of the coordinate indexer's position outputs (see above)
MODES = {"product_key": dict(pool_retrieval="product_key"),
         "coordinate": dict(pool_retrieval="coordinate", indexer_window=8, indexer_hidden_size=256),
         # hashed n-gram rows (hashed.py): addresses known from the ids before any layer runs, so the
         # forward asks for every row at its start. Value tables only: twice the rows of a neuron pool
         # for the same file size.
         "hashed": dict(pool_retrieval="hashed_ngram", ngram_orders=[2, 3], ngram_heads=4)}
ROWS_PER_ENTRY = {"hashed": 2}  # rows of a mode's pool per neuron entry of the same file size


@dataclass
class PoolScaleArguments:
    max_params: float = field(default=1e10, metadata={"help": "Largest pool, in parameters."})
    new_tokens: int = 64
    prompt_len: int = 16
    work_dir: str = field(default=tempfile.gettempdir(), metadata={"help": "Pool files go to a temporary folder here."})
    output_dir: str = "eval/results"
    modes: str = field(default="product_key,coordinate,hashed", metadata={"help": "Comma-separated retrieval modes."})
    only_largest: bool = field(default=False, metadata={"help": "Measure the 2^16 reference and the largest pool only."})
    # The measuring subprocess (_run_measure): one checkpoint folder and how to load it.
    measure: str | None = field(default=None, metadata={"help": argparse.SUPPRESS})
    load: str | None = field(default=None, metadata={"help": argparse.SUPPRESS, "choices": ["mmap", "ram"]})


def measure(path: str, load: str, prompt_len: int, new_tokens: int) -> dict:
    """Runs in the subprocess: load, generate, report speed and peak memory."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from modeling_dpsnr import DPSNRForCausalLM

    torch.set_num_threads(1)
    if load == "mmap":
        for f in Path(path).glob("pool*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    start = time.perf_counter()
    model = DPSNRForCausalLM.from_pretrained(path, pool_mmap=load == "mmap")
    load_s = time.perf_counter() - start
    rss_loaded = _status_kb("VmRSS")

    class Clock(LogitsProcessor):  # called once per generated token
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def prompt(seed):
        return torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))

    speeds = []
    # A warm-up on another prompt (first-call costs of torch and generate), then the timed prompt
    # cold, then the timed prompt again with every page it reads cached.
    for ids in (prompt(1), prompt(0), prompt(0)):
        clock = Clock()
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                           logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
        speeds.append(1.0 / torch.tensor(clock.times).diff().median().item())
    speeds = speeds[1:]
    return {"tokens_per_s": speeds[0], "tokens_per_s_repeat": speeds[1], "load_s": load_s,
            "rss_after_load_mb": rss_loaded / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _run_measure(path: Path, load: str, args) -> dict:
    cmd = [sys.executable, "-m", "dpsnr.eval.bench_pool_scale", "--measure", str(path), "--load", load,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"measurement of {path} ({load}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _build(entries: int, root: Path, modes: list[str]) -> dict[str, Path]:
    """fp16 pool files of the size of `entries` neuron entries and one controller per retrieval mode:
    the neuron modes share one file (hard-linked), the hashed mode (value rows) has its own."""
    from dpsnr.pool_tool import init_checkpoint, init_controller, load_config

    dirs = {mode: root / f"{mode}-{entries}" for mode in modes}
    neuron = [m for m in modes if m not in ROWS_PER_ENTRY]
    for mode in modes:
        fields = {"pool_size": entries * ROWS_PER_ENTRY.get(mode, 1), **MODES[mode]}
        if mode in ROWS_PER_ENTRY or mode == neuron[0]:
            init_checkpoint(load_config(MICRO, fields), dirs[mode], torch.float16, max_shard_size="100GB")
            continue
        dirs[mode].mkdir(parents=True)
        for f in dirs[neuron[0]].glob("pool*"):
            os.link(f, dirs[mode] / f.name)  # the same pool file, hard-linked
        init_controller(load_config(MICRO, fields), dirs[mode])
    if "coordinate" in dirs:
        _spread_windows(dirs["coordinate"])
    return dirs


def _spread_windows(path: Path) -> None:
    """Scale the position rows (even outputs) of every coordinate indexer's last layer by SPREAD."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    for key, w in weights.items():
        if key.endswith("retriever.indexer.2.weight"):
            w[0::2] *= SPREAD
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _plot(results: list[dict], path: Path) -> None:
    from dpsnr.eval.common import new_figure, save_figure

    fig, axes = new_figure(2)
    ax_speed, ax_rss = axes[0]
    for mode, color in zip(MODES, ("tab:blue", "tab:orange", "tab:green")):
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        x = [r["pool_params"] for r in rows]
        ax_speed.plot(x, [r["tokens_per_s"] for r in rows], "o-", color=color, label=f"{mode}, mapped (cold)")
        ax_speed.plot(x, [r["tokens_per_s_repeat"] for r in rows], "o:", color=color, alpha=0.5, label=f"{mode}, mapped (cached)")
        ax_speed.plot(x, [r["ram_2^16"]["tokens_per_s"] for r in rows], "x--", color=color, lw=1,
                      label=f"{mode}, 2^16 in RAM (paired)")
        ax_rss.plot(x, [r["peak_rss_mb"] for r in rows], "o-", color=color, label=f"{mode}, mapped")
        ax_rss.plot(x, [r["ram_2^16"]["peak_rss_mb"] for r in rows], "x--", color=color, lw=1, label=f"{mode}, 2^16 in RAM")
    ax_rss.axhline(2048, color="red", lw=1, label="2 GB target")
    for ax, label in ((ax_speed, "decode tokens/s"), (ax_rss, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("pool parameters (fp16 file = 2 bytes each)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_speed.set_title("micro controller, memory-mapped pool")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    from dpsnr.scripting import parse_dataclasses

    (args,) = parse_dataclasses((PoolScaleArguments,), argv, description=__doc__.split("\n\n")[0])
    if args.measure:
        print(json.dumps(measure(args.measure, args.load, args.prompt_len, args.new_tokens)))
        return {}

    from dpsnr.eval.common import json_line, write_json

    per_entry = 2 * 256  # neuron entry: u and v of width 256
    largest = int(args.max_params) // per_entry
    if largest <= 1 << 16:
        raise ValueError("--max-params must exceed the 2^16-entry reference pool (33.6M parameters).")
    steps = (1 << 16,) if args.only_largest else (1 << 16, 1 << 18, 1 << 20, 1 << 22)
    sizes = sorted({s for s in steps if s < largest} | {largest})
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"--modes: unknown {unknown}; known: {list(MODES)}")
    root = Path(tempfile.mkdtemp(prefix="bench_pool_scale-", dir=args.work_dir))
    results = []
    try:
        reference = _build(1 << 16, root, modes)  # kept for the whole run: the in-RAM reference
        for entries in sizes:
            start = time.perf_counter()
            dirs = reference if entries == 1 << 16 else _build(entries, root, modes)
            write_s = time.perf_counter() - start
            for mode, path in dirs.items():
                file_bytes = sum(f.stat().st_size for f in path.glob("pool*.safetensors"))
                ram = _run_measure(reference[mode], "ram", args)
                r = _run_measure(path, "mmap", args)
                results.append({"mode": mode, "entries": entries, "pool_params": entries * per_entry,
                                "pool_file_bytes": file_bytes, "write_s": write_s, **r, "ram_2^16": ram,
                                "decode_ratio_vs_ram": r["tokens_per_s"] / ram["tokens_per_s"],
                                "decode_ratio_cached_vs_ram": r["tokens_per_s_repeat"] / ram["tokens_per_s_repeat"]})
                print(json.dumps(results[-1]), file=sys.stderr)
            if dirs is not reference:
                for path in dirs.values():
                    shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    top = {r["mode"]: r for r in results if r["entries"] == largest}
    summary = {
        "benchmark": "bench_pool_scale", "controller": MICRO, "pool_dtype": "float16", "threads": 1,
        "largest_pool_params": largest * per_entry, "largest_pool_file_gb": max(r["pool_file_bytes"] for r in top.values()) / 1e9,
        **{f"{m}_decode_ratio_largest_vs_ram": top[m]["decode_ratio_vs_ram"] for m in top},
        **{f"{m}_decode_ratio_largest_cached_vs_ram": top[m]["decode_ratio_cached_vs_ram"] for m in top},
        **{f"{m}_tokens_per_s_largest": top[m]["tokens_per_s"] for m in top},
        **{f"{m}_tokens_per_s_ram_2^16": top[m]["ram_2^16"]["tokens_per_s"] for m in top},
        **{f"{m}_peak_rss_mb_largest": top[m]["peak_rss_mb"] for m in top},
        **{f"{m}_peak_rss_mb_ram_2^16": top[m]["ram_2^16"]["peak_rss_mb"] for m in top},
        "results": results,
    }
    out = Path(args.output_dir)
    write_json(out / "bench_pool_scale.json", summary)
    _plot(results, out / "bench_pool_scale.png")
    print(json_line({k: v for k, v in summary.items() if k != "results"}))
    return summary


if __name__ == "__main__":
    main()
