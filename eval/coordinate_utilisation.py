"""Does the quantile warp keep coordinate windows from collapsing? A small training run, twice.

The same model (same seed, same data order) is trained with `indexer_balance="none"` and with
`"quantile"`; before and after training, pool usage on held-out text is measured with the
statistics of `eval/pool_health.py` (Lample et al. 2019, sec. 4.3):
- % rows read: rows of a partition read at least once / its rows;
- KL(counts ‖ uniform) in nats: 0 when every row is read equally, log N when one row takes all.
Both are averaged over the partitions (each is also reported). Held-out loss shows what the
warp costs or gains in modelling.

Byte-level TinyStories (vocabulary 256) keeps the run small and tokenizer-free.
    dpsnr coordinate-utilisation [--steps 300] [--output-dir eval/results]
Prints one JSON line last; writes eval/results/coordinate_utilisation.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dpsnr.eval.common import json_line, write_json
from dpsnr.eval.pool_health import usage_statistics
from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM
from dpsnr.scripting import parse_dataclasses
from dpsnr.training.data import resolve_data_path

MODEL = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_prelude_layers=1,
    num_attention_heads=4, max_position_embeddings=256, pool_size=16384, pool_entry="value",
    pool_retrieval="coordinate", pool_heads=4, indexer_window=8, indexer_hidden_size=128, loop_max_steps=4,
    loop_min_steps=4,  # every step runs, so every partition is read and measured
)


def byte_stream(path) -> torch.Tensor:
    return torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8).long()


def usage(model: DPSNRForCausalLM, data: torch.Tensor, block: int) -> dict:
    model.eval()
    blocks = data[: data.numel() // block * block].view(-1, block)
    losses = []
    with torch.no_grad(), model.pool.track_usage() as counts:
        for batch in blocks.split(16):
            losses.append(model(batch, labels=batch).lm_loss.item())
    parts = {name: usage_statistics(u["counts"], u["mass"]) for name, u in counts.items()}
    read = [p for p in parts.values() if p["reads"]]
    mean = lambda key: sum(p[key] for p in read) / len(read)
    return {"frac_rows_read": mean("frac_rows_read"), "kl_uniform_counts": mean("kl_uniform_counts"),
            "heldout_loss": sum(losses) / len(losses),
            "partitions": {n: {k: p[k] for k in ("reads", "frac_rows_read", "kl_uniform_counts", "kl_max")} for n, p in parts.items()}}


def run(balance: str, train: torch.Tensor, heldout: torch.Tensor, steps: int, batch: int, block: int, seed: int,
        momentum: float) -> dict:
    torch.manual_seed(seed)
    model = DPSNRForCausalLM(DPSNRConfig(**MODEL, indexer_balance=balance, indexer_balance_momentum=momentum))
    record = {"before": usage(model, heldout, block)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        offsets = torch.randint(0, train.numel() - block, (batch,), generator=g)
        ids = torch.stack([train[o:o + block] for o in offsets.tolist()])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    record["train_seconds"] = time.perf_counter() - start
    record["final_train_loss"] = sum(losses[-20:]) / len(losses[-20:])
    record["after"] = usage(model, heldout, block)
    return record


@dataclass
class UtilisationArguments:
    steps: int = 300
    batch: int = 16
    block: int = 128
    seed: int = 0
    momentum: float = DPSNRConfig.indexer_balance_momentum
    balances: list[str] = field(default_factory=lambda: ["none", "quantile"])
    output_dir: str = "eval/results"


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_dataclasses((UtilisationArguments,), argv, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    data = byte_stream(resolve_data_path("tinystories/TinyStories-train.head-2316.txt"))
    cut = int(data.numel() * 0.95)
    train, heldout = data[:cut], data[cut:cut + 64 * args.block]
    runs = {b: run(b, train, heldout, args.steps, args.batch, args.block, args.seed, args.momentum) for b in args.balances}
    summary = {
        "benchmark": "coordinate_utilisation", "steps": args.steps, "momentum": args.momentum, "model": MODEL,
        **{f"{b}_{when}_{k}": runs[b][when][k] for b in runs for when in ("before", "after")
           for k in ("frac_rows_read", "kl_uniform_counts", "heldout_loss")},
        "runs": runs,
    }
    write_json(f"{args.output_dir}/coordinate_utilisation.json", summary)
    print(json_line({k: v for k, v in summary.items() if k not in ("runs", "model")}))
    return summary


if __name__ == "__main__":
    main()
