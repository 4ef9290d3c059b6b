"""The package layout follows the data flow; a stage never imports a later one (design.md section 1)."""

import ast
from pathlib import Path

import mmalign

ORDER = ["config", "progress", "tracking", "data", "models", "lab", "sampling", "objectives", "trainers",
         "evaluation", "recipes",
         "cli"]
RANK = {name: i for i, name in enumerate(ORDER)}
ROOT = Path(mmalign.__file__).parent


def _imported_stages(path: Path) -> set[str]:
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mmalign" and len(parts) > 1 and parts[1] in RANK:
                stages.add(parts[1])
    return stages


def test_no_stage_imports_a_later_stage():
    violations = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if len(rel) < 2 or rel[0] not in RANK:
            continue
        for stage in _imported_stages(path):
            if RANK[stage] > RANK[rel[0]]:
                violations.append(f"{path.relative_to(ROOT)} imports mmalign.{stage}")
    assert violations == []


def test_objectives_are_pure_math():
    for path in (ROOT / "objectives").rglob("*.py"):
        assert _imported_stages(path) <= {"objectives"}, path
