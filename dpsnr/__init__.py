"""DPSN-R's tools around the model: training, evaluation, publishing and the `dpsnr` command.

    modeling_dpsnr       the model; also the remote code shipped to the Hub, so a flat package of its own
    dpsnr.training       data, tokenizers, DPSNRTrainer and its callbacks, pool optimizer, parallelism
    dpsnr.eval           perplexity, reasoning analytics, pool health, benchmarks, studies, generation
    dpsnr.hub            Hub-ready folders and their model cards
    dpsnr.pool_tool      pools on disk larger than RAM: init, grow, verify
    dpsnr.cli            the `dpsnr` command

The repository keeps `training/` and `eval/` as top-level folders (DESIGN.md §1). setup.cfg installs
them as `dpsnr.training` and `dpsnr.eval` (`package_dir`), so nothing named `training` or `eval`
lands in site-packages. Run from a checkout without installing, the two names are bound to those
folders below; either way each module has exactly one name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# Subpackages whose code lives in a top-level folder of the repository (setup.cfg `package_dir`).
CHECKOUT_FOLDERS = ("training", "eval")


def _bind_checkout_folders() -> None:
    """In a checkout (this folder beside setup.cfg, no installed copy inside it), import
    `training/` and `eval/` as `dpsnr.training` and `dpsnr.eval`. An installed wheel has the
    folders inside this package and an editable install's finder maps them to the same files,
    so both are left alone."""
    here = Path(__file__).resolve().parent
    root = here.parent
    if not (root / "setup.cfg").is_file():
        return
    for name in CHECKOUT_FOLDERS:
        qualified = f"{__name__}.{name}"
        init = root / name / "__init__.py"
        if qualified in sys.modules or (here / name).is_dir() or not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(qualified, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
        setattr(sys.modules[__name__], name, module)


_bind_checkout_folders()
