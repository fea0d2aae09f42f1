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


# ---------------------------------------------------------------------------- layering
# model ← data ← training ← experiments ← cli: a module imports only from its own layer or below.
# Longest prefix wins. dpsnr.scripting (argument parsing), dpsnr.pool_tool (pool files) and
# dpsnr.preset_counts need nothing but the model, so they sit right above it.
LAYERS = {
    "modeling_dpsnr": 0,
    "dpsnr": 1, "dpsnr.scripting": 1, "dpsnr.pool_tool": 1, "dpsnr.preset_counts": 1,
    "dpsnr.training.data": 2, "dpsnr.training.tokenizer": 2,
    "dpsnr.training": 3,
    "dpsnr.eval": 4, "dpsnr.hub": 4,
    "dpsnr.cli": 5, "dpsnr.__main__": 5,
}
SIBLINGS = ("dpsnr.eval", "dpsnr.hub")  # same layer, independent of each other
FOLDERS = {"modeling_dpsnr": "modeling_dpsnr", "dpsnr": "dpsnr", "training": "dpsnr.training", "eval": "dpsnr.eval"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement of one file."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from dpsnr import cli` imports the module dpsnr.cli
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top_level) for t in targets]
    return found


def _layer(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def test_no_import_points_up_the_layers_or_at_an_old_name():
    modules = _modules()
    problems = []
    for name, path in modules.items():
        for target, line, _ in _imports(name, path, set(modules)):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if target.split(".")[0] in ("training", "eval"):
                problems.append(f"{where}: the package is dpsnr.{target}")
            elif _layer(target) is not None and _layer(target) > _layer(name):
                problems.append(f"{where}: layer {_layer(target)} above its own {_layer(name)}")
            elif any(name.startswith(a) for a in SIBLINGS) and any(
                    target.startswith(b) and not name.startswith(b) for b in SIBLINGS):
                problems.append(f"{where}: eval and hub are independent")
    assert not problems, "\n".join(problems)


# eval/study.py runs study_report.py's `report`, which reads study.py's RESULTS: the two files belong
# to the loop and pool study, reworked in its own branch; their pair is left to that work.
KNOWN_CIRCLES = {frozenset({"dpsnr.eval.study", "dpsnr.eval.study_report"})}


def _circles(modules: dict[str, Path]) -> list[str]:
    """Import circles among `modules`, counting imports inside functions too (a lazy import still couples)."""
    graph = {name: {t for t, _, _ in _imports(name, path, set(modules)) if t in modules and t != name}
             for name, path in modules.items()}
    state, circles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a module needs its package's __init__: not a circle
                continue
            if state.get(nxt) == "open":
                circle = trail[trail.index(nxt):]
                if frozenset(circle) not in KNOWN_CIRCLES:
                    circles.append(" → ".join(circle + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return circles


@pytest.mark.parametrize("package", ["dpsnr", "modeling_dpsnr"])
def test_no_import_circle(package):
    """Within each package, counting imports inside functions too (a lazy import still couples)."""
    circles = _circles({k: v for k, v in _modules().items() if k.split(".")[0] == package})
    assert not circles, "\n".join(circles)


# ---------------------------------------------------------------------------- remote code
REMOTE_CODE_LIBRARIES = {"torch", "transformers", "safetensors"}


def test_remote_code_imports_only_what_a_flat_copy_can_resolve():
    """modeling_dpsnr/ is copied flat next to config.json: at module level its files import the standard
    library, torch, transformers and safetensors, and each other by `from .module import name` (the one
    form transformers follows when it copies the files a checkpoint needs)."""
    import ast

    problems = []
    for path in sorted((ROOT / "modeling_dpsnr").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module:
                    problems.append(f"{path.name}:{node.lineno}: use `from .module import name`")
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                if top != "__future__" and top not in sys.stdlib_module_names and top not in REMOTE_CODE_LIBRARIES:
                    problems.append(f"{path.name}:{node.lineno}: imports {name} at module level")
    assert not problems, "\n".join(problems)
