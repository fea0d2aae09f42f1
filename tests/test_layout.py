"""The repository's structure: one installable namespace, one name per module."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_only_the_model_and_the_dpsnr_namespace_are_installed():
    options = _setup_cfg()["options"]
    packages = options["packages"].split()
    assert {p.split(".")[0] for p in packages} == {"modeling_dpsnr", "dpsnr"}, packages
    mapping = dict(line.split(" = ") for line in options["package_dir"].strip().splitlines())
    assert mapping == {"dpsnr.training": "training", "dpsnr.eval": "eval"}
    for package, folder in mapping.items():
        assert package in packages and (ROOT / folder / "__init__.py").is_file()


@pytest.mark.parametrize("folder", ["training", "eval"])
def test_a_folder_cannot_be_imported_under_a_second_name(folder):
    """`import training` from the repository root would give every class a second identity
    (training.trainer.DPSNRTrainer beside dpsnr.training.trainer.DPSNRTrainer)."""
    proc = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and f"package `dpsnr.{folder}`" in proc.stderr, proc.stderr[-2000:]


def test_the_namespace_binds_the_checkout_folders_once():
    code = ("import sys, dpsnr.training.trainer, dpsnr.eval.common; "
            "print(dpsnr.training.trainer.__file__); print(dpsnr.eval.common.__file__); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'eval')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    trainer, common, strays = out.splitlines()
    assert Path(trainer) == ROOT / "training" / "trainer.py" and Path(common) == ROOT / "eval" / "common.py"
    assert strays == "[]"
