"""Lower layers never import higher ones (DESIGN.md, 'one-way flow')."""

import ast
from pathlib import Path

import menseg

PKG = Path(menseg.__file__).parent
# Rank of each top-level module/package; a module may import only equal or lower ranks.
RANK = {
    "constants": 0, "errors": 0, "utils": 0, "config": 0, "device": 0, "geometry": 0, "regions": 0,
    "filters": 0, "draws": 0, "kmeans": 0,
    "data": 1,
    "synth": 2, "evaluate": 2,
    "nets": 3, "checkpoint": 3, "models": 3, "ism": 3, "sim2real": 3,
    "infer": 4, "review": 4,
    "train": 5,
    "bench": 6, "demo": 6,
    "cli": 7, "__main__": 7, "__init__": 0,
}


def _top(mod_path: Path) -> str:
    rel = mod_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def test_import_direction():
    violations = []
    for f in PKG.rglob("*.py"):
        me = _top(f)
        assert me in RANK, f"module {me} has no rank in test_layering.RANK"
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] != "menseg" or len(parts) < 2:
                    continue
                other = parts[1]
                if other in RANK and RANK[other] > RANK[me]:
                    violations.append(f"{f.relative_to(PKG)} imports menseg.{other}")
    assert not violations, violations
