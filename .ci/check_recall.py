"""Fail unless a hescape-train run reached Recall@5 >= 5x chance in both directions."""

import json
import sys
from pathlib import Path

res = json.loads(Path(sys.argv[1], "results.json").read_text())
ok = True
for d in ("i2g", "g2i"):
    ratio = res[f"{d}_R@5"] / res[f"{d}_R@5_chance"]
    print(f"{d}: R@5 = {res[f'{d}_R@5']:.3f}, chance {res[f'{d}_R@5_chance']:.4f}, {ratio:.1f}x chance")
    ok &= ratio >= 5.0
sys.exit(0 if ok else 1)
