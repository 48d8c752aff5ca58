"""The package's stages import only downward: data ← sim ← policy ← training ← evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vla_pipeline"
STAGES = ["data", "sim", "policy", "training", "evaluation"]  # each may import only those before it
ROOT_MODULES = {"__init__.py", "cli.py", "definitions.py"}


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


def test_every_module_sits_in_a_stage():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").read_text().startswith('"""'), f"{stage}: no docstring"


def test_stages_import_only_the_stages_below():
    violations = []
    for stage in STAGES:
        allowed = set(STAGES[: STAGES.index(stage) + 1])
        for path in sorted((PACKAGE / stage).glob("*.py")):
            for module in imported_modules(path.read_text(), f"vla_pipeline.{stage}"):
                target = stage_of(module)
                if module.split(".")[0] in {"dagster", "assets", "resources"}:
                    violations.append(f"{path.relative_to(PACKAGE)} imports {module} (the library imports no Dagster)")
                elif module.split(".")[0] == "vla_pipeline" and target is None and module != "vla_pipeline":
                    violations.append(f"{path.relative_to(PACKAGE)} imports {module}, which is in no stage")
                elif target is not None and target not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE)} ({stage}) imports {module} ({target})")
    assert not violations, "\n".join(violations)


def test_the_walker_sees_imports_inside_functions():
    # A check that finds nothing must be able to find something.
    source = "import torch\ndef f():\n    from ..evaluation.metrics import DIRECTIONS\n    from . import store\n"
    found = imported_modules(source, "vla_pipeline.data")
    assert {"vla_pipeline.evaluation.metrics", "vla_pipeline.data.store", "torch"} <= found
    assert stage_of("vla_pipeline.evaluation.metrics") == "evaluation"
