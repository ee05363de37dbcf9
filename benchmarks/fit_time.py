"""Time to fit SCANS on 64 + 64 anchors vs one plain prefill of the same 128 prompts.

* ``fit``     – ``fit_scans`` with default settings (captures prompt + ``Sure`` at every layer for
  both anchor sets, builds vectors and the reference, calibrates the threshold);
* ``prefill`` – one forward of the same 128 generation prompts, batched like the fit (each side
  length-sorted in batches of 16; no cache, LM head on the last column), i.e. what any method pays
  to read the anchors once.

Repetitions alternate (fit, prefill, prefill, fit, ...). Reported: fit seconds, ms per anchor, the
ratio fit / prefill, and the share of fit time spent outside model forwards.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import (
    Report,
    Run,
    build_parser,
    finish_args,
    load_lm,
    median,
    paired_ratios,
    summary,
    time_call,
)

NAME = "fit_time"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=2)
    parser.add_argument("--anchors", type=int, default=None, help="per side (default 64; quick 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = finish_args(parser.parse_args(argv))
    per_side = args.anchors or (16 if args.quick else 64)

    from safesteer.core.activations import forward
    from safesteer.core.layout import ChatLayout, left_pad
    from safesteer.datasets import draw_anchors
    from safesteer.methods.scans.fit import fit_scans
    from safesteer.methods.scans.settings import default_settings

    lm = load_lm(args.device)
    anchors = draw_anchors(per_side, args.seed)
    settings = default_settings(lm.num_layers)
    layout = ChatLayout(lm.tokenizer, settings.system_prompt)
    sides = [[layout.prompt_ids(q) for q in side] for side in (anchors.harmful, anchors.benign)]
    prompts = sides[0] + sides[1]
    # the fit captures each side separately, length-sorted in batches: do the same
    batches: list[list[list[int]]] = []
    for side in sides:
        ordered = sorted(side, key=len)
        batches += [
            ordered[i : i + args.batch_size] for i in range(0, len(ordered), args.batch_size)
        ]
    pad_id = int(lm.tokenizer.pad_token_id)

    def fit() -> Any:
        return fit_scans(
            lm,
            anchors.harmful,
            anchors.benign,
            settings,
            seed=args.seed,
            batch_size=args.batch_size,
        )

    @torch.inference_mode()
    def prefill() -> None:
        for chunk in batches:
            forward(lm, left_pad(chunk, pad_id, lm.device), use_cache=False)

    # warm-up on a few anchors (allocator, kernels), untimed
    fit_scans(lm, anchors.harmful[:2], anchors.benign[:2], settings, seed=args.seed)
    with torch.inference_mode():
        forward(lm, left_pad(prompts[:4], pad_id, lm.device), use_cache=False)
    runs: dict[str, list[Run]] = {"fit": [], "prefill": []}
    for rep in range(args.reps):
        for name in ("fit", "prefill") if rep % 2 == 0 else ("prefill", "fit"):
            fn = fit if name == "fit" else prefill
            run, _ = time_call(fn, lm.model, args.device, n_prefill=1)
            runs[name].append(run)

    n_anchors = 2 * per_side
    fit_s = [r.total for r in runs["fit"]]
    pre_s = [r.total for r in runs["prefill"]]
    ratio = paired_ratios(fit_s, pre_s)
    outside = [1 - sum(r.forward_seconds) / r.total for r in runs["fit"]]
    reply_len = len(layout.reply_ids(settings.reply_prefix))
    prompt_tokens = sum(len(p) for p in prompts)
    token_ratio = (prompt_tokens + reply_len * len(prompts)) / prompt_tokens
    padded_prefill = sum(max(len(p) for p in chunk) * len(chunk) for chunk in batches)
    padded_ratio = (padded_prefill + reply_len * len(prompts)) / padded_prefill
    report = Report(
        NAME,
        args,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "anchors_per_side": per_side,
            "batch_size": args.batch_size,
            "prompt_tokens_total": prompt_tokens,
            "reply_prefix": settings.reply_prefix,
        },
    )
    report.table(
        f"SCANS fit time ({per_side}+{per_side} anchors, medians of {args.reps} reps)",
        ["workload", "seconds", "ms / anchor", "forwards", "share outside forwards"],
        [
            [
                "fit_scans",
                median(fit_s),
                1e3 * median(fit_s) / n_anchors,
                len(runs["fit"][0].forward_seconds),
                median(outside),
            ],
            [
                "plain prefill, same prompts",
                median(pre_s),
                1e3 * median(pre_s) / n_anchors,
                len(runs["prefill"][0].forward_seconds),
                median([1 - sum(r.forward_seconds) / r.total for r in runs["prefill"]]),
            ],
            ["ratio fit / prefill (time)", median(ratio), None, None, None],
            ["ratio fit / prefill (tokens run)", token_ratio, None, None, None],
            ["ratio fit / prefill (padded positions run)", padded_ratio, None, None, None],
        ],
    )
    report.data = {
        "fit_seconds": summary(fit_s),
        "prefill_seconds": summary(pre_s),
        "fit_over_prefill": summary(ratio),
        "fit_share_outside_forwards": summary(outside),
        "ms_per_anchor": summary([1e3 * s / n_anchors for s in fit_s]),
        "token_ratio": token_ratio,
        "padded_position_ratio": padded_ratio,
    }
    return report.emit()


if __name__ == "__main__":
    main()
