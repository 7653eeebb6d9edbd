"""Fail unless a hescape-train run reached Recall@5 >= 5x chance in both directions, and beat the
colour-statistics probe (hescape.eval.baselines, in results.json as ``*_R@5_probe``) in both directions."""

import json
import sys
from pathlib import Path

res = json.loads(Path(sys.argv[1], "results.json").read_text())
ok = True
for d in ("i2g", "g2i"):
    r5, chance = res[f"{d}_R@5"], res[f"{d}_R@5_chance"]
    ratio = r5 / chance
    probe = res.get(f"{d}_R@5_probe")
    if probe is None:
        print(f"{d}: expected {d}_R@5_probe in results.json, found none; run hescape-train with probe=true")
        ok = False
        continue
    print(f"{d}: R@5 = {r5:.3f}, chance {chance:.4f} ({ratio:.1f}x), colour probe {probe:.3f} "
          f"({r5 / probe if probe > 0 else float('inf'):.1f}x)")
    ok &= ratio >= 5.0 and r5 > probe
sys.exit(0 if ok else 1)
