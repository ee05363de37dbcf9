"""Render benchmark JSON files as Markdown tables (for docs/results.md).

``python -m benchmarks.to_markdown benchmarks/results/*.json`` prints, per file, the machine, the
command, every table and the targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import fmt


def _row(cells: list[Any]) -> str:
    text = ("" if c is None else fmt(c).replace("|", "\\|") for c in cells)
    return "| " + " | ".join(text) + " |"


def render(payload: dict[str, Any]) -> str:
    """One benchmark's JSON as Markdown."""
    m = payload["machine"]
    lines = [
        f"#### `{payload['benchmark']}`{' (quick)' if payload.get('quick') else ''}",
        "",
        f"`{m.get('command')}` — {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, "
        f"torch {m.get('torch')} ({m.get('torch_threads')} threads), device {m.get('device')}, "
        f"load average at the end {m.get('load_average_1_5_15')}, {payload.get('reps')} reps, "
        f"{payload.get('wall_seconds')} s wall.",
        "",
    ]
    for table in payload["tables"]:
        lines += [f"*{table['title']}*", "", _row(table["columns"])]
        lines.append("|" + "---|" * len(table["columns"]))
        lines += [_row(r) for r in table["rows"]]
        lines.append("")
    if payload.get("targets"):
        lines += ["| target | measured | limit | met |", "|---|---|---|---|"]
        for t in payload["targets"]:
            unit = f" {t['unit']}" if t.get("unit") else ""
            lines.append(
                f"| {t['name']} | {fmt(t['value'])}{unit} | {t['op']} {fmt(t['limit'])}{unit} | "
                f"{'yes' if t['met'] else '**MISS**'} |"
            )
        lines.append("")
    for note in payload.get("notes", []):
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.to_markdown", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and "tables" in payload:
            print(render(payload))


if __name__ == "__main__":
    main()
