"""Evaluation of DPSN-R (installed as `dpsnr.eval`): perplexity, reasoning analytics, pool health,
benchmarks, studies, generation with reasoning statistics, plots."""

# One name per module (see dpsnr/training/__init__.py): never a second copy under a top-level `eval`.
if __name__ != "dpsnr.eval":
    raise ImportError(
        f"this folder is the package `dpsnr.eval`, imported here as {__name__!r}: use "
        "`import dpsnr.eval` (or the `dpsnr` command, e.g. `dpsnr perplexity --model PATH`)"
    )
