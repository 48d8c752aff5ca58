"""The package's stages import only what lies below them, and the library imports no Dagster.

    data ← sim        (the simulated world: scenes, renderer, operator, env)
    data ← policy ← training
    data ← sim, policy ← evaluation   (evaluation never imports training)
    data ← policy ← serve             (the policy server and its robot-side client)

`settings.py` (every VLA_* variable) and `tracking.py` (where MLflow runs go) sit beside the
stages as their foundation: any stage may import them, and they import no stage.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vla_pipeline"
ALLOWED = {  # stage -> the stages its modules may import
    "data": {"data"},
    "sim": {"data", "sim"},
    "policy": {"data", "sim", "policy"},  # sim: the grounded backbone's pretraining frames
    "training": {"data", "policy", "training"},
    "evaluation": {"data", "sim", "policy", "evaluation"},
    "serve": {"data", "policy", "serve"},
}
STAGES = list(ALLOWED)
FOUNDATION = {"vla_pipeline.settings", "vla_pipeline.tracking"}
ROOT_MODULES = {"__init__.py", "cli.py", "definitions.py", "settings.py", "tracking.py"}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a file of `package` imports, at any depth of the file, as absolute dotted names."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import metrics`
    return names


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "vla_pipeline" and len(parts) > 1 and parts[1] in STAGES else None


def in_foundation(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in FOUNDATION)


def test_every_module_sits_in_a_stage():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").read_text().startswith('"""'), f"{stage}: no docstring"


def test_stages_import_only_the_stages_below():
    violations = []
    for stage, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / stage).glob("*.py")):
            for module in imported_modules(path.read_text(), f"vla_pipeline.{stage}"):
                target = stage_of(module)
                if module.split(".")[0] in {"dagster", "assets", "resources"}:
                    violations.append(f"{path.relative_to(PACKAGE)} imports {module} (the library imports no Dagster)")
                elif in_foundation(module):
                    continue
                elif module.split(".")[0] == "vla_pipeline" and target is None and module != "vla_pipeline":
                    violations.append(f"{path.relative_to(PACKAGE)} imports {module}, which is in no stage")
                elif target is not None and target not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE)} ({stage}) imports {module} ({target})")
    for name in FOUNDATION:
        path = PACKAGE / f"{name.rpartition('.')[2]}.py"
        for module in imported_modules(path.read_text(), "vla_pipeline"):
            if stage_of(module) or module.split(".")[0] in {"dagster", "assets", "resources"}:
                violations.append(f"{path.name} (foundation) imports {module}")
    assert not violations, "\n".join(violations)


def test_the_walker_sees_imports_inside_functions():
    # A check that finds nothing must be able to find something.
    source = "import torch\ndef f():\n    from ..evaluation.metrics import DIRECTIONS\n    from . import store\n"
    found = imported_modules(source, "vla_pipeline.data")
    assert {"vla_pipeline.evaluation.metrics", "vla_pipeline.data.store", "torch"} <= found
    assert stage_of("vla_pipeline.evaluation.metrics") == "evaluation"
    assert "training" not in ALLOWED["evaluation"]


def test_the_library_loads_no_dagster_at_run_time():
    """What the walker cannot see (an import through a third party): every library module
    imported in a fresh process leaves no dagster module loaded."""
    modules = sorted(f"vla_pipeline.{p.parent.name}.{p.stem}" for stage in STAGES
                     for p in (PACKAGE / stage).glob("*.py") if p.stem != "__init__")
    modules += ["vla_pipeline.settings", "vla_pipeline.tracking"]
    code = ("import sys\n" + "".join(f"import {module}\n" for module in modules)
            + "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster'))))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    # dagster_pipes is the dependency-free library a launched training reports through
    assert [m for m in loaded.stdout.split() if not m.startswith("dagster_pipes")] == []
