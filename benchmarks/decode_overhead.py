"""Decode throughput of steered generation vs plain generation with the same decode loop.

Three workloads on the same left-padded prompts, repeated in alternating order:

* ``plain``   – ``safesteer.core.generation.generate_ids`` (the library's decode loop, no hooks);
* ``steered`` – the same call inside ``steering()``: a ``Steerer`` on the SCANS steering layers with
  random unit vectors scaled like a fitted artifact (relative alpha x mean residual norm), signs
  alternating per row, applied from the last prompt token on;
* ``hf``      – Hugging Face ``model.generate`` (greedy), as a second baseline.

Stop tokens are disabled (``min_new_tokens`` for HF) so every run decodes exactly N tokens. Each
top-level forward is timed with hooks, which splits a run into prefill (the first forward) and
decode (everything after it). Runs tens of seconds apart carry the machine's drift, so two finer
measurements follow:

* step-paired streams: plain, steered and a second plain stream (A/A control) decode side by side,
  one forward each per step in alternating order; the overhead is the median over steps of
  steered / mean(plain, plain_b), with a bootstrap 95 % interval (the control shows the method's
  own noise floor);
* a hook micro-benchmark: the ``Steerer``'s hooks on a stand-in model of identity layers, i.e. the
  hooks' own cost per decode step with no model noise at all.

Target: steering decode overhead <= 1 %.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    Report,
    Run,
    Target,
    build_parser,
    finish_args,
    fixed_length,
    load_lm,
    median,
    mixed_queries,
    paired_ratios,
    summary,
    synchronize,
    time_call,
)

NAME = "decode_overhead"


def steering_setup(lm: Any, prompts: list[list[int]], seed: int) -> tuple[dict[int, Any], Any]:
    """Random unit vectors on the SCANS steering layers, scaled as a relative-alpha artifact."""
    from safesteer.core.activations import capture
    from safesteer.methods.scans.settings import default_settings

    settings = default_settings(lm.num_layers)
    layers = list(settings.steer_layers)
    states = capture(lm, prompts, [-1], layers=layers)  # [n, layers, 1, hidden]
    norms = states[:, :, 0].norm(dim=-1).mean(dim=0)
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    for i, layer in enumerate(layers):
        v = torch.randn(lm.hidden_size, generator=gen)
        vectors[layer] = settings.alpha * float(norms[i]) * v / v.norm()
    return vectors, settings


def hook_microbenchmark(lm: Any, vectors: dict[int, Any], rows: int, iters: int) -> dict[str, Any]:
    """Cost of the steering hooks alone, per decode step, on a stand-in with the same hook layout.

    A model of ``num_layers`` identity layers called like a decode step (``[rows, 1, hidden]``),
    timed without hooks and with a real ``Steerer`` (tracker pre-hook + a hook per steering layer).
    """
    from safesteer.core.handle import LoadedModel
    from safesteer.core.steering import steering

    class Identity(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Stand(nn.Module):
        def __init__(self, n: int, hidden: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(4, hidden)
            self.layers = nn.ModuleList(Identity() for _ in range(n))

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = state
            for layer in self.layers:
                x = layer(x)
            return x

    stand = Stand(lm.num_layers, lm.hidden_size).to(lm.device, lm.dtype)
    fake = LoadedModel(stand, lm.tokenizer, list(stand.layers), "layers", "stand-in")  # type: ignore[arg-type]
    state = torch.zeros(rows, 1, lm.hidden_size, device=lm.device, dtype=lm.dtype)
    ids = torch.zeros(rows, 1, dtype=torch.long, device=lm.device)
    mask = torch.ones(rows, 64, dtype=torch.long, device=lm.device)
    coeffs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(rows)])

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            stand(input_ids=ids, attention_mask=mask)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters

    samples: dict[str, list[float]] = {"plain": [], "steered": []}
    with torch.inference_mode():
        loop()
        for rep in range(5):
            for name in ("plain", "steered") if rep % 2 == 0 else ("steered", "plain"):
                if name == "plain":
                    samples[name].append(loop())
                else:
                    with steering(fake, vectors, coeffs, start_column=0):
                        samples[name].append(loop())
    plain, steered = median(samples["plain"]), median(samples["steered"])
    return {
        "rows": rows,
        "iters": iters,
        "plain_step_us": plain * 1e6,
        "steered_step_us": steered * 1e6,
        "hook_cost_us_per_step": (steered - plain) * 1e6,
    }


STREAMS = ("plain", "steered", "plain_b")


def paired_steps(
    lm: Any,
    encoded: list[list[int]],
    vectors: dict[int, Any],
    coeffs: torch.Tensor,
    steps: int,
    device: str,
) -> dict[str, list[float]]:
    """Decode three streams side by side, one forward each per step: ``plain``, ``steered`` and a
    second unsteered ``plain_b`` (an A/A control that shows the method's own bias and noise).

    Each stream has its own KV cache; only the forward call is timed, and the steering hooks are
    registered just around the steered stream's forwards. The order alternates every step
    (plain, steered, plain_b / plain_b, steered, plain), so adjacent forwards see the same machine
    load and their ratios resolve differences far below the run-to-run drift.
    """
    from safesteer.core.activations import forward
    from safesteer.core.generation import new_cache
    from safesteer.core.layout import Batch, left_pad
    from safesteer.core.steering import Steerer

    batch = left_pad(encoded, int(lm.tokenizer.pad_token_id), lm.device)
    start = batch.width - 1
    streams: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name in STREAMS:
            cache = new_cache(lm)
            steerer = Steerer(lm, vectors, coeffs, start) if name == "steered" else None
            out = forward(lm, batch, past_key_values=cache, use_cache=True)
            if steerer is not None:
                steerer.remove()
            streams[name] = {
                "cache": cache,
                "mask": batch.attention_mask,
                "token": out.logits[:, -1, :].argmax(dim=-1),
                "times": [],
            }
        position = batch.position_ids[:, -1:] + 1
        for step in range(steps):
            for name in STREAMS if step % 2 == 0 else STREAMS[::-1]:
                st = streams[name]
                token = st["token"][:, None]
                st["mask"] = torch.cat([st["mask"], torch.ones_like(token)], dim=1)
                steerer = Steerer(lm, vectors, coeffs, start) if name == "steered" else None
                step_batch = Batch(token, st["mask"], position)
                synchronize(device)
                t0 = time.perf_counter()
                out = forward(lm, step_batch, past_key_values=st["cache"], use_cache=True)
                synchronize(device)
                st["times"].append(time.perf_counter() - t0)
                if steerer is not None:
                    steerer.remove()
                st["token"] = out.logits[:, -1, :].argmax(dim=-1)
            position = position + 1
    return {name: streams[name]["times"] for name in STREAMS}


def bootstrap_median_ci(values: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (n, len(values)), generator=gen)
    meds = data[idx].median(dim=1).values.sort().values
    return float(meds[int(0.025 * n)]), float(meds[int(0.975 * n) - 1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=2)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (quick: 32)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    parser.add_argument(
        "--paired-steps", type=int, default=None, help="steps per step-paired rep (64; quick 16)"
    )
    args = finish_args(parser.parse_args(argv))
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    paired = args.paired_steps or (16 if args.quick else 64)

    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout, left_pad
    from safesteer.core.steering import steering

    torch.manual_seed(args.seed)
    lm = load_lm(args.device)
    layout = ChatLayout(lm.tokenizer)
    queries = mixed_queries(max(batch_sizes), args.seed)
    encoded_all = [layout.prompt_ids(q) for q in queries]
    vectors, settings = steering_setup(lm, encoded_all, args.seed)
    config = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=args.repetition_penalty)
    warm_config = GenerationConfig(max_new_tokens=4, repetition_penalty=args.repetition_penalty)
    pad_id = int(lm.tokenizer.pad_token_id)

    report = Report(
        NAME,
        args,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "batch_sizes": batch_sizes,
            "new_tokens": new_tokens,
            "paired_steps": paired,
            "repetition_penalty": args.repetition_penalty,
            "steer_layers": list(settings.steer_layers),
            "relative_alpha": settings.alpha,
            "vector_norms": {str(k): float(v.norm()) for k, v in vectors.items()},
            "stop_tokens": "disabled (fixed-length decoding)",
            "order": "interleaved, alternating per repetition; one untimed warm-up each",
        },
    )
    rows_table: list[list[Any]] = []
    overhead_by_batch: dict[int, float] = {}
    for bs in batch_sizes:
        encoded = encoded_all[:bs]
        width = max(len(e) for e in encoded)
        coeffs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(bs)])
        batch = left_pad(encoded, pad_id, lm.device)

        def plain(cfg: GenerationConfig = config, enc: list[list[int]] = encoded) -> Any:
            with fixed_length():
                return generate_ids(lm, enc, cfg)

        def steered(
            cfg: GenerationConfig = config,
            enc: list[list[int]] = encoded,
            c: torch.Tensor = coeffs,
            w: int = width,
        ) -> Any:
            with fixed_length(), steering(lm, vectors, c, start_column=w - 1):
                return generate_ids(lm, enc, cfg)

        def hf(n: int = new_tokens, b: Any = batch) -> Any:
            with torch.inference_mode():
                return lm.model.generate(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    repetition_penalty=args.repetition_penalty,
                    pad_token_id=pad_id,
                )

        workloads = {"plain": plain, "steered": steered}
        if not args.no_hf:
            workloads["hf"] = hf
        # warm-up with a few tokens
        plain(warm_config)
        steered(warm_config)
        if not args.no_hf:
            hf(4)
        runs: dict[str, list[Run]] = {name: [] for name in workloads}
        names = list(workloads)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                run, _ = time_call(workloads[name], lm.model, args.device, new_tokens=new_tokens)
                runs[name].append(run)
        tps = {n: [r.decode_tokens_per_s for r in rs] for n, rs in runs.items()}
        overheads = [r - 1 for r in paired_ratios(tps["plain"], tps["steered"])]
        overhead_by_batch[bs] = median(overheads)
        for name, rs in runs.items():
            rel = paired_ratios(tps[name], tps["plain"])
            rows_table.append(
                [
                    bs,
                    name,
                    median(tps[name]),
                    median([1e3 * r.decode / r.decode_forwards for r in rs]),
                    median([1e3 * r.prefill for r in rs]),
                    median([1e3 * r.setup for r in rs]),
                    median([r.total for r in rs]),
                    median(rel),
                ]
            )
        report.data[f"batch_{bs}"] = {
            "prompt_tokens": [len(e) for e in encoded],
            "runs": {n: [r.to_json() for r in rs] for n, rs in runs.items()},
            "decode_tokens_per_s": {n: summary(v) for n, v in tps.items()},
            "steering_overhead": summary(overheads),
        }
        if "hf" in tps:
            report.data[f"batch_{bs}"]["plain_vs_hf_speed"] = summary(
                paired_ratios(tps["plain"], tps["hf"])
            )

    report.table(
        f"Decode throughput ({new_tokens} new tokens, medians of {args.reps} interleaved reps)",
        [
            "batch",
            "workload",
            "decode tok/s",
            "ms/step",
            "prefill ms",
            "setup ms",
            "total s",
            "tok/s vs plain",
        ],
        rows_table,
    )
    paired_rows = []
    paired_by_batch: dict[int, float] = {}
    for bs in batch_sizes:
        coeffs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(bs)])
        times: dict[str, list[float]] = {name: [] for name in STREAMS}
        for _ in range(args.reps):
            got = paired_steps(lm, encoded_all[:bs], vectors, coeffs, paired, args.device)
            for name in STREAMS:
                times[name] += got[name]
        plain_mean = [(a + b) / 2 for a, b in zip(times["plain"], times["plain_b"], strict=True)]
        steer_ratio = paired_ratios(times["steered"], plain_mean)
        control_ratio = paired_ratios(times["plain_b"], times["plain"])
        paired_by_batch[bs] = median(steer_ratio) - 1
        lo, hi = bootstrap_median_ci(steer_ratio, args.seed)
        c_lo, c_hi = bootstrap_median_ci(control_ratio, args.seed)
        report.data[f"batch_{bs}"]["paired_steps"] = {
            "step_seconds": {name: summary(v) for name, v in times.items()},
            "steered_over_plain": summary(steer_ratio),
            "steered_over_plain_ci95": [lo, hi],
            "control_plain_b_over_plain": summary(control_ratio),
            "control_ci95": [c_lo, c_hi],
        }
        paired_rows.append(
            [
                bs,
                len(steer_ratio),
                1e3 * median(times["plain"]),
                1e3 * median(times["steered"]),
                f"{100 * paired_by_batch[bs]:+.2f} [{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}]",
                f"{100 * (median(control_ratio) - 1):+.2f} "
                f"[{100 * (c_lo - 1):+.2f}, {100 * (c_hi - 1):+.2f}]",
            ]
        )
    report.table(
        f"Steering overhead per decode forward, step-interleaved streams ({paired} steps x "
        f"{args.reps} reps)",
        [
            "batch",
            "step triples",
            "plain ms",
            "steered ms",
            "steered vs plain % [95% CI]",
            "A/A control % [95% CI]",
        ],
        paired_rows,
    )
    micro_rows = []
    for bs in batch_sizes:
        micro = hook_microbenchmark(lm, vectors, bs, iters=300 if args.quick else 2000)
        step_ms = median(
            [
                1e3 * r["decode"] / r["decode_forwards"]
                for r in report.data[f"batch_{bs}"]["runs"]["plain"]
            ]
        )
        micro["share_of_plain_step"] = micro["hook_cost_us_per_step"] / (step_ms * 1e3)
        report.data[f"batch_{bs}"]["hook_microbenchmark"] = micro
        micro_rows.append(
            [
                bs,
                micro["plain_step_us"],
                micro["steered_step_us"],
                micro["hook_cost_us_per_step"],
                step_ms,
                100 * micro["share_of_plain_step"],
            ]
        )
    report.table(
        "Steering hook cost per decode step (stand-in model with identity layers)",
        ["batch", "no hooks µs", "with Steerer µs", "hook cost µs", "plain step ms", "% of step"],
        micro_rows,
    )
    for bs, value in paired_by_batch.items():
        report.target(
            Target(
                f"steering decode overhead (step-paired), batch {bs}",
                100 * value,
                1.0,
                "<=",
                "%",
                "median over steps of steered / mean(adjacent plain forwards), minus 1",
            )
        )
    for bs in batch_sizes:
        micro = report.data[f"batch_{bs}"]["hook_microbenchmark"]
        report.target(
            Target(
                f"steering hook cost / plain decode step, batch {bs}",
                100 * micro["share_of_plain_step"],
                1.0,
                "<=",
                "%",
                "hook micro-benchmark",
            )
        )
    report.data["whole_run_overhead_percent"] = {
        str(bs): 100 * value for bs, value in overhead_by_batch.items()
    }
    report.note(
        "Whole runs are tens of seconds apart and carry the machine's drift, so their ratio "
        "('tok/s vs plain') is shown but is no target; the step-paired figure compares adjacent "
        "forwards and is the one to read. The hook micro-benchmark gives the hooks' own cost "
        "with no model at all."
    )
    return report.emit()


if __name__ == "__main__":
    main()
