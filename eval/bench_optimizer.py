"""Pool optimizer step time as the pool grows: SparseRowAdam vs dense AdamW vs torch SparseAdam.

Metric: median wall time of ``optimizer.step()`` alone (the gradient is already in ``p.grad``;
no forward, backward or zero_grad is timed) on a pool table of N rows x d columns (fp32), for
N = 2^16 .. 2^24, for one training batch of lookups: ``--tokens`` x ``--rows-per-token`` rows
(default 4096 x 32 = 131,072 lookups) with repeated rows, given as the uncoalesced row-sparse
COO gradient that ``F.embedding_bag(..., sparse=True)`` produces (indices (1, nnz), values
(nnz, d)). Each timed step gets a different batch, so touched rows change from step to step
as in training and the cache is not warm with them.

The machine is shared, so every step is timed twice: wall time (``time.perf_counter``) and
process CPU time (``time.process_time``). With one thread (the default) CPU time is the wall
time the step would take if it were not preempted by other jobs; the headline ratios use the
median CPU time, and the same ratios from median wall time are reported beside them.

Three ways of drawing a batch:
- ``fixed`` (headline): the batch reads exactly ``--distinct-rows`` distinct rows (default
  32,768; ~4 lookups each) placed uniformly at random over the pool. The number of touched
  rows is the same at every N, so step(2^24) / step(2^16) measures how the step grows with N
  alone. Target for SparseRowAdam: <= 1.5. Any growth left comes from where the rows are:
  at 2^16 the table and its state fit in the last-level cache, at 2^24 each row is a cache
  and TLB miss.
- ``local`` (control): as ``fixed`` but the rows are drawn from the first 2^min-log2-rows rows
  of the pool. The touched rows and their addresses are those of the smallest pool, so
  step(2^24, local) / step(2^16) isolates any cost that grows with N itself (expected ~1).
- ``uniform``: lookups uniform over the pool. Touched rows grow with N (about 57k of 131k
  lookups are distinct at 2^16, almost all at 2^24), so this ratio also contains the growth of
  the work itself; reported with the touched-row counts.

Compared in the same run, on the same table: SparseRowAdam (full and row-wise second moment),
torch.optim.SparseAdam (``fixed`` batches), and dense torch.optim.AdamW (weight_decay=0; the
default single-tensor path and ``fused=True``) on a dense gradient of one batch, run only where
param + grad + 2 moments + one temporary fit in available RAM. Target: dense AdamW /
SparseRowAdam at the largest size >= 50x. Also timed: the dedup alone, torch's
``Tensor.coalesce()`` vs the segmented sum inside SparseRowAdam.

Setup choices: one torch thread by default (``--threads``): on a 2-core machine shared with
other jobs, two-thread kernels wait for a descheduled thread and their timings come out in
scheduler quanta. Optimizer state is written once before timing, so first-touch page faults are
not timed (a long run has touched every page). d = 32 so that dense AdamW at 2^24 rows
(4 x 2 GiB plus a temporary) fits a 24 GiB machine with room for other work; d = 64 would need
~20 GiB. Prints one JSON line last; writes eval/results/bench_optimizer.json and .png.

    dpsnr bench-optimizer                      # full run, 3-5 minutes on 2 shared cores
    dpsnr bench-optimizer --max-log2-rows 18   # quick run
"""

from __future__ import annotations

import os

# Back large tensors with transparent huge pages (torch's c10 allocator reads this once, at its
# first allocation, so it is set before torch is imported): fewer TLB misses on random rows of
# a multi-GiB table. Dense AdamW gets the same setting. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from dpsnr.scripting import parse_dataclasses  # noqa: E402
from dpsnr.training.pool_optim import SparseRowAdam, segment_sum  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse invariant checks")

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
SAMPLINGS = ("fixed", "local", "uniform")
Timing = tuple[float, float, float]  # (median wall, min wall, median CPU) milliseconds


@dataclass
class BenchOptimizerArguments:
    """Pool sizes, batch shape and repeats of the benchmark (see the module docstring)."""

    min_log2_rows: int = 16
    max_log2_rows: int = 24
    log2_step: int = field(default=2, metadata={"help": "Pool sizes 2^min, 2^(min+step), ..."})
    dim: int = field(default=32, metadata={"help": "Entry width d (fp32)."})
    tokens: int = 4096
    rows_per_token: int = 32
    distinct_rows: int = field(default=32768, metadata={"help": "Touched rows per batch in fixed/local."})
    repeats: int = field(default=15, metadata={"help": "Timed steps per sparse optimizer."})
    dense_repeats: int = field(default=3, metadata={"help": "Timed steps per dense optimizer."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (see the module docstring)."})
    seed: int = 0


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere assume the dense baseline fits."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_batch(num_rows: int, args: BenchOptimizerArguments, sampling: str, gen: torch.Generator) -> torch.Tensor:
    """One uncoalesced row-sparse gradient (num_rows, d), the layout of embedding_bag's backward."""
    nnz = args.tokens * args.rows_per_token
    if sampling == "uniform":
        index = torch.randint(0, num_rows, (nnz,), generator=gen)
    else:
        span = min(num_rows, 2**args.min_log2_rows) if sampling == "local" else num_rows
        distinct = min(args.distinct_rows, span, nnz)
        # Distinct rows without an O(N) randperm: draw with replacement, dedup, top up.
        chosen = torch.unique(torch.randint(0, span, (2 * distinct,), generator=gen))
        while chosen.numel() < distinct:
            chosen = torch.unique(torch.cat([chosen, torch.randint(0, span, (distinct,), generator=gen)]))
        chosen = chosen[torch.randperm(chosen.numel(), generator=gen)[:distinct]]
        # Every chosen row is read at least once; the other lookups repeat them.
        repeats = chosen[torch.randint(0, distinct, (nnz - distinct,), generator=gen)]
        index = torch.cat([chosen, repeats])[torch.randperm(nnz, generator=gen)]
    values = torch.randn(nnz, args.dim, generator=gen)
    return torch.sparse_coo_tensor(index.unsqueeze(0), values, (num_rows, args.dim))


def time_calls(call: Callable[[int], object], warmup: int, repeats: int, before: Callable[[int], None] | None = None) -> Timing:
    """Timing of ``call(i)`` in ms over i past the warm-up; ``before(i)`` runs untimed."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        if before is not None:
            before(i)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        call(i)
        if i >= warmup:
            wall.append(1e3 * (time.perf_counter() - start_wall))
            cpu.append(1e3 * (time.process_time() - start_cpu))
    return statistics.median(wall), min(wall), statistics.median(cpu)


def prefault_state(opt: torch.optim.Optimizer) -> None:
    """Write every state buffer once, so first-touch page faults stay out of the timings."""
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.zero_()


def bench_size(num_rows: int, args: BenchOptimizerArguments, gen: torch.Generator) -> dict[str, Timing | int | None]:
    """All methods at one pool size: Timing per method in ms, None where skipped."""
    out: dict[str, Timing | int | None] = {}
    warmup = 3
    table = torch.nn.Parameter(torch.empty(num_rows, args.dim).fill_(0.01))
    batches = {s: [make_batch(num_rows, args, s, gen) for _ in range(warmup + args.repeats)] for s in SAMPLINGS}
    for sampling, grads in batches.items():
        out[f"touched_rows_{sampling}"] = int(torch.unique(grads[0]._indices()[0]).numel())

    def installer(grads: list[torch.Tensor]) -> Callable[[int], None]:
        def install(i: int) -> None:
            table.grad = grads[i]

        return install

    def step(opt: torch.optim.Optimizer) -> Callable[[int], object]:
        return lambda i: opt.step()

    for rowwise in (False, True):
        name = "sparse_row_adam" + ("_rowwise" if rowwise else "")
        opt = SparseRowAdam([table], lr=1e-3, rowwise_second_moment=rowwise)
        prefault_state(opt)
        for sampling, grads in batches.items():
            out[f"{name}_{sampling}"] = time_calls(step(opt), warmup, args.repeats, installer(grads))
        del opt

    # torch.optim.SparseAdam allocates its (dense) state at the first, warm-up, step.
    opt = torch.optim.SparseAdam([table], lr=1e-3)
    out["torch_sparse_adam_fixed"] = time_calls(step(opt), warmup, args.repeats, installer(batches["fixed"]))
    del opt

    # Dedup alone: torch's coalesce() vs the segmented sum inside SparseRowAdam.
    grads = batches["fixed"]
    out["coalesce_fixed"] = time_calls(lambda i: grads[i].coalesce(), warmup, args.repeats)
    out["segment_sum_fixed"] = time_calls(
        lambda i: segment_sum(grads[i]._indices()[0], grads[i]._values()), warmup, args.repeats
    )
    table.grad = None
    del batches, grads
    gc.collect()

    # Dense AdamW holds param + grad + exp_avg + exp_avg_sq, and the default path allocates
    # one more table-sized temporary (its denominator); keep 1 GiB to spare.
    table_bytes = table.numel() * table.element_size()
    fits = available_bytes() > 5 * table_bytes + GIB
    for name, fused in (("dense_adamw", False), ("dense_adamw_fused", True)):
        out[name] = None
        if not fits:
            continue
        table.grad = make_batch(num_rows, args, "fixed", gen).to_dense()
        opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.0, fused=fused)
        out[name] = time_calls(step(opt), 1, args.dense_repeats)
        table.grad = None
        del opt
        gc.collect()
    del table
    gc.collect()
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["log2_rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, series in results["median_cpu_ms"].items():
        points = [(s, t) for s, t in zip(sizes, series) if t is not None]
        if not points or name.startswith(("coalesce", "segment_sum")):
            continue
        style = {"_uniform": "--", "_local": ":"}.get(name[name.rfind("_"):], "-")
        ax.plot(*zip(*points), style, marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("log2(pool rows)")
    ax.set_ylabel("median optimizer.step() CPU time [ms]")
    ax.set_title(
        f"Pool optimizer step, d={results['dim']} fp32, {results['lookups']} lookups per batch, "
        f"{results['distinct_rows']} distinct (fixed/local), {results['threads']} thread(s)",
        fontsize=8,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_dataclasses((BenchOptimizerArguments,), argv, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    log2_sizes = list(range(args.min_log2_rows, args.max_log2_rows + 1, args.log2_step))
    if log2_sizes[-1] != args.max_log2_rows:
        log2_sizes.append(args.max_log2_rows)
    start = time.perf_counter()
    per_size = [bench_size(2**log2_rows, args, gen) for log2_rows in log2_sizes]
    methods = [k for k in per_size[0] if not k.startswith("touched_rows")]

    def column(method: str, which: int) -> list[float | None]:
        return [None if r[method] is None else round(r[method][which], 3) for r in per_size]

    wall, wall_min, cpu = ({m: column(m, k) for m in methods} for k in range(3))

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or den is None else round(num / den, 2)

    def growth(method: str, base: str = "", times: dict = cpu) -> float | None:
        """Step time at the largest pool / at the smallest (of ``base`` if given)."""
        return ratio(times[method][-1], times[base or method][0])

    def speedup(baseline: str, method: str = "sparse_row_adam_fixed", times: dict = cpu) -> float | None:
        return ratio(times[baseline][-1], times[method][-1])

    headline = cpu["sparse_row_adam_fixed"]
    results = {
        "benchmark": "bench_optimizer",
        "metric": "median optimizer.step() time [ms] per pool size, CPU and wall; ratios of medians of CPU time",
        "dim": args.dim,
        "dtype": "float32",
        "lookups": args.tokens * args.rows_per_token,
        "distinct_rows": args.distinct_rows,
        "log2_rows": log2_sizes,
        "touched_rows": {s: [r[f"touched_rows_{s}"] for r in per_size] for s in SAMPLINGS},
        "median_cpu_ms": cpu,
        "median_wall_ms": wall,
        "min_wall_ms": wall_min,
        "sparse_row_adam_max_over_min_size": growth("sparse_row_adam_fixed"),
        "sparse_row_adam_rowwise_max_over_min_size": growth("sparse_row_adam_rowwise_fixed"),
        "sparse_row_adam_local_max_over_min_size": growth("sparse_row_adam_local", "sparse_row_adam_fixed"),
        "sparse_row_adam_uniform_max_over_min_size": growth("sparse_row_adam_uniform"),
        "sparse_row_adam_step_over_min_size": [ratio(t, headline[0]) for t in headline],
        "dense_adamw_over_sparse_row_adam_at_max": speedup("dense_adamw"),
        "dense_adamw_fused_over_sparse_row_adam_at_max": speedup("dense_adamw_fused"),
        "dense_adamw_over_sparse_row_adam_rowwise_at_max": speedup("dense_adamw", "sparse_row_adam_rowwise_fixed"),
        "torch_sparse_adam_over_sparse_row_adam_at_max": speedup("torch_sparse_adam_fixed"),
        "coalesce_over_segment_sum_at_max": speedup("coalesce_fixed", "segment_sum_fixed"),
        "wall_time_ratios": {
            "sparse_row_adam_max_over_min_size": growth("sparse_row_adam_fixed", times=wall),
            "sparse_row_adam_local_max_over_min_size": growth("sparse_row_adam_local", "sparse_row_adam_fixed", wall),
            "dense_adamw_over_sparse_row_adam_at_max": speedup("dense_adamw", times=wall),
            "dense_adamw_fused_over_sparse_row_adam_at_max": speedup("dense_adamw_fused", times=wall),
        },
        "targets": {"sparse_row_adam_max_over_min_size": "<= 1.5", "dense_adamw_over_sparse_row_adam_at_max": ">= 50"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "wall_s": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_optimizer.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "bench_optimizer.png")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
