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


def _imported_modules(path: Path, root: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    # a module's package is its folder (for __init__.py that is the package itself)
    package = list(path.relative_to(root.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]  # `from purecc import testbed`
    return names


def test_the_method_never_imports_the_testbed():
    """Only the synthetic testbed (purecc/testbed/) builds on the method, never the other way round."""
    root = Path(__file__).resolve().parents[1] / "purecc"
    testbed = root / "testbed"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if testbed in path.parents:
            continue
        offenders += [f"{path.relative_to(root.parent)}: {n}" for n in _imported_modules(path, root)
                      if n == "purecc.testbed" or n.startswith("purecc.testbed.")]
    assert not offenders, offenders
