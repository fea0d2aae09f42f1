"""Where a training step and a decoded token spend their time: torch.profiler on the benchmark's model.

    dpsnr profile-step [--preset micro] [--device cpu|cuda] [--batch 8] [--block 128] [--output FILE]

Builds the model, batch and optimizers exactly as `dpsnr bench-throughput` does (its `Bench`), warms up,
times the phases of a few training steps apart (forward, backward, optimizer; synchronised on a GPU),
then profiles two training steps and one greedy generation and writes the operator tables (self CPU time,
and self device time on a GPU) to --output. The last line printed is one JSON summary: phase times, CPU
and device time per profiled step, operator calls and kernel launches per step, and the distinct rows
each pool table's gradient holds after one training step (the rows the optimizer reads and writes: they
grow with the pool until nearly every read lands on a row of its own). On a GPU, CPU time well above
device time means the step waits on kernel launches, not arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_times(bench, steps: int) -> dict:
    """Median milliseconds of forward, backward and optimizer step over `steps` training steps."""
    device = bench.batch.device
    out = {"forward_ms": [], "backward_ms": [], "optimizer_ms": []}
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = bench.model(bench.batch, labels=bench.batch).loss
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        for opt in bench.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        for key, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2)):
            out[key].append(dt * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def pool_rows_per_step(bench) -> dict[str, list[int]]:
    """[distinct rows its sparse gradient holds, rows of the table] for every pool table, after one
    forward and backward of the benchmark's batch; no optimizer step, gradients cleared after."""
    bench.model.zero_grad(set_to_none=True)
    bench.model(bench.batch, labels=bench.batch).loss.backward()
    rows = {name: [int(torch.unique(p.grad._indices()[0]).numel()), p.shape[0]]
            for name, p in bench.model.named_parameters() if p.grad is not None and p.grad.is_sparse}
    bench.model.zero_grad(set_to_none=True)
    return rows


def _totals(prof, steps: int, on_gpu: bool) -> dict:
    """Per step (or token): host time, operator calls and, on a GPU, device time and kernel launches."""
    events = prof.key_averages()
    out = {"cpu_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3 / steps, 2),
           "aten_calls": round(sum(e.count for e in events if e.key.startswith("aten::")) / steps, 1)}
    if on_gpu:
        device = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        out.update(device_ms=round(device / 1e3 / steps, 2), kernel_launches=round(launches / steps, 1))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro")
    p.add_argument("--overrides", default="{}", help="config fields as a YAML mapping")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed training steps for the phase times")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated in the profiled decode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25, help="operators per table")
    p.add_argument("--output", default=str(RESULTS / "profile_step.txt"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from dpsnr.eval.bench_throughput import Bench
    from dpsnr.eval.common import git_revision
    from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

    torch.manual_seed(0)
    cfg = DPSNRConfig.from_preset(args.preset, **(yaml.safe_load(args.overrides) or {}))
    bench_args = argparse.Namespace(batch=args.batch, block=args.block, prompt_len=32, new_tokens=args.new_tokens,
                                    exit_samples=0, compile_decode=False)
    bench = Bench("dpsnr", DPSNRForCausalLM(cfg).to(args.device), True, bench_args)
    bench.model.train()
    for _ in range(args.warmup):
        bench.train_step()
    phases = phase_times(bench, args.steps)
    rows = pool_rows_per_step(bench)

    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as train_prof:
        for _ in range(2):
            bench.train_step()
        _sync(device)
    bench.model.eval()
    bench.decode_tokens_per_second()  # warm the decoding path
    with profile(activities=activities) as decode_prof:
        bench.decode_tokens_per_second()

    summary = {"metric": "profile of a training step and of greedy decoding", "preset": args.preset,
               "device": args.device, "batch": [args.batch, args.block], **git_revision(),
               "train_phases": phases, "train_per_step": _totals(train_prof, 2, device.type == "cuda"),
               # the prompt's prefill included
               "decode_per_token": _totals(decode_prof, args.new_tokens, device.type == "cuda"),
               "pool_rows_per_step": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        f.write(json.dumps(summary) + "\n\n## training, two steps\n")
        f.write(train_prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
        f.write(f"\n\n## greedy decoding, {args.new_tokens} tokens\n")
        f.write(decode_prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    print(json.dumps({**summary, "results": str(out)}))
    return summary


if __name__ == "__main__":
    main()
