"""Run every benchmark (each in its own process) and summarise their targets.

``python -m benchmarks.run_all --quick`` is the smoke run. To add a benchmark, write
``benchmarks/NAME.py`` with the common flags and add ``NAME`` to ``BENCHMARKS``; entries whose
module does not exist are skipped with a note. A benchmark that fails (non-zero exit, or no
readable JSON) is reported as failed with the end of its error output; the others still run and
are reported, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt

BENCHMARKS: list[str] = [
    "decode_overhead",
    "scans_e2e",
    "xstest_eval",
    "safeswitch_overhead",
    "memory",
    "fit_time",
    "serve_concurrency",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=None, help="passed on to every benchmark")
    parser.add_argument("--threads", type=int, default=None, help="passed on to every benchmark")
    parser.add_argument("--only", default=None, help="comma-separated subset of benchmarks")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    names = BENCHMARKS if args.only is None else [n.strip() for n in args.only.split(",")]
    root = Path(__file__).resolve().parent.parent
    summary: list[dict[str, Any]] = []
    failed = False
    for name in names:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"== {name}: not written yet, skipped")
            summary.append({"benchmark": name, "status": "missing"})
            continue
        out = args.out_dir / f"{name}{'.quick' if args.quick else ''}.json"
        cmd = [
            sys.executable,
            "-m",
            f"benchmarks.{name}",
            "--device",
            args.device,
            "--out",
            str(out),
        ]
        if args.quick:
            cmd.append("--quick")
        if args.reps is not None:
            cmd += ["--reps", str(args.reps)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        entry = run_one(name, cmd, root, out)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        failed = failed or entry["status"] != "ok"
        summary.append(entry)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Benchmarks{' (quick)' if args.quick else ''}: targets")
    for column in ("benchmark", "status", "s", "target", "measured", "limit", "met"):
        table.add_column(column)
    for entry in summary:
        targets = entry.get("targets") or [None]
        for t in targets:
            row = [entry["benchmark"], entry["status"], fmt(entry.get("seconds"))]
            if t is None:
                row += ["", "", "", ""]
            else:
                row += [
                    t["name"],
                    f"{fmt(t['value'])} {t['unit']}".strip(),
                    f"{t['op']} {fmt(t['limit'])} {t['unit']}".strip(),
                    "[green]yes[/green]" if t["met"] else "[red]MISS[/red]",
                ]
            table.add_row(*row)
    Console(width=max(Console().width, 140)).print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"run_all{'.quick' if args.quick else ''}.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    for entry in summary:
        if entry["status"] not in ("ok", "missing"):
            print(f"== {entry['benchmark']} {entry['status']}:\n{entry.get('error', '')}")
    return 1 if failed else 0


def run_one(name: str, cmd: list[str], root: Path, out: Path) -> dict[str, Any]:
    """Run one benchmark; its status, targets and (when it failed) the end of its stderr."""
    entry: dict[str, Any] = {"benchmark": name, "out": str(out)}
    started = time.time()
    proc = subprocess.run(cmd, cwd=root, stderr=subprocess.PIPE, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        entry["status"] = f"failed (rc {proc.returncode})"
        entry["error"] = proc.stderr[-2000:]
        return entry
    try:
        if out.stat().st_mtime < started - 1:  # a result of an earlier run must not pass
            raise ValueError("not written by this run")
        entry["targets"] = json.loads(out.read_text()).get("targets", [])
    except (OSError, ValueError) as exc:
        entry["status"] = "failed (no result JSON)"
        entry["error"] = f"{out}: {exc}"
        return entry
    entry["status"] = "ok"
    return entry


if __name__ == "__main__":
    sys.exit(main())
