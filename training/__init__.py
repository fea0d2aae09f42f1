"""Training side of DPSN-R (installed as `dpsnr.training`): data pipeline, tokenizers, trainer and
its callbacks, pool optimizer, parallelism."""

# One name per module: a second copy under a top-level `training` would hold its own classes
# (DPSNRTrainer twice, isinstance failing between them), and the name collides with other projects.
if __name__ != "dpsnr.training":
    raise ImportError(
        f"this folder is the package `dpsnr.training`, imported here as {__name__!r}: use "
        "`import dpsnr.training` (or the `dpsnr` command, e.g. `dpsnr train --config recipe.yaml`)"
    )
