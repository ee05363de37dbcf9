"""SCANS evaluation of XSTest prompts: fused batched path vs the original batch-1, two-forward loop.

* ``fused``    – ``scans_generate(..., batch_size=16)``: length-sorted batches, one prefill per
  batch shared by the classifier and the steered generation;
* ``baseline`` – what the original SCANS code does, built from the library's primitives: for each
  prompt alone, a full forward of prompt + ``Sure`` to classify (``classify``, batch 1), then a
  steered generation with its own full prefill (``steering`` + ``generate_ids``, batch 1).

Both decode with the library's stop tokens (as an evaluation would), greedy, repetition penalty
1.1. The baseline is slow, so by default it runs on a seeded random subset of the sampled prompts
(``--baseline-prompts``) split in two halves around the fused run (A B A: cancels a linear drift);
its mean time per prompt is scaled to the whole sample. Decisions are compared prompt by prompt on
the subset, and against ``classify`` (the two-pass reference, batched) on the whole sample.

Target: speedup >= 8x.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from benchmarks.common import (
    Report,
    Target,
    build_parser,
    finish_args,
    fit_artifact,
    load_lm,
    synchronize,
)

NAME = "xstest_eval"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=1)
    parser.add_argument("--prompts", type=int, default=None, help="default 200 (quick: 40)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument(
        "--baseline-prompts",
        type=int,
        default=None,
        help="prompts the batch-1 baseline runs on (default 32; quick: all; 0 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--anchors", type=int, default=None, help="per side (default 64; quick 16)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    args = finish_args(parser.parse_args(argv), quick_reps=1)
    n_prompts = args.prompts or (40 if args.quick else 200)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    anchors = args.anchors or (16 if args.quick else 64)
    n_base = args.baseline_prompts
    if n_base is None:
        n_base = 0 if args.quick else 32

    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.core.steering import steering
    from safesteer.datasets import load_test_set, stratified_sample
    from safesteer.methods.scans.decide import classify, signed
    from safesteer.methods.scans.generate import scans_generate

    lm = load_lm(args.device)
    artifact = fit_artifact(lm, anchors, args.seed)
    sample = stratified_sample(load_test_set("xstest"), n_prompts, args.seed)
    queries = [p.text for p in sample]
    n_base = len(queries) if n_base <= 0 else min(n_base, len(queries))
    base_idx = sorted(random.Random(args.seed + 1).sample(range(len(queries)), n_base))
    config = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=args.repetition_penalty)
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    vectors = artifact.steering_vectors()

    def baseline_one(query: str) -> tuple[Any, list[int]]:
        decision = classify(lm, artifact, [query], batch_size=1)[0]
        prompt = layout.prompt_ids(query)
        with steering(lm, vectors, signed([decision]), start_column=len(prompt) - 1):
            generated = generate_ids(lm, [prompt], config)
        return decision, generated.token_ids[0]

    def timed(fn: Any) -> tuple[float, Any]:
        synchronize(args.device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(args.device)
        return time.perf_counter() - t0, out

    # warm-up (untimed)
    scans_generate(lm, artifact, queries[:2], GenerationConfig(max_new_tokens=2), batch_size=2)
    baseline_one(queries[0])

    fused_times: list[float] = []
    base_times: list[float] = []
    base_out: dict[int, tuple[Any, list[int]]] = {}
    fused_out: list[Any] = []
    half = len(base_idx) // 2
    for _rep in range(args.reps):
        t_a, first = timed(lambda: [baseline_one(queries[i]) for i in base_idx[:half]])
        t_f, fused_out = timed(
            lambda: scans_generate(lm, artifact, queries, config, batch_size=args.batch_size)
        )
        t_b, second = timed(lambda: [baseline_one(queries[i]) for i in base_idx[half:]])
        fused_times.append(t_f)
        base_times.append(t_a + t_b)
        base_out = dict(zip(base_idx, first + second, strict=True))

    fused_per_prompt = [t / len(queries) for t in fused_times]
    base_per_prompt = [t / len(base_idx) for t in base_times]
    speedups = [b / f for b, f in zip(base_per_prompt, fused_per_prompt, strict=True)]
    speedup = sorted(speedups)[len(speedups) // 2]

    # decisions: baseline (batch 1) vs fused on the subset; batched classify vs fused on all
    agree_sub = sum(base_out[i][0].sigma == fused_out[i].decision.sigma for i in base_idx)
    score_diff_sub = max(abs(base_out[i][0].score - fused_out[i].decision.score) for i in base_idx)
    same_tokens = sum(base_out[i][1] == fused_out[i].token_ids for i in base_idx)
    with torch.inference_mode():
        reference = classify(lm, artifact, queries, batch_size=args.batch_size)
    agree_all = sum(r.sigma == f.decision.sigma for r, f in zip(reference, fused_out, strict=True))
    score_diff_all = max(
        abs(r.score - f.decision.score) for r, f in zip(reference, fused_out, strict=True)
    )
    threshold = artifact.settings.threshold
    near = sum(abs(f.decision.score - threshold) < 1e-4 for f in fused_out)
    unsafe_flagged = sum(f.decision.sigma == 1 for f in fused_out)
    gen_tokens = sum(len(f.token_ids) for f in fused_out)
    # decode work of the batched path: every row of a batch steps until its longest row stops
    lengths = [len(layout.prompt_ids(q)) for q in queries]
    order = sorted(range(len(queries)), key=lambda i: lengths[i])
    row_steps = 0
    useful = 0
    for start in range(0, len(order), args.batch_size):
        chunk = order[start : start + args.batch_size]
        steps = [len(fused_out[i].token_ids) + int(fused_out[i].stopped) for i in chunk]
        row_steps += len(chunk) * max(steps)
        useful += sum(steps)
    utilisation = useful / row_steps if row_steps else float("nan")

    report = Report(
        NAME,
        args,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "prompts": len(queries),
            "sample": f"stratified_sample(load_test_set('xstest'), {n_prompts}, seed={args.seed})",
            "baseline_prompts": len(base_idx),
            "new_tokens": new_tokens,
            "repetition_penalty": args.repetition_penalty,
            "batch_size": args.batch_size,
            "anchors_per_side": anchors,
            "threshold": threshold,
            "stop_tokens": "enabled (evaluation semantics)",
        },
    )
    report.table(
        f"XSTest SCANS evaluation ({len(queries)} prompts, {new_tokens} new tokens)",
        ["path", "prompts timed", "time s", "s / prompt", "speedup"],
        [
            [
                "baseline batch-1 two-forward",
                len(base_idx),
                base_times[-1],
                base_per_prompt[-1],
                1.0,
            ],
            [
                f"fused, batch {args.batch_size}",
                len(queries),
                fused_times[-1],
                fused_per_prompt[-1],
                speedup,
            ],
        ],
    )
    report.table(
        "Agreement",
        ["check", "agree", "of", "max abs score diff"],
        [
            ["decision: batch-1 baseline vs fused", agree_sub, len(base_idx), score_diff_sub],
            ["decision: classify() batched vs fused", agree_all, len(queries), score_diff_all],
            ["identical response tokens (subset)", same_tokens, len(base_idx), None],
        ],
    )
    report.table(
        "Batched decode utilisation (fused path)",
        ["row-steps run", "tokens needed", "utilisation", "rows stopped early"],
        [[row_steps, useful, utilisation, sum(bool(f.stopped) for f in fused_out)]],
    )
    report.data = {
        "fused_seconds": fused_times,
        "baseline_seconds": base_times,
        "speedups": speedups,
        "baseline_indices": base_idx,
        "flagged_unsafe": unsafe_flagged,
        "scores_within_1e-4_of_threshold": near,
        "generated_tokens_fused": gen_tokens,
        "decode_row_steps": row_steps,
        "decode_tokens_needed": useful,
        "decode_utilisation": utilisation,
        "mismatched_decisions": [
            {"index": i, "baseline": base_out[i][0].score, "fused": fused_out[i].decision.score}
            for i in base_idx
            if base_out[i][0].sigma != fused_out[i].decision.sigma
        ],
    }
    report.target(Target("speedup fused vs batch-1 baseline", speedup, 8.0, ">=", "x"))
    report.target(
        Target("decision agreement (subset)", agree_sub / len(base_idx), 1.0, ">=", "share")
    )
    if len(base_idx) < len(queries):
        report.note(
            f"the baseline ran on {len(base_idx)} of {len(queries)} prompts (seeded subset); "
            "its mean time per prompt is compared with the fused path's over all prompts."
        )
    return report.emit()


if __name__ == "__main__":
    main()
