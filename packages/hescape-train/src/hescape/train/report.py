"""Plain-text result tables with chance levels beside every number."""

from __future__ import annotations

__all__ = ["format_results_table"]


def format_results_table(results: dict, title: str = "") -> str:
    """A Markdown table of Recall@k (with chance) and ranks for ``{"i2g": ..., "g2i": ...}``."""
    names = {"i2g": "image → gene", "g2i": "gene → image"}
    first = next(iter(results.values()))
    ks = list(first.recall)
    head = "| direction | " + " | ".join(f"R@{k} (chance)" for k in ks) + " | mean rank (chance) | median rank |"
    sep = "|" + "---|" * (len(ks) + 3)
    rows = []
    for key, r in results.items():
        cells = " | ".join(f"{r.recall[k]:.3f} ({r.chance[k]:.3f})" for k in ks)
        rows.append(f"| {names.get(key, key)} | {cells} | {r.mean_rank:.1f} ({r.chance_mean_rank:.1f}) | "
                    f"{r.median_rank:.1f} |")
    lines = ([title, ""] if title else []) + [head, sep, *rows]
    ratio = ", ".join(f"{names.get(key, key)} R@{k} = {r.recall[k] / r.chance[k]:.1f}× chance"
                      for key, r in results.items() for k in ks if k == 5 or len(ks) == 1)
    if ratio:
        lines += ["", ratio]
    return "\n".join(lines)
