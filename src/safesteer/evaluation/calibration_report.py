"""Report of a SCANS calibration: gate quality per layer, the screen, the threshold Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _plot_gate(gate: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for kind, values in gate["per_layer_auroc"].items():
        ax.plot(range(len(values)), values, marker=".", label=kind)
    ax.axhline(gate["paper_transition_auroc_validation"], ls="--", c="grey", label="paper gate")
    ax.set_xlabel("layer")
    ax.set_ylabel("out-of-fold AUROC (one-layer probe)")
    ax.set_title("harmful vs safe, anchors + validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _steer_label(row: dict[str, Any]) -> str:
    """``0.1`` for additive steering, ``clamp q0.1`` for a clamp at that quantile."""
    if row.get("away_mode", "add") == "clamp":
        return f"clamp q{row['cap_quantile']}"
    return str(row["alpha"])


def _plot_screen(screen: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for direction in sorted({r["direction"] for r in screen}):
        rows = [r for r in screen if r["direction"] == direction]
        ax.scatter(
            [r["plain_ppl_ratio"] for r in rows],
            [r["refusal_logprob_drop"] for r in rows],
            label=direction,
            s=18,
        )
        for r in rows:
            ax.annotate(
                f"{r['layers'][0]}-{r['layers'][-1]}@{_steer_label(r)}",
                (r["plain_ppl_ratio"], r["refusal_logprob_drop"]),
                fontsize=5,
            )
    ax.set_xlabel("perplexity ratio of plain answers (steered / unsteered)")
    ax.set_ylabel("drop of refusal log-prob per token")
    ax.set_title("screen: steering away on over-refused safe prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pareto(calibration: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for policy, table in calibration["pareto"].items():
        ax.plot(
            [r["safe_refusal"] for r in table],
            [r["unsafe_refusal"] for r in table],
            marker=".",
            ms=3,
            label=policy,
        )
    base = calibration["default_rates"]
    ax.scatter([base["safe_refusal"]], [base["unsafe_refusal"]], c="k", marker="x", label="default")
    chosen = calibration["chosen"]["validation"]
    ax.scatter(
        [chosen["safe_refusal"]],
        [chosen["unsafe_refusal"]],
        c="red",
        marker="*",
        s=90,
        label="chosen",
    )
    ax.set_xlabel("validation safe refusal % (lower is better)")
    ax.set_ylabel("validation unsafe refusal % (higher is better)")
    ax.set_title(f"threshold sweep at alpha {calibration['chosen']['alpha']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _thresholds(pick: dict[str, Any]) -> str:
    text = f"T {pick['threshold']:.3f}"
    if pick.get("toward_threshold") is not None:
        text += f", towards from {pick['toward_threshold']:.3f}"
    return text


def _plain(rates: dict[str, Any]) -> str:
    return f" {rates['plain_refusal']:.1f} |" if "plain_refusal" in rates else ""


def _reference_lines(gate: dict[str, Any]) -> list[str]:
    """What the gate makes of the reference-text windows (benign training rows), if any."""
    n = gate.get("reference_windows", 0)
    if not n:
        return []
    return [
        f"- reference-text windows among its benign rows: {n} (sizes {gate['reference_sizes']} "
        f"tokens); out-of-fold P(harmful) mean {gate['reference_mean_probability']:.3f}, max "
        f"{gate['reference_max_probability']:.3f}, {gate['reference_flagged_at_half']:.1f} % at "
        "0.5 or above"
    ]


def _refusal_gate_lines(gate: dict[str, Any]) -> list[str]:
    """The refusal gate (steer away only where the model would refuse), if the calibration has
    one."""
    refusal = gate.get("refusal_gate")
    if not refusal:
        return []
    if "skipped" in refusal:
        return [f"- no refusal gate ({refusal['skipped']}): every row below T is steered away"]
    return [
        f"- refusal gate: a second probe on the same states predicts P(the model refuses) "
        f"(C = {refusal['c']}, out-of-fold AUROC {refusal['oof_auroc']:.3f} on the safe "
        f"validation prompts and reference windows); rows below T are steered away only from "
        f"P(refuse) {refusal['threshold']:.4g} up",
        f"- it steers away {refusal['answered_reference_steered_away']:.1f} % of the reference "
        f"windows the default model answers (budget {refusal['reference_budget']:g} %) and "
        f"{refusal['reference_steered_away']:.1f} % of all of them (the default model refused "
        f"{refusal['reference_refused_by_default']:.1f} %), "
        f"{refusal['safe_validation_steered_away']:.1f} % of the safe validation prompts and "
        f"{refusal['over_refused_steered_away']:.1f} % of the over-refused ones",
    ]


def write_calibration_report(calibration: dict[str, Any], out: Path) -> Path:
    """Write calibration.md with three PNG plots into ``out``; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    _plot_gate(calibration["gate"], out / "gate_auroc.png")
    _plot_screen(calibration["screen"], out / "screen.png")
    _plot_pareto(calibration, out / "pareto.png")
    gate, chosen, base = calibration["gate"], calibration["chosen"], calibration["default_rates"]
    reference = any("reference_toward" in pick for pick in chosen["per_policy"].values())
    lines = [
        "# SCANS calibration",
        "",
        f"Validation prompts: {calibration['n_validation']} (never a test set).",
        "",
        "## Gate",
        f"- probe on `{gate['kind']}` states of layers {gate['layers']} (C = {gate['c']})",
        f"- out-of-fold AUROC on the validation prompts: {gate['oof_auroc_validation']:.3f} "
        f"(paper transition score: {gate['paper_transition_auroc_validation']:.3f})",
        *_reference_lines(gate),
        *_refusal_gate_lines(gate),
        "",
        "![gate](gate_auroc.png)",
        "",
        "## Direction, layers, alpha",
        f"- chosen: direction `{chosen['direction']}`, layers {chosen['layers']}, "
        f"away from refusal: {_steer_label(chosen['screen'])}"
        + (
            " (additive, relative to the residual norm)"
            if chosen.get("away_mode") != "clamp"
            else f" (projection capped at that quantile of the answered safe prompts'); towards "
            f"refusal: alpha {chosen['alpha']}"
        ),
        f"- refusal log-prob drop {chosen['screen']['refusal_logprob_drop']:.3f}/token, "
        f"plain-answer perplexity ratio {chosen['screen']['plain_ppl_ratio']:.3f}, "
        f"reference-text perplexity ratio {chosen['screen'].get('text_ppl_ratio', 1.0):.3f}",
        "",
        "| direction | layers | away steering | refusal log-prob drop | plain ppl ratio | "
        "text ppl ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in sorted(calibration["screen"], key=lambda r: -r["refusal_logprob_drop"])[:20]:
        text_ratio = r.get("text_ppl_ratio")
        lines.append(
            f"| {r['direction']} | {r['layers'][0]}-{r['layers'][-1]} | {_steer_label(r)} | "
            f"{r['refusal_logprob_drop']:.3f} | {r['plain_ppl_ratio']:.3f} | "
            + ("" if text_ratio is None else f"{text_ratio:.3f}")
            + " |"
        )
    lines += [
        "",
        "![screen](screen.png)",
        "",
        "## Policy and threshold (validation)",
        "",
        "| | safe refusal % | unsafe refusal % | Avg |"
        + (" plain-prompt refusal % |" if "plain_refusal" in base else "")
        + (" reference windows steered towards refusal % |" if reference else ""),
        "|---|---:|---:|---:|"
        + ("---:|" if "plain_refusal" in base else "")
        + ("---:|" if reference else ""),
        f"| default | {base['safe_refusal']:.1f} | {base['unsafe_refusal']:.1f} | "
        f"{base['avg']:.1f} |{_plain(base)}" + (" 0.0 |" if reference else ""),
    ]
    for policy, pick in chosen["per_policy"].items():
        towards = pick.get("reference_toward")
        lines.append(
            f"| {policy}, {_thresholds(pick)} | {pick['safe_refusal']:.1f} | "
            f"{pick['unsafe_refusal']:.1f} | {pick['avg']:.1f} |{_plain(pick)}"
            + ("" if not reference else " |" if towards is None else f" {towards:.1f} |")
        )
    for name, rates in chosen["steered_rates"].items():
        lines.append(
            f"| steering {name.replace('_', ' ')} | {rates['safe_refusal']:.1f} | "
            f"{rates['unsafe_refusal']:.1f} | {rates['avg']:.1f} |{_plain(rates)}"
            + (" |" if reference else "")
        )
    lines += [
        "",
        f"Chosen: policy `{chosen['policy']}`, {_thresholds(chosen)}.",
        "",
        "![pareto](pareto.png)",
        "",
    ]
    path = out / "calibration.md"
    path.write_text("\n".join(lines))
    return path
