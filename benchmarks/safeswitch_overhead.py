"""SafeSwitch switched generation vs plain generation (benchmark 4).

Three workloads on the same left-padded batch, interleaved (ABC, CBA, ...), stop tokens disabled so
every run decodes exactly N tokens:

* ``plain``      – ``generate_ids`` without hooks;
* ``unflagged``  – ``switched_generate_ids`` with stage 1 set never to fire (threshold above 1):
  the probers' hooks run, no row is switched — the cost SafeSwitch adds to benign traffic;
* ``half``       – thresholds set so about half the rows are flagged (stage-1 threshold at the
  median stage-1 probability of the batch, stage 2 always passing): those rows take the refusal
  head's logits from the switch point on.

Needs a fitted SafeSwitch artifact for the embedded model (``--artifact DIR``; make one with
``safesteer fit safeswitch --limit 200 --out DIR``). Target: overhead on unflagged rows <= 3 %.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Report,
    Target,
    build_parser,
    finish_args,
    fixed_length,
    interleave,
    load_lm,
    median,
    mixed_queries,
    paired_ratios,
    summary,
    synchronize,
)

NAME = "safeswitch_overhead"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its JSON."""
    parser = build_parser(NAME, __doc__ or "", default_reps=5)
    parser.add_argument(
        "--artifact",
        type=Path,
        default=Path("runs/safeswitch-embedded"),
        help="a SafeSwitch artifact fitted on the embedded model",
    )
    args = finish_args(parser.parse_args(argv))
    from safesteer.generation import GenerationConfig, generate_ids
    from safesteer.layout import ChatLayout
    from safesteer.methods.safeswitch import SafeSwitchArtifact, switched_generate_ids

    if not (args.artifact / "manifest.json").exists():
        raise SystemExit(
            f"no SafeSwitch artifact at {args.artifact}: run "
            f"`safesteer fit safeswitch --limit 200 --out {args.artifact}` first"
        )
    lm = load_lm(args.device)
    artifact = SafeSwitchArtifact.load(args.artifact, lm)
    rows = 4 if args.quick else 16
    new_tokens = 16 if args.quick else 64
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    prompts = [layout.prompt_ids(q) for q in mixed_queries(rows, args.seed)]
    config = GenerationConfig(max_new_tokens=new_tokens)

    never = artifact.with_settings(threshold1=1.01)
    _, probe = switched_generate_ids(lm, artifact, prompts, config)
    stage1 = sorted(d.stage1 for d in probe if d.stage1 is not None)
    cut = stage1[len(stage1) // 2] if stage1 else 0.5
    half = artifact.with_settings(threshold1=cut, threshold2=0.0)

    def timed(fn: Any) -> Any:
        def run() -> tuple[float, Any]:
            synchronize(args.device)
            start = time.perf_counter()
            out = fn()
            synchronize(args.device)
            return time.perf_counter() - start, out

        return run

    workloads = {
        "plain": timed(lambda: generate_ids(lm, prompts, config)),
        "unflagged": timed(lambda: switched_generate_ids(lm, never, prompts, config)),
        "half": timed(lambda: switched_generate_ids(lm, half, prompts, config)),
    }
    with fixed_length():
        results = interleave(args.reps, workloads)
    seconds = {name: [t for t, _ in runs] for name, runs in results.items()}
    flagged = sum(d.flagged for d in results["half"][-1][1][1])
    unflagged_flags = sum(d.flagged for d in results["unflagged"][-1][1][1])
    ratio_unflagged = paired_ratios(seconds["unflagged"], seconds["plain"])
    ratio_half = paired_ratios(seconds["half"], seconds["plain"])
    report = Report(
        NAME,
        args,
        {"rows": rows, "new_tokens": new_tokens, "artifact": str(args.artifact)},
    )
    report.table(
        f"SafeSwitch vs plain generation ({rows} rows x {new_tokens} tokens, medians)",
        ["workload", "seconds", "ratio to plain", "rows flagged"],
        [
            ["plain", median(seconds["plain"]), 1.0, 0],
            ["unflagged", median(seconds["unflagged"]), median(ratio_unflagged), unflagged_flags],
            ["half flagged", median(seconds["half"]), median(ratio_half), flagged],
        ],
    )
    report.target(
        Target(
            "SafeSwitch overhead, unflagged rows",
            100 * (median(ratio_unflagged) - 1),
            3.0,
            "<=",
            "%",
        )
    )
    report.data = {
        "seconds": seconds,
        "ratio_unflagged": summary(ratio_unflagged),
        "ratio_half": summary(ratio_half),
        "stage1_cut": cut,
    }
    return report.emit()


if __name__ == "__main__":
    main()
