"""The dependency arrows point one way: purecc/ never imports Ray, cluster/ or services/."""

import ast
from pathlib import Path

FORBIDDEN = ("ray", "cluster", "services")


def test_purecc_imports_no_ray_cluster_or_services():
    root = Path(__file__).resolve().parents[1] / "purecc"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
