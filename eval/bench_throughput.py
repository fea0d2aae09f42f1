"""Throughput of DPSN-R against its dense twin, and against its own pool size.

Metric, per model, in one process (so machine load hits every model alike):
- train tokens/s: forward + backward + optimizer step on batch × block random tokens (DPSN-R:
  sparse pool gradients with SparseRowAdam for the tables and AdamW for the rest, as DPSNRTrainer
  runs it; dense: AdamW), after warm-up steps;
- decode tokens/s: greedy `generate`, batch 1, KV cache, --new-tokens after a --prompt-len prompt,
  prefill included, after a warm-up generation; with --compile-decode every model decodes through a
  static KV cache with torch.compile'd decoding steps (compiled in the warm-up);
- FLOPs per token from the cost model (modeling_dpsnr/cost.py; the dense twin's blocks counted with
  the same arithmetic) at the loop's measured mean steps, and achieved GFLOP/s = FLOPs/token × tokens/s;
- trained exits train every exit, as the main job does (--exit-samples N: N drawn earlier exits per forward);
- when the halting policy is adaptive, the same model with every step run (`loop_halting="fixed"`):
  the measured speed-up of halting against the cost model's (`*_time_follows_steps`, 1.0 = exact).
Models are measured in alternation (A B A B ...) --repeats times and the median reported, so a
slow spell of a shared machine does not land on one model only. Ratios are what to read.

The dense twin is a transformers `LlamaForCausalLM` with the controller's dimensions (hidden,
layers, heads, MLP, vocabulary) and no pool or loop. The pool sweep keeps everything but
`pool_size` (same heads, k, steps): flat compute means the ratios stay near 1.

    dpsnr bench-throughput [--overrides '{loop_step: block}'] [--sizes 12 14 16 18 20] [--repeats 3]
Writes eval/results/bench_throughput.json and .png; prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def dense_twin(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    ))


def dense_flops(model, context: float) -> float:
    from modeling_dpsnr.cost import block_macs

    c = model.config
    macs = c.num_hidden_layers * block_macs(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                            c.hidden_size // c.num_attention_heads, c.intermediate_size, context)
    return 2 * (macs + c.hidden_size * c.vocab_size)


def compiled_decoding(device: torch.device) -> dict:
    """generate kwargs for a static KV cache and torch.compile'd decoding steps (transformers' own path:
    it compiles the decoding forward once per cache shape). transformers does so by itself on CUDA only;
    `_compile_all_devices` is its switch for other devices. No CUDA graphs off CUDA."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False) if device.type == "cuda" else \
        CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


class Bench:
    """One model with its optimizer, ready to time train steps and greedy decoding."""

    def __init__(self, name: str, model, dpsnr: bool, args):
        self.name, self.model, self.dpsnr, self.args = name, model, dpsnr, args
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        device = next(model.parameters()).device
        self.batch = torch.randint(0, vocab, (args.batch, args.block), generator=g).to(device)
        self.prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g).to(device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if dpsnr:
            from dpsnr.training.pool_optim import SparseRowAdam

            model.set_execution(pool_sparse_grads=True)
            if model.config.loop_halting == "exits" and args.exit_samples:
                model.set_execution(exit_samples=args.exit_samples)
            pool = {id(p) for p in model.pool.entry_parameters()}
            self.opts = [torch.optim.AdamW([p for p in model.parameters() if id(p) not in pool], lr=1e-3),
                         SparseRowAdam(model.pool.entry_parameters(), lr=1e-3)]
        else:
            self.opts = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
        self.decode_kwargs = compiled_decoding(device) if args.compile_decode else {}
        self.train_steps_measured: list[float] = []
        self.mean_steps = None  # training forward's mean loop steps
        self.decode_mean_steps = None

    def train_step(self) -> None:
        out = self.model(self.batch, labels=self.batch)
        out.loss.backward()
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.dpsnr:
            self.mean_steps = out.reasoning_steps.float().mean().item()

    def train_tokens_per_second(self, steps: int) -> float:
        self.model.train()
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        self.sync()
        return steps * self.batch.numel() / (time.perf_counter() - start)

    @torch.no_grad()
    def decode_tokens_per_second(self) -> float:
        self.model.eval()
        n = self.args.new_tokens
        self.sync()
        start = time.perf_counter()
        self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **self.decode_kwargs)
        self.sync()
        return n / (time.perf_counter() - start)

    @torch.no_grad()
    def measure_decode_steps(self) -> None:
        """Mean loop steps of the generated tokens (untimed; the halting policy's inference rule)."""
        if self.dpsnr:
            self.model.eval()
            n = self.args.new_tokens
            _, stats = self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           return_reasoning_stats=True)
            self.decode_mean_steps = float(stats["avg_loops"])

    def flops_per_token(self, training: bool) -> float:
        context = (self.args.block + 1) / 2
        if self.dpsnr:
            steps = self.mean_steps if training else self.decode_mean_steps
            return self.model.estimate_flops(steps=steps, context=context, training=training)
        return dense_flops(self.model, context) * (3 if training else 1)


def measure(benches: list[Bench], args) -> dict:
    for b in benches:  # warm-up: allocator, optimizer state, first-call paths
        b.model.train()
        for _ in range(args.warmup):
            b.train_step()
        b.decode_tokens_per_second()
    train = {b.name: [] for b in benches}
    decode = {b.name: [] for b in benches}
    for _ in range(args.repeats):  # alternate, so machine load spreads over every model
        for b in benches:
            train[b.name].append(b.train_tokens_per_second(args.steps))
            decode[b.name].append(b.decode_tokens_per_second())
    out = {}
    for b in benches:
        b.measure_decode_steps()
        tr, de = statistics.median(train[b.name]), statistics.median(decode[b.name])
        f_train, f_fwd = b.flops_per_token(True), b.flops_per_token(False)
        out[b.name] = {
            "train_tokens_per_second": round(tr, 1), "decode_tokens_per_second": round(de, 1),
            "train_repeats": [round(x, 1) for x in train[b.name]], "decode_repeats": [round(x, 1) for x in decode[b.name]],
            "flops_per_token_train": f_train, "flops_per_token_forward": f_fwd,
            "achieved_gflops_train": round(f_train * tr / 1e9, 3), "mean_steps": b.mean_steps,
            "decode_mean_steps": b.decode_mean_steps,
            "params": sum(p.numel() for p in b.model.parameters()),
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro")
    p.add_argument("--overrides", default="{}", help="config fields as a YAML mapping (default: the preset as is)")
    p.add_argument("--sizes", type=int, nargs="*", default=[12, 14, 16, 18, 20], help="pool sizes 2^s for the sweep")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="train steps per timing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--exit-samples", type=int, default=0,
                   help="trained exits: earlier exits drawn per training forward (default 0: all of them, as the main job)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode every model through a static KV cache with torch.compile'd decoding steps (training stays eager)")
    p.add_argument("--output", default=str(RESULTS / "bench_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_decode:  # one compiled decoding step per model instance: more than dynamo's default 8 here
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    from dpsnr.eval.common import git_revision
    from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

    overrides = yaml.safe_load(args.overrides) or {}
    torch.manual_seed(0)
    cfg = DPSNRConfig.from_preset(args.preset, **overrides)
    dpsnr = Bench("dpsnr", DPSNRForCausalLM(cfg).to(args.device), True, args)
    dense = Bench("dense_twin", dense_twin(cfg).to(args.device), False, args)
    benches = [dpsnr, dense]
    if cfg.loop_halting != "fixed":  # the same model running every step: does time follow the steps?
        torch.manual_seed(0)
        fixed = DPSNRConfig.from_preset(args.preset, **{**overrides, "loop_halting": "fixed"})
        benches.append(Bench("dpsnr_every_step", DPSNRForCausalLM(fixed).to(args.device), True, args))
    twin = measure(benches, args)
    sweep = {}
    if args.sizes:
        benches = []
        for s in args.sizes:
            c = DPSNRConfig.from_preset(args.preset, **{**overrides, "pool_size": 2 ** s})
            benches.append(Bench(f"pool_2^{s}", DPSNRForCausalLM(c).to(args.device), True, args))
        sweep = measure(benches, args)
        del benches

    d, t = twin["dpsnr"], twin["dense_twin"]
    ratios = {"train_vs_dense": d["train_tokens_per_second"] / t["train_tokens_per_second"],
              "decode_vs_dense": d["decode_tokens_per_second"] / t["decode_tokens_per_second"],
              "flops_ratio_train": t["flops_per_token_train"] / d["flops_per_token_train"]}
    if "dpsnr_every_step" in twin:
        # measured speed-up of adaptive halting over running every step, against the cost model's
        # (FLOPs at max steps / FLOPs at the measured mean): 1.0 = time follows the steps exactly
        f = twin["dpsnr_every_step"]
        for mode, key, fkey in (("train", "train_tokens_per_second", "flops_per_token_train"),
                                ("decode", "decode_tokens_per_second", "flops_per_token_forward")):
            speedup, ideal = d[key] / f[key], f[fkey] / d[fkey]
            ratios[f"{mode}_speedup_vs_every_step"] = speedup
            ratios[f"{mode}_ideal_speedup_vs_every_step"] = ideal
            ratios[f"{mode}_time_follows_steps"] = speedup / ideal
    if 14 in args.sizes and 20 in args.sizes:
        lo, hi = sweep["pool_2^14"], sweep["pool_2^20"]
        ratios["train_pool_2^20_vs_2^14"] = hi["train_tokens_per_second"] / lo["train_tokens_per_second"]
        ratios["decode_pool_2^20_vs_2^14"] = hi["decode_tokens_per_second"] / lo["decode_tokens_per_second"]
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    report = {
        "metric": "tokens/s (median of repeats, models alternated in one process) and their ratios",
        "command": "dpsnr bench-throughput " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        **git_revision(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"}, "config_overrides": overrides,
        "twin": twin, "pool_sweep": sweep, "ratios": ratios,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _plot(report, out.with_suffix(".png"))
    line = {"metric": "train / decode tokens/s ratios", **ratios, "results": str(out)}
    print(json.dumps(line))
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(report["twin"])
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], [report["twin"][n]["train_tokens_per_second"] for n in names], 0.4, label="train")
    axes[0].bar([i + 0.2 for i in x], [report["twin"][n]["decode_tokens_per_second"] for n in names], 0.4, label="decode")
    axes[0].set_xticks(list(x), names)
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("DPSN-R vs dense twin")
    axes[0].legend()
    if report["pool_sweep"]:
        sizes = [int(k.split("^")[1]) for k in report["pool_sweep"]]
        for key, label in (("train_tokens_per_second", "train"), ("decode_tokens_per_second", "decode")):
            axes[1].plot(sizes, [v[key] for v in report["pool_sweep"].values()], marker="o", label=label)
        axes[1].set_xlabel("pool size (log2 entries)")
        axes[1].set_ylabel("tokens/s")
        axes[1].set_title("flat in pool size?")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
