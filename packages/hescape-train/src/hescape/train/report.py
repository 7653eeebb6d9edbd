"""Plain-text result tables with chance levels beside every number, and optionally a baseline's rows."""

from __future__ import annotations

__all__ = ["format_results_table"]

_NAMES = {"i2g": "image → gene", "g2i": "gene → image"}


def format_results_table(results: dict, title: str = "", *, baseline: dict | None = None,
                         baseline_name: str = "baseline") -> str:
    """A Markdown table of Recall@k (with chance) and ranks for ``{"i2g": ..., "g2i": ...}``.

    ``baseline`` (same keys and ks, e.g. the colour-statistics probe of :mod:`hescape.eval.baselines`) adds one
    row per direction, named ``"<direction>: <baseline_name>"``, and the closing line gives the model's R@5 as
    a multiple of chance and of the baseline.
    """
    first = next(iter(results.values()))
    ks = list(first.recall)
    head = "| direction | " + " | ".join(f"R@{k} (chance)" for k in ks) + " | mean rank (chance) | median rank |"
    sep = "|" + "---|" * (len(ks) + 3)

    def row(name: str, r) -> str:
        cells = " | ".join(f"{r.recall[k]:.3f} ({r.chance[k]:.3f})" for k in ks)
        return f"| {name} | {cells} | {r.mean_rank:.1f} ({r.chance_mean_rank:.1f}) | {r.median_rank:.1f} |"

    rows = [row(_NAMES.get(key, key), r) for key, r in results.items()]
    if baseline:
        rows += [row(f"{_NAMES.get(key, key)}: {baseline_name}", r) for key, r in baseline.items()]
    lines = ([title, ""] if title else []) + [head, sep, *rows]
    parts = []
    for key, r in results.items():
        for k in ks:
            if k == 5 or len(ks) == 1:
                text = f"{_NAMES.get(key, key)} R@{k} = {r.recall[k] / r.chance[k]:.1f}× chance"
                b = (baseline or {}).get(key)
                if b is not None and k in b.recall:
                    text += (f", {r.recall[k] / b.recall[k]:.1f}× the {baseline_name}" if b.recall[k] > 0
                             else f", {baseline_name} 0")
                parts.append(text)
    if parts:
        lines += ["", "; ".join(parts) if baseline else ", ".join(parts)]
    return "\n".join(lines)
