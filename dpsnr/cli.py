"""The `dpsnr` command: one entry point, a subcommand per task.

    dpsnr <command> [--config recipe.yaml] [--flag value ...]
    dpsnr <command> --help

Every command parses its flags into typed dataclasses (`transformers.HfArgumentParser`, see
dpsnr/scripting.py): `--config` names a YAML recipe of defaults, flags override it. A command's
module is imported only when it runs, so `dpsnr --help` stays fast. The top layer of the package:
it imports everything, nothing imports it.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from .scripting import setup_script_logging


@dataclass(frozen=True)
class Command:
    module: str  # its `main(argv)` runs the command
    summary: str
    example: str


COMMANDS: dict[str, Command] = {
    # training
    "train": Command("dpsnr.training.train", "train or fine-tune DPSN-R from a recipe",
                     "dpsnr train --config configuration/recipes/micro-tinystories.yaml"),
    "tokenizer": Command("dpsnr.training.tokenizer", "train a byte-level BPE tokenizer",
                         "dpsnr tokenizer --files data/tinystories/TinyStories-train.head-2316.txt --vocab-size 4096 --output-dir tok"),
    # evaluation of a model folder
    "perplexity": Command("dpsnr.eval.perplexity", "sliding-window perplexity of any causal LM",
                          "dpsnr perplexity --model runs/micro-tinystories --dataset tinystories --max-length 256 --stride 128"),
    "analytics": Command("dpsnr.eval.reasoning_analytics", "reasoning steps per token class, steps vs loss",
                         "dpsnr analytics --model runs/micro-tinystories --dataset tinystories"),
    "exit-curve": Command("dpsnr.eval.exit_curve", "perplexity vs mean steps as a trained-exit model's threshold moves",
                          "dpsnr exit-curve --model runs/micro-tinystories-exits --dataset tinystories --split validation"),
    "pool-health": Command("dpsnr.eval.pool_health", "how evenly each pool partition is read",
                           "dpsnr pool-health --model runs/micro-tinystories --dataset tinystories"),
    "generate": Command("dpsnr.eval.generate", "generate text with per-token reasoning statistics",
                        'dpsnr generate --model runs/micro-tinystories --prompt "Once upon a time"'),
    # experiments and benchmarks
    "compare": Command("dpsnr.eval.compare", "DPSN-R vs a dense twin and ablations at an equal token budget",
                       "dpsnr compare --jobs 2"),
    "study": Command("dpsnr.eval.study", "the loop and pool study grid: run, one, report",
                     "dpsnr study run --grid configuration/studies/loop_pool.yaml --jobs 2"),
    "retrofit-study": Command("dpsnr.eval.retrofit_study", "retrofitted memories vs plain fine-tuning of a pretrained dense model",
                              "dpsnr retrofit-study --tokens 358400"),
    "bench-throughput": Command("dpsnr.eval.bench_throughput", "train/decode tokens/s vs the dense twin and pool size",
                                "dpsnr bench-throughput --repeats 3"),
    "profile-step": Command("dpsnr.eval.profile_step", "torch.profiler tables of a training step and of decoding",
                            "dpsnr profile-step --device cuda --batch 32 --block 256"),
    "bench-optimizer": Command("dpsnr.eval.bench_optimizer", "pool optimizer step time as the pool grows",
                               "dpsnr bench-optimizer --max-log2-rows 18"),
    "bench-pool-scale": Command("dpsnr.eval.bench_pool_scale", "decode speed and memory of memory-mapped pools",
                                "dpsnr bench-pool-scale --max-params 1e9"),
    "coordinate-utilisation": Command("dpsnr.eval.coordinate_utilisation", "does the quantile warp spread coordinate reads",
                                      "dpsnr coordinate-utilisation --steps 300"),
    "results-page": Command("dpsnr.eval.make_results_page", "docs/results.md from eval/results/*.json",
                            "dpsnr results-page"),
    # checkpoint folders
    "publish": Command("dpsnr.hub.publish", "assemble a Hub-ready folder with its model card; --push uploads it",
                       "dpsnr publish --checkpoint runs/micro-tinystories --preset micro --output-dir hub/micro"),
    "presets": Command("dpsnr.preset_counts", "count every preset's parameters (meta device) as presets.py states them",
                       "dpsnr presets --names debug tiny"),
    "pool-tool": Command("dpsnr.pool_tool", "init, grow or verify a pool on disk larger than RAM",
                         "dpsnr pool-tool init --preset tiny --out dpsnr-tiny"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dpsnr <command> [--config recipe.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "`dpsnr <command> --help` lists a command's flags. Example:",
              f"  {COMMANDS['train'].example}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (errors raise, with their traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"dpsnr {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\ndpsnr: unknown command {name!r}", file=sys.stderr)
        return 2
    setup_script_logging()
    module = importlib.import_module(COMMANDS[name].module)
    # As if the command were its own program: argparse names it after sys.argv[0] ("usage: dpsnr train
    # ..."), and records that quote their command line read sys.argv.
    saved, sys.argv = sys.argv, [f"dpsnr {name}", *rest]
    try:
        module.main(rest)  # mains return their record (for tests and notebooks); the command's status is 0
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
