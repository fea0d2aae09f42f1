"""The private `transformers.Trainer` API DPSNRTrainer relies on still exists, with the same
parameters, and the Trainer still calls the hooks it overrides.

A transformers release that renames `_save_checkpoint` would otherwise leave DPSNRTrainer's
override dead: checkpoints would silently fall back to pickles and non-atomic writes. Run against
the newest releases by scripts/ci_upstream.sh.
"""

import inspect

import pytest
import transformers
from transformers import Trainer, trainer_utils

from dpsnr.training.trainer import PRIVATE_TRAINER_API, DPSNRTrainer

# Module functions of transformers.trainer_utils used by CheckpointIO, with the keywords it passes.
TRAINER_UTILS_API = {"rotate_checkpoints": ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime")}
OVERRIDDEN = sorted(name for name in PRIVATE_TRAINER_API if name in vars(DPSNRTrainer))
RELEASE = f"transformers {transformers.__version__}"


def _parameters(function) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(function).parameters if p != "self")


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_API))
def test_private_trainer_method_exists_with_its_parameters(name):
    assert hasattr(Trainer, name), f"{RELEASE} has no Trainer.{name}, which DPSNRTrainer relies on (trainer.py)"
    expected = PRIVATE_TRAINER_API[name]
    got = _parameters(getattr(Trainer, name))
    assert got[: len(expected)] == expected, (
        f"{RELEASE} changed Trainer.{name}{got}; DPSNRTrainer relies on {name}{expected} (trainer.py)")


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_the_trainer_still_calls_each_overridden_hook(name):
    source = inspect.getsource(Trainer)
    assert f"self.{name}(" in source, f"{RELEASE}'s Trainer no longer calls {name}: DPSNRTrainer's override is dead"
    assert _parameters(getattr(DPSNRTrainer, name)) == PRIVATE_TRAINER_API[name]


@pytest.mark.parametrize("name", sorted(TRAINER_UTILS_API))
def test_trainer_utils_functions_exist_with_their_keywords(name):
    assert hasattr(trainer_utils, name), f"{RELEASE} has no trainer_utils.{name}, which CheckpointIO calls"
    missing = set(TRAINER_UTILS_API[name]) - set(_parameters(getattr(trainer_utils, name)))
    assert not missing, f"{RELEASE}: trainer_utils.{name} lost the keyword(s) {sorted(missing)} CheckpointIO passes"


def test_every_private_method_dpsnr_trainer_defines_is_listed():
    """A new private override must be added to PRIVATE_TRAINER_API, or this test cannot guard it."""
    private = {name for name in vars(DPSNRTrainer) if name.startswith("_") and not name.startswith("__")}
    assert private <= set(PRIVATE_TRAINER_API), sorted(private - set(PRIVATE_TRAINER_API))
