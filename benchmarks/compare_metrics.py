"""Print every headline number that differs between two runs of the project.

    python benchmarks/compare_metrics.py /path/to/clone_before /path/to/clone_after

Reads ``data/08_reporting/*_metrics.json`` of both project folders (after ``kedro run``) and prints,
per file, each metric whose value differs (``None`` where one side lacks it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def main(before: Path, after: Path) -> None:
    reports = [root / "data" / "08_reporting" for root in (before, after)]
    names = sorted({p.name for folder in reports for p in folder.glob("*_metrics.json")})
    for name in names:
        old, new = (_load(folder / name) for folder in reports)
        changed = [key for key in sorted(set(old) | set(new)) if not _same(old.get(key), new.get(key))]
        print(f"== {name}: {len(changed)} of {len(set(old) | set(new))} differ")
        for key in changed:
            print(f"   {key}: {old.get(key)} -> {new.get(key)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
