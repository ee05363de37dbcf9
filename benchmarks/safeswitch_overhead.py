"""SafeSwitch switched generation vs plain generation (benchmark 4).

Three workloads on the same left-padded batch, interleaved (ABC, CBA, ...), stop tokens disabled so
every run decodes exactly N tokens:

* ``plain``      – ``generate_ids`` without hooks;
* ``unflagged``  – ``switched_generate_ids`` with stage 1 set never to fire (threshold above 1):
  the probers' hooks run, no row is switched — the cost SafeSwitch adds to benign traffic;
* ``half``       – thresholds set so about half the rows are flagged (stage-1 threshold at the
  median stage-1 probability of the batch, stage 2 always passing): those rows take the refusal
  head's logits from the switch point on.

Uses the SafeSwitch artifact in ``--artifact DIR`` (default ``runs/safeswitch-embedded``; make one
with ``safesteer fit safeswitch --limit 200 --out DIR``) when it exists. Without one (a fresh
clone) it builds a *timing artifact* for the embedded model in a second: seeded random probers and
a random refusal-head difference of the real shapes, at the fitted artifact's layer and
``n_decode``. The cost is the same as a trained artifact's (the same hooks, prober matmuls and
head switch; the workloads set the thresholds themselves), only the flags are meaningless, which
these workloads do not use. The JSON records which artifact was used.
Target: overhead on unflagged rows <= 3 %.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
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
DEFAULT_ARTIFACT = Path("runs/safeswitch-embedded")


def timing_artifact(lm: Any, seed: int) -> Any:
    """A SafeSwitch artifact with random probers and head difference (timing only, see above)."""
    import torch

    from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_checksum
    from safesteer.methods.safeswitch.settings import Prober, SafeSwitchSettings

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stage1, stage2 = Prober(lm.hidden_size).eval(), Prober(lm.hidden_size).eval()
        head = lm.model.get_output_embeddings().weight
        delta = (0.01 * torch.randn(tuple(head.shape))).half()
    return SafeSwitchArtifact(
        settings=SafeSwitchSettings(layer=lm.num_layers - 1),
        stage1=stage1,
        stage2=stage2,
        head_delta=delta,
        model_fingerprint=lm.fingerprint(),
        base_head_checksum=head_checksum(lm),
        training={"note": "timing artifact: random probers and head, not trained"},
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its JSON."""
    parser = build_parser(NAME, __doc__ or "", default_reps=5)
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help=f"a SafeSwitch artifact fitted on the model (embedded model: default "
        f"{DEFAULT_ARTIFACT} if it exists; else a random timing artifact)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a model of `safesteer models list` or a path (default: the embedded model); "
        "results go to benchmarks/results/safeswitch_overhead.MODEL.json",
    )
    args = parser.parse_args(argv)
    if args.model and args.out is None:
        suffix = ".quick.json" if args.quick else ".json"
        args.out = RESULTS_DIR / f"{NAME}.{Path(args.model).name}{suffix}"
    args = finish_args(args)
    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
    from safesteer.methods.safeswitch.generate import switched_generate_ids

    if args.artifact is not None and not (args.artifact / "manifest.json").exists():
        raise SystemExit(
            f"no SafeSwitch artifact at {args.artifact}: run "
            f"`safesteer fit safeswitch --limit 200 --out {args.artifact}` first, or omit "
            "--artifact to time a random timing artifact"
        )
    lm = load_lm(args.device, args.model)
    # the default folder holds an artifact of the embedded model only
    folder = args.artifact or (DEFAULT_ARTIFACT if args.model is None else None)
    if folder is not None and (folder / "manifest.json").exists():
        artifact = SafeSwitchArtifact.load(folder, lm)
        artifact_used = str(folder)
    else:
        print(
            "no SafeSwitch artifact given or found: timing a random artifact of the same "
            "shapes (fit one with `safesteer fit safeswitch --out DIR`, then pass --artifact DIR)",
            flush=True,
        )
        artifact = timing_artifact(lm, args.seed)
        artifact_used = "timing artifact (random probers and head)"
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
        {
            "rows": rows,
            "new_tokens": new_tokens,
            "artifact": artifact_used,
            "model": args.model or "embedded",
        },
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
