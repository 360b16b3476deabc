"""Rebuild data/sample/eurosat: the first N images per class of each split of CoOp's EuroSAT split file.

Why: the main job (`bash scripts/repro.sh`) must run on a fresh clone without the user's own data, so the
repository ships a small real sample in CoOp's $DATA layout. Deterministic: the same source gives the same
sample. Usage: python scripts/make_sample.py SOURCE_ROOT [--per-class 20] [--out data/sample]
(SOURCE_ROOT holds eurosat/2750 and eurosat/split_zhou_EuroSAT.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SPLIT_FILE = "split_zhou_EuroSAT.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    args = parser.parse_args()
    src = args.source / "eurosat"
    dst = args.out / "eurosat"
    split = json.loads((src / SPLIT_FILE).read_text())
    sample: dict[str, list] = {}
    for name in ("train", "val", "test"):
        taken: dict[int, int] = {}
        rows = []
        for path, label, classname in split[name]:  # split order, first N of each class
            if taken.get(label, 0) < args.per_class:
                taken[label] = taken.get(label, 0) + 1
                rows.append([path, label, classname])
        sample[name] = rows
    for rows in sample.values():
        for path, _, _ in rows:
            (dst / "2750" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "2750" / path, dst / "2750" / path)
    (dst / SPLIT_FILE).write_text(json.dumps(sample, indent=0) + "\n")
    print({k: len(v) for k, v in sample.items()})


if __name__ == "__main__":
    main()
