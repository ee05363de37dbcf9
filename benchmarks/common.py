"""Shared pieces of the benchmarks: flags, machine facts, forward timing, interleaving, reports.

Every benchmark measures a *ratio against a baseline in the same run*: absolute times on small,
shared CPU machines drift by tens of percent between minutes, ratios of interleaved repetitions do
not. Repetitions run in alternating order (A B, B A, A B, ...) so a linear drift cancels, and the
reported value is the median over repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROCESS_START = time.time()


# --------------------------------------------------------------------------------------------
# Flags and machine facts


def build_parser(name: str, description: str, *, default_reps: int) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--reps``, ``--quick``, ``--out``, ``--device``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument(
        "--reps", type=int, default=None, help=f"timed repetitions (default {default_reps})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default benchmarks/results/NAME.json)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and vectors")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.set_defaults(default_reps=default_reps, bench_name=name)
    return parser


def finish_args(args: argparse.Namespace, *, quick_reps: int = 2) -> argparse.Namespace:
    """Fill defaults that depend on ``--quick`` and check the device."""
    if args.reps is None:
        args.reps = quick_reps if args.quick else args.default_reps
    if args.reps < 1:
        raise SystemExit("--reps must be at least 1")
    if args.out is None:
        suffix = ".quick.json" if args.quick else ".json"
        args.out = RESULTS_DIR / f"{args.bench_name}{suffix}"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, core counts, memory, library versions and the accelerator (if any)."""
    import transformers

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "memory_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "git_commit": _git_commit(),
        "command": " ".join(["python", "-m", *_module_argv()]),
    }
    if device == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else sys.argv[0]
    return [name, *sys.argv[1:]]


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def load_lm(device: str, model: str | None = None) -> Any:
    """Load ``model`` (default: the embedded one) on ``device`` (float32 on CPU, the loader's
    default elsewhere)."""
    from safesteer.models import load_model

    return load_model(model, device=device)


# --------------------------------------------------------------------------------------------
# Timing


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class ForwardCall:
    """One top-level forward of the model: wall-clock span and how many positions it ran."""

    start: float
    end: float
    rows: int
    width: int
    mask: torch.Tensor | None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def real_tokens(self) -> int:
        """Non-padding positions among the new columns (from the attention mask).

        A custom 4-D mask ``[rows, 1, queries, keys]`` (boolean, or additive with 0 = attend) marks
        a padding position by a query that attends only to itself, is attended by no other query
        and is not the last column (left padding: a real token always ends the row).
        """
        if self.mask is None:
            return self.rows * self.width
        if self.mask.dim() != 4:
            return int(self.mask[:, -self.width :].sum())
        allowed = self.mask[:, 0] if self.mask.dtype == torch.bool else self.mask[:, 0] == 0
        allowed = allowed[:, -self.width :, :]
        keys = allowed.shape[-1]
        own = torch.arange(keys - self.width, keys, device=allowed.device)
        self_only = (allowed.sum(-1) == 1) & allowed[:, torch.arange(self.width), own]
        attended = allowed[:, :, own].sum(1)  # per own key: queries attending it
        padding = self_only & (attended == 1)
        padding[:, -1] = False
        return int(self.rows * self.width - padding.sum())


class ForwardTimer:
    """Times every top-level forward of a model with pre/post hooks (synchronising on CUDA).

    Register it *before* any steering hooks so its pre-hook runs first and its span covers theirs.
    """

    def __init__(self, model: nn.Module, device: str | torch.device) -> None:
        self.calls: list[ForwardCall] = []
        self.device = torch.device(device)
        self._pending: ForwardCall | None = None
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        synchronize(self.device)
        rows, width = int(ids.shape[0]), int(ids.shape[1])
        self._pending = ForwardCall(time.perf_counter(), 0.0, rows, width, mask)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        synchronize(self.device)
        call = self._pending
        assert call is not None
        call.end = time.perf_counter()
        self.calls.append(call)
        self._pending = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def timed_forwards(model: nn.Module, device: str | torch.device) -> Iterator[ForwardTimer]:
    """``with timed_forwards(lm.model, device) as timer:`` records every forward inside."""
    timer = ForwardTimer(model, device)
    try:
        yield timer
    finally:
        timer.remove()


@dataclass
class Run:
    """One timed call of a workload, split into phases by its forwards.

    ``setup`` = call start to first forward; ``prefill`` = the first ``n_prefill`` forwards (and
    the host work between them); ``decode`` = end of the last prefill forward to the end.
    """

    total: float
    setup: float
    prefill: float
    decode: float
    decode_forwards: int
    rows: int
    new_tokens: int
    prefill_real_tokens: int
    prefill_positions: int
    forward_seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second of the decode phase (one token per row and forward)."""
        return self.rows * self.decode_forwards / self.decode if self.decode > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "forward_seconds"}
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data


def time_call(
    fn: Callable[[], Any],
    model: nn.Module,
    device: str | torch.device,
    *,
    n_prefill: int = 1,
    new_tokens: int = 0,
) -> tuple[Run, Any]:
    """Run ``fn`` once with forward timing and split the wall time into phases."""
    synchronize(device)
    with timed_forwards(model, device) as timer:
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        t1 = time.perf_counter()
    calls = timer.calls
    if len(calls) < n_prefill:
        raise RuntimeError(f"expected at least {n_prefill} forwards, saw {len(calls)}")
    first, last_prefill = calls[0], calls[n_prefill - 1]
    rows = first.rows
    run = Run(
        total=t1 - t0,
        setup=first.start - t0,
        prefill=last_prefill.end - first.start,
        decode=t1 - last_prefill.end,
        decode_forwards=len(calls) - n_prefill,
        rows=rows,
        new_tokens=new_tokens,
        prefill_real_tokens=sum(c.real_tokens() for c in calls[:n_prefill]),
        prefill_positions=sum(c.rows * c.width for c in calls[:n_prefill]),
        forward_seconds=[c.seconds for c in calls],
    )
    return run, result


@contextlib.contextmanager
def fixed_length() -> Iterator[None]:
    """Make the library's decode loop ignore stop tokens, so every run decodes the same count.

    Steering changes which tokens come out; without this, runs that hit end-of-turn early would
    look faster. Patches ``safesteer.core.generation.stop_token_ids`` (looked up at call time).
    """
    from safesteer.core import generation

    original = generation.stop_token_ids
    generation.stop_token_ids = lambda lm: [-1]  # type: ignore[assignment]
    try:
        yield
    finally:
        generation.stop_token_ids = original  # type: ignore[assignment]


def interleave(
    reps: int, workloads: dict[str, Callable[[], Any]], *, warmup: bool = True
) -> dict[str, list[Any]]:
    """Run the workloads ``reps`` times in alternating order (ABC, CBA, ABC, ...).

    With ``warmup`` every workload runs once untimed first (allocator, kernels, caches).
    """
    names = list(workloads)
    if warmup:
        for name in names:
            workloads[name]()
    results: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(workloads[name]())
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and all values (for the JSON)."""
    vals = [float(v) for v in values]
    return {
        "median": median(vals),
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
        "values": vals,
    }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repetition ratios of two interleaved series."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


# --------------------------------------------------------------------------------------------
# Memory


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_snapshot() -> dict[str, Any]:
    """Resident memory now and at its peak: /proc VmRSS/VmHWM, ru_maxrss, psutil if installed."""
    snap: dict[str, Any] = {
        "vm_rss_bytes": _kib(_status_kib("VmRSS")),
        "vm_hwm_bytes": _kib(_status_kib("VmHWM")),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    try:
        import psutil

        snap["psutil_rss_bytes"] = int(psutil.Process().memory_info().rss)
    except ImportError:
        snap["psutil_rss_bytes"] = None
    return snap


def _kib(value: int | None) -> int | None:
    return None if value is None else value * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reports


@dataclass
class Target:
    """A performance target: ``value`` compared with ``limit`` by ``op`` (``<=`` or ``>=``)."""

    name: str
    value: float
    limit: float
    op: str
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "met": self.met}


class Report:
    """Collects tables, targets and raw data; prints with rich and writes one JSON file."""

    def __init__(self, name: str, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.name = name
        self.args = args
        self.settings = settings
        self.tables: list[dict[str, Any]] = []
        self.targets: list[Target] = []
        self.data: dict[str, Any] = {}
        self.notes: list[str] = []
        self.started = PROCESS_START

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append(
            {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}
        )

    def target(self, target: Target) -> None:
        self.targets.append(target)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def emit(self) -> dict[str, Any]:
        """Print every table and the targets, write the JSON and return it."""
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 120))
        for spec in self.tables:
            table = Table(title=spec["title"])
            for column in spec["columns"]:
                table.add_column(column)
            for row in spec["rows"]:
                table.add_row(*[fmt(v) for v in row])
            console.print(table)
        if self.targets:
            table = Table(title=f"{self.name}: targets")
            for column in ("target", "measured", "limit", "met"):
                table.add_column(column)
            for t in self.targets:
                table.add_row(
                    t.name,
                    f"{fmt(t.value)} {t.unit}".strip(),
                    f"{t.op} {fmt(t.limit)} {t.unit}".strip(),
                    "[green]yes[/green]" if t.met else "[red]MISS[/red]",
                )
            console.print(table)
        for text in self.notes:
            console.print(f"note: {text}")
        payload = {
            "benchmark": self.name,
            "quick": bool(self.args.quick),
            "reps": self.args.reps,
            "seed": self.args.seed,
            "machine": machine_info(self.args.device),
            "settings": self.settings,
            "tables": self.tables,
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
            "data": self.data,
            "wall_seconds": round(time.time() - self.started, 1),
        }
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        console.print(f"wrote {out}")
        return payload


def fmt(value: Any) -> str:
    """Compact number formatting for tables."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01 or magnitude == 0:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def mixed_queries(n: int, seed: int) -> list[str]:
    """``n`` queries alternating harmful (AdvBench) and benign (TruthfulQA) anchor-pool prompts.

    Drawn with a seed offset from the fitting seed; overlap with anchors is harmless for timing.
    """
    from safesteer.datasets import draw_anchors

    half = (n + 1) // 2
    pool = draw_anchors(max(half, 1), seed=seed + 1000)
    out: list[str] = []
    for h, b in zip(pool.harmful, pool.benign, strict=True):
        out.extend([h, b])
    return out[:n]


def fit_artifact(lm: Any, anchors_per_side: int, seed: int) -> Any:
    """A SCANS artifact fitted on ``anchors_per_side`` harmful and benign anchors (default
    settings: depth-scaled layers, relative alpha, calibrated threshold)."""
    from safesteer.datasets import draw_anchors
    from safesteer.methods.scans.fit import fit_scans
    from safesteer.methods.scans.settings import default_settings

    anchors = draw_anchors(anchors_per_side, seed)
    return fit_scans(
        lm, anchors.harmful, anchors.benign, default_settings(lm.num_layers), seed=seed
    )
