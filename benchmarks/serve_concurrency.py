"""`safesteer serve` under concurrent load: 64 `openai` clients at once vs the same requests one
at a time, against one server process on 127.0.0.1.

* ``sequential`` – one client sends the requests one after another (each waits for the last);
* ``concurrent`` – ``--clients`` threads, each with its own `openai` client, send their share of
  the same requests at once; the server batches what arrives together.

Every request streams (``stream_options.include_usage``), so time-to-first-token (TTFT) is the
first chunk with text. Reported: errors, wall time, generated tokens/s of each phase and their
ratio (the batching gain), TTFT and per-request decode tokens/s percentiles. The load is bounded:
``--requests`` requests per phase and ``--time-limit`` seconds per phase (requests not started
by then are skipped and counted). Phases alternate over ``--reps`` (seq, conc, conc, seq, ...).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Report, Target, build_parser, finish_args, median
from safesteer.serving.local import free_port, is_healthy

NAME = "serve_concurrency"
RATIO_TARGET = 4.0  # the target: 64 clients, 2 CPU cores, the 0.5B model


@dataclass
class Outcome:
    """One request: error text or its timings (seconds from its own start) and token count."""

    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0


def start_server(args: Any, port: int, key: str) -> subprocess.Popen[bytes]:
    """``safesteer serve`` in a subprocess; returns once /health answers (or raises)."""
    cmd = [sys.executable, "-c", "from safesteer.cli.main import main; main()", "serve"]
    cmd += ["--port", str(port), "--served-model-name", "bench", "--method", args.method]
    cmd += ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    cmd += ["--max-tokens-limit", str(args.max_tokens), "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    for artifact in args.artifact or []:
        cmd += ["--artifact", str(artifact)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "SAFESTEER_API_KEY": key})
    deadline = time.monotonic() + args.startup_limit
    while not is_healthy(port, key):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server was not ready after {args.startup_limit} s")
        time.sleep(0.5)
    return proc


def one_request(client: Any, prompt: str, max_tokens: int, method: str) -> Outcome:
    """Stream one chat completion and time it."""
    start = time.perf_counter()
    outcome = Outcome()
    try:
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"safesteer": {"method": method}},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and outcome.ttft is None:
                outcome.ttft = time.perf_counter() - start
            if chunk.usage is not None:
                outcome.tokens = int(chunk.usage.completion_tokens)
        outcome.latency = time.perf_counter() - start
    except Exception as exc:  # every failure is counted, none stops the run
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def run_phase(
    clients: list[Any], prompts: list[str], args: Any, concurrent: bool
) -> tuple[list[Outcome], float, int]:
    """All ``prompts`` once; returns outcomes, wall seconds and requests skipped by the limit."""
    deadline = time.monotonic() + args.time_limit
    skipped = 0
    lock = threading.Lock()

    def work(worker: int) -> list[Outcome]:
        nonlocal skipped
        mine = prompts[worker :: len(clients)] if concurrent else prompts
        done: list[Outcome] = []
        for prompt in mine:
            if time.monotonic() > deadline:
                with lock:
                    skipped += 1
                continue
            done.append(one_request(clients[worker], prompt, args.max_tokens, args.method))
        return done

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(clients)) as pool:
            results = [o for part in pool.map(work, range(len(clients))) for o in part]
    else:
        results = work(0)
    return results, time.perf_counter() - start, skipped


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def phase_stats(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    """Errors, throughput and TTFT / per-request decode-speed percentiles of one phase."""
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in ok)
    ttft = [o.ttft for o in ok if o.ttft is not None]
    speed = [
        (o.tokens - 1) / (o.latency - o.ttft)
        for o in ok
        if o.ttft is not None and o.latency is not None and o.latency > o.ttft and o.tokens > 1
    ]
    pct = (50, 90, 99)
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "error_examples": sorted({o.error for o in outcomes if o.error})[:3],
        "wall_seconds": wall,
        "tokens": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else float("nan"),
        "ttft_seconds": {f"p{q}": percentile(ttft, q) for q in pct},
        "decode_tokens_per_second_per_request": {f"p{q}": percentile(speed, q) for q in pct},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=1)
    parser.add_argument("--model", default=None, help="served model (default: embedded SmolLM2)")
    parser.add_argument("--artifact", type=Path, action="append", help="artifact(s) to serve")
    parser.add_argument("--method", default="none", help="none, scans or safeswitch")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (64)")
    parser.add_argument("--requests", type=int, default=None, help="per phase (= clients)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (32)")
    parser.add_argument("--max-batch", type=int, default=None, help="server batch cap (= clients)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per phase")
    parser.add_argument("--startup-limit", type=float, default=600.0, help="server start (s)")
    args = finish_args(parser.parse_args(argv), quick_reps=1)
    args.clients = args.clients or (8 if args.quick else 64)
    args.requests = args.requests or args.clients
    args.max_tokens = args.max_tokens or (8 if args.quick else 32)
    args.max_batch = args.max_batch or args.clients
    if min(args.clients, args.requests, args.max_tokens, args.max_batch) < 1:
        raise SystemExit("--clients, --requests, --max-tokens and --max-batch must be >= 1")

    import openai

    from safesteer.datasets import draw_anchors

    anchors = draw_anchors(max(1, (args.requests + 1) // 2), args.seed)
    mixed = [q for pair in zip(anchors.benign, anchors.harmful, strict=True) for q in pair]
    prompts = mixed[: args.requests]
    port, key = free_port(), "bench-" + os.urandom(8).hex()
    proc = start_server(args, port, key)
    try:

        def client() -> Any:
            return openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600
            )

        clients = [client() for _ in range(args.clients)]
        one_request(clients[0], prompts[0], 2, args.method)  # warm-up, not counted
        phases: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
        for rep in range(args.reps):
            order = ["sequential", "concurrent"] if rep % 2 == 0 else ["concurrent", "sequential"]
            for phase in order:
                outcomes, wall, skipped = run_phase(
                    clients, prompts, args, concurrent=phase == "concurrent"
                )
                stats = phase_stats(outcomes, wall)
                stats["skipped_by_time_limit"] = skipped
                phases[phase].append(stats)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    ratios = [
        c["tokens_per_second"] / s["tokens_per_second"]
        for s, c in zip(phases["sequential"], phases["concurrent"], strict=True)
    ]
    errors = sum(p["errors"] for runs in phases.values() for p in runs)
    skipped_total = sum(p["skipped_by_time_limit"] for runs in phases.values() for p in runs)
    report = Report(
        NAME,
        args,
        {
            "model": args.model or "embedded SmolLM2-135M",
            "method": args.method,
            "clients": args.clients,
            "requests_per_phase": args.requests,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms,
            "server_threads": args.threads,
        },
    )
    rows = []
    for phase, runs in phases.items():
        last = runs[-1]
        rows.append(
            [
                phase,
                last["requests"],
                last["errors"],
                median([r["wall_seconds"] for r in runs]),
                median([r["tokens_per_second"] for r in runs]),
                last["ttft_seconds"]["p50"],
                last["ttft_seconds"]["p90"],
                last["ttft_seconds"]["p99"],
                last["decode_tokens_per_second_per_request"]["p50"],
                last["decode_tokens_per_second_per_request"]["p90"],
            ]
        )
    report.table(
        "serve: sequential vs concurrent clients",
        ["phase", "requests", "errors", "wall s", "tokens/s", "TTFT p50", "TTFT p90", "TTFT p99",
         "req tok/s p50", "req tok/s p90"],
        rows,
    )  # fmt: skip
    report.target(Target("errors", float(errors), 0, "<="))
    report.target(Target("requests skipped by the time limit", float(skipped_total), 0, "<="))
    report.target(
        Target(
            "throughput concurrent / sequential",
            median(ratios),
            RATIO_TARGET,
            ">=",
            "x",
            "the issue's target is for 64 clients with the 0.5B model on 2 cores",
        )
    )
    if args.quick:
        report.note("quick run: few clients and tokens; the ratio is a smoke value, not a result")
    report.data = {"phases": phases, "throughput_ratios": ratios}
    return report.emit()


if __name__ == "__main__":
    main()
