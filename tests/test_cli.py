"""The `dpsnr` command: one console script, a subcommand per task, flags from typed dataclasses and
a `--config` recipe."""

import configparser
import json
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from dpsnr import cli
from dpsnr.scripting import parse_dataclasses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    logger = logging.getLogger("dpsnr")
    monkeypatch.setattr(logger, "level", logger.level)  # the command raises it to INFO


def test_setup_cfg_installs_one_command():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = [line for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert scripts == ["dpsnr = dpsnr.cli:main"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help_under_its_own_name(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: dpsnr {name}" in out
    assert cli.COMMANDS[name].example.startswith(f"dpsnr {name}")


def test_overview_and_unknown_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_python_dash_m_dpsnr_is_the_command():
    res = subprocess.run([sys.executable, "-m", "dpsnr", "publish", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "usage: dpsnr publish" in res.stdout and "--push" in res.stdout


def test_installed_console_script_runs_as_a_program():
    script = Path(sys.executable).parent / "dpsnr"
    assert script.is_file(), "dpsnr not installed: pip install -e ."
    (entry,) = entry_points(group="console_scripts", name="dpsnr")
    assert entry.value == "dpsnr.cli:main"
    res = subprocess.run([str(script), "pool-tool", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "init" in res.stdout and "verify" in res.stdout


def test_a_recipe_sets_defaults_flags_override_it_and_typos_are_named(tmp_path):
    from dpsnr.eval.compare import ARGUMENT_TYPES

    recipe = tmp_path / "compare.yaml"
    recipe.write_text("datasets: [tinystories]\ntrain_tokens: 2048\njobs: 2\n")
    runs, budget, runner = parse_dataclasses(ARGUMENT_TYPES, ["--config", str(recipe), "--jobs", "1"])
    assert runs.datasets == ["tinystories"] and budget.train_tokens == 2048 and runner.jobs == 1
    recipe.write_text("train_tokenz: 2048\n")
    with pytest.raises(ValueError, match="train_tokenz"):
        parse_dataclasses(ARGUMENT_TYPES, ["--config", str(recipe)])
    with pytest.raises(ValueError, match="--dataset-variants 'tinystories=nope'"):
        parse_dataclasses(ARGUMENT_TYPES, ["--dataset-variants", "tinystories=nope"])


def test_a_recipe_can_give_a_required_argument(tmp_path):
    from dpsnr.eval.generate import GenerateArguments

    recipe = tmp_path / "generate.json"
    recipe.write_text(json.dumps({"model": "runs/x", "max_new_tokens": 3}))
    (args,) = parse_dataclasses((GenerateArguments,), ["--config", str(recipe)])
    assert (args.model, args.max_new_tokens) == ("runs/x", 3)


def test_pool_tool_init_and_verify_through_the_command(tmp_path, capsys):
    out = tmp_path / "pool"
    assert cli.main(["pool-tool", "init", "--preset", "debug", "--out", str(out),
                     "--config_overrides", "{pool_size: 1024}"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["out"] == str(out) and written["shards"] >= 1
    assert json.loads((out / "config.json").read_text())["pool_size"] == 1024
    assert cli.main(["pool-tool", "verify", "--dir", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verified_shards"] == written["shards"]

