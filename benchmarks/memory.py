"""Peak memory of plain generation vs SCANS, each in its own subprocess so peaks do not mix.

The parent fits a small artifact once and saves it. Each child imports the same modules, loads the
model, resets the peak-RSS counter (Linux ``clear_refs``), then runs its workload on the same
prompts: ``plain`` (``generate_ids`` in batches) or ``scans`` (load the artifact,
``scans_generate``).
Children alternate (plain, scans, scans, plain, ...) and medians are reported.

Each child runs a two-token warm-up before the reset so memory-mapped weights are resident.
Reported per child: peak RSS of the whole process (``VmHWM``; ``ru_maxrss`` as a cross-check),
the workload's peak above the RSS after loading, and on CUDA ``torch.cuda.max_memory_allocated``.
Target: SCANS' extra peak <= the artifact's tensor bytes + 1 % of plain generation's peak.

Where the memory goes (measured with ``/proc`` snapshots around each step of ``scans_generate``):
SCANS keeps nothing big. The recorded states are ``[rows, recorded layers, 2, hidden]`` float32
(0.8 MiB for 16 rows of the embedded model), the KV cache holds one token more than plain
generation's during the prefill (the reply prefix; rolled back before decoding), and the artifact's
tensors are ~0.1 MiB. What made the default run's "overhead" (+17 MiB once) is glibc's *dynamic
mmap threshold*: after a large tensor is freed the threshold rises, later tensors of that size come
from the heap, and the heap keeps freed pages resident. The same prefill of 16 rows then grows the
RSS by 55 MiB in one process and by 138 MiB in the next, with or without SCANS' hooks, depending on
the order of allocations. Children therefore run with ``MALLOC_MMAP_THRESHOLD_=65536`` by default
(``--malloc fixed``), which fixes the threshold: large tensors are mapped and unmapped, and the
peak is the workload's live memory. ``--malloc default`` measures glibc's default behaviour
instead (noisy; the retention is allocator state, not SCANS state). Measured with ``--quick --reps
2 --threads 1`` (workload peak above the loaded RSS, per child): fixed 48.4 / 47.4 MiB plain and
50.8 / 51.2 MiB SCANS (+3.1 MiB: the artifact read and checked against the model, the one-token
longer prefill cache, the recorded states); default 53.0 / 40.2 MiB plain and 41.7 / 71.7 MiB
SCANS (the same workloads, 30 MiB apart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Report,
    Target,
    build_parser,
    finish_args,
    fit_artifact,
    load_lm,
    median,
    memory_snapshot,
    mixed_queries,
    reset_peak_rss,
    summary,
)

NAME = "memory"
MARK = "MEMORY_RESULT "
# glibc: allocations from 64 KiB up are mapped and unmapped (no dynamic threshold, see above)
FIXED_MMAP_THRESHOLD = 65536


def child(args: argparse.Namespace) -> None:
    """Run one workload and print its memory figures as one JSON line."""
    import torch

    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.methods.scans.artifact import ScansArtifact
    from safesteer.methods.scans.generate import scans_generate

    start = memory_snapshot()
    lm = load_lm(args.device)
    # touch every weight once (safetensors are memory-mapped) so the peak is the workload's own
    with torch.inference_mode():
        generate_ids(lm, [[1, 2, 3]], GenerationConfig(max_new_tokens=2))
    loaded = memory_snapshot()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_loaded = torch.cuda.memory_allocated()
    reset_ok = reset_peak_rss()
    queries = mixed_queries(args.n_prompts, args.seed)
    config = GenerationConfig(max_new_tokens=args.new_tokens, repetition_penalty=1.1)
    if args.child == "plain":
        layout = ChatLayout(lm.tokenizer)
        encoded = [layout.prompt_ids(q) for q in queries]
        before_run = memory_snapshot()
        for i in range(0, len(encoded), args.batch_size):
            generate_ids(lm, encoded[i : i + args.batch_size], config)
    else:
        artifact = ScansArtifact.load(args.artifact, lm)
        before_run = memory_snapshot()
        scans_generate(lm, artifact, queries, config, batch_size=args.batch_size)
    end = memory_snapshot()
    result: dict[str, Any] = {
        "mode": args.child,
        "start": start,
        "after_load": loaded,
        "before_run": before_run,
        "end": end,
        "peak_reset_after_load": reset_ok,
    }
    if cuda:
        torch.cuda.synchronize()
        result["cuda_after_load_bytes"] = cuda_loaded
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(MARK + json.dumps(result), flush=True)


def run_child(mode: str, args: argparse.Namespace, artifact_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--child",
        mode,
        "--artifact",
        str(artifact_dir),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
        "--n-prompts",
        str(args.n_prompts),
        "--batch-size",
        str(args.batch_size),
        "--new-tokens",
        str(args.new_tokens),
        "--out",
        str(args.out),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"child {mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def _mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=2)
    parser.add_argument("--child", choices=["plain", "scans"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-prompts", type=int, default=None, help="default 16 (quick: 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="children's glibc mmap threshold: fixed at 64 KiB (repeatable peaks) or glibc's "
        "dynamic default (peaks include heap retention that varies run to run)",
    )
    args = finish_args(parser.parse_args(argv), quick_reps=1)
    args.n_prompts = args.n_prompts or (8 if args.quick else 16)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if args.child:
        child(args)
        return {}

    lm = load_lm(args.device)
    artifact = fit_artifact(lm, 8, args.seed)
    tensor_bytes = sum(
        t.numel() * t.element_size()
        for t in (artifact.vectors, artifact.reference, artifact.layer_norms)
    )
    del lm
    results: dict[str, list[dict[str, Any]]] = {"plain": [], "scans": []}
    with tempfile.TemporaryDirectory() as tmp:
        artifact_dir = Path(tmp) / "artifact"
        artifact.save(artifact_dir)
        for rep in range(args.reps):
            for mode in ("plain", "scans") if rep % 2 == 0 else ("scans", "plain"):
                results[mode].append(run_child(mode, args, artifact_dir))

    def series(mode: str, key: str) -> list[float]:
        return [float(r[key[0]][key[1]]) for r in results[mode]]

    peak = {m: series(m, ("end", "vm_hwm_bytes")) for m in results}
    maxrss = {m: series(m, ("end", "ru_maxrss_bytes")) for m in results}
    loaded = {m: series(m, ("after_load", "vm_rss_bytes")) for m in results}
    work = {m: [p - lo for p, lo in zip(peak[m], loaded[m], strict=True)] for m in results}
    rows = []
    for mode in results:
        rows.append(
            [
                mode,
                _mib(median(loaded[mode])),
                _mib(median(peak[mode])),
                _mib(median(maxrss[mode])),
                _mib(median(work[mode])),
            ]
        )
    overhead = median(peak["scans"]) - median(peak["plain"])
    work_overhead = median(work["scans"]) - median(work["plain"])
    allowance = tensor_bytes + 0.01 * median(peak["plain"])
    report = Report(
        NAME,
        args,
        {
            "n_prompts": args.n_prompts,
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "artifact_anchors_per_side": 8,
            "malloc": args.malloc,
            "malloc_mmap_threshold": FIXED_MMAP_THRESHOLD if args.malloc == "fixed" else None,
            "peak_reset_after_load": all(r["peak_reset_after_load"] for r in results["plain"]),
        },
    )
    report.table(
        f"Resident memory, MiB (medians of {args.reps} runs per mode, separate processes)",
        ["mode", "RSS after load", "peak RSS (VmHWM)", "ru_maxrss", "workload peak above load"],
        rows,
    )
    cuda_rows = []
    if args.device == "cuda":
        for mode in results:
            cuda_rows.append(
                [
                    mode,
                    _mib(median([r["cuda_after_load_bytes"] for r in results[mode]])),
                    _mib(median([r["cuda_max_allocated_bytes"] for r in results[mode]])),
                ]
            )
        report.table(
            "CUDA memory, MiB", ["mode", "allocated after load", "max allocated"], cuda_rows
        )
    report.table(
        "SCANS overhead",
        ["quantity", "MiB"],
        [
            ["artifact tensor bytes", _mib(tensor_bytes)],
            ["peak RSS: scans - plain", _mib(overhead)],
            ["workload peak: scans - plain", _mib(work_overhead)],
            ["allowance: artifact + 1 % of plain peak", _mib(allowance)],
        ],
    )
    report.data = {
        "artifact_tensor_bytes": tensor_bytes,
        "peak_bytes": {m: summary(v) for m, v in peak.items()},
        "ru_maxrss_bytes": {m: summary(v) for m, v in maxrss.items()},
        "workload_peak_bytes": {m: summary(v) for m, v in work.items()},
        "children": results,
    }
    report.target(
        Target(
            "peak RSS overhead of SCANS",
            _mib(overhead) or 0.0,
            _mib(allowance) or 0.0,
            "<=",
            "MiB",
            "allowance = artifact tensors + 1 % of plain peak",
        )
    )
    if args.device == "cuda":
        cuda_over = median([r["cuda_max_allocated_bytes"] for r in results["scans"]]) - median(
            [r["cuda_max_allocated_bytes"] for r in results["plain"]]
        )
        cuda_allow = tensor_bytes + 0.01 * median(
            [r["cuda_max_allocated_bytes"] for r in results["plain"]]
        )
        report.target(
            Target(
                "CUDA max allocated overhead of SCANS",
                _mib(cuda_over) or 0.0,
                _mib(cuda_allow) or 0.0,
                "<=",
                "MiB",
            )
        )
    return report.emit()


if __name__ == "__main__":
    main()
