"""A claim's value as text, with its interval (the command line and the app show it alike)."""
from __future__ import annotations

from typing import Any


def format_value(ours: dict[str, Any] | None, unit: str = "") -> str:
    """``"4.04 [3.45, 4.62] (n=3)"`` for an interval, ``"2.318"`` for an exact value, ``"—"`` for none."""
    if not ours:
        return "—"
    if ours.get("exact"):
        return f"{ours['value']:.4g}"
    digits = 2 if abs(ours["mean"]) >= 1 or unit == "accuracy points" else 3
    if ours.get("low") is None:
        return f"{ours['mean']:.{digits}f} (n={ours['n']})"
    return f"{ours['mean']:.{digits}f} [{ours['low']:.{digits}f}, {ours['high']:.{digits}f}] (n={ours['n']})"


def _paper(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def records_markdown(records: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> str:
    """Markdown of ``(claim, record or None)`` pairs: a summary table, then each claim's rows."""
    from . import paper_cite

    lines = ["| claim | source | verdict | budget |", "| --- | --- | --- | --- |"]
    for claim, rec in records:
        verdict = "no record" if not rec else rec["verdict"] + (" (out of date)" if rec.get("stale") else "")
        lines.append(f"| {claim['title']} | {paper_cite(claim)} | **{verdict}** | {rec['budget'] if rec else ''} |")
    for claim, rec in records:
        lines += ["", f"### {claim['title']}", "", f"{paper_cite(claim)}. {claim['claim']}", ""]
        if not rec:
            lines.append(f"No record yet: `bora-lab reproduce {claim['id']} --save`.")
            continue
        lines += ["| row | paper | ours [95% interval] | verdict |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['label']} | {_paper(r['paper'])} | {format_value(r.get('ours'), r['unit'])} | {r['verdict'] or 'context'} |"
                  for r in rec["rows"]]
        lines += ["", f"**{rec['verdict']}** ({rec['created']}, {rec['elapsed_s']:.0f} s). {rec['explanation']}",
                  f"Budget: {rec['budget']}. Command: `bora-lab reproduce {claim['id']}`."]
    return "\n".join(lines) + "\n"
