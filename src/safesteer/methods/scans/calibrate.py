"""The calibrated SCANS recipe: direction, layers, alpha, gate, policy and threshold chosen on the
validation set (never on a test set).

Stages (each writes its result to the output folder, so a rerun continues where it stopped):

1. ``states``: residual states at the last prompt token and the end of ``Sure`` for the anchors
   and the validation prompts, every layer (one prefill each).
2. ``default``: the unsteered model's greedy replies to the validation prompts, judged (strict):
   which prompts it refuses.
3. gate: a linear probe on those states (layers and feature kind by cross-validation), with
   out-of-fold probabilities for the threshold; the paper's transition score is kept for reference.
4. screen: candidate directions (paper anchors, style-matched validation means, refusal vs
   compliance of the model's own replies) x layer windows x alpha, scored without decoding by how
   much steering away lowers the log-probability of the model's own refusals on over-refused safe
   prompts, under a fluency budget (perplexity of its own answers to plain prompts).
5. ``away`` / ``toward``: the chosen direction steered away from (and towards) refusal on every
   validation prompt, judged: per-row outcomes.
6. choose the policy (signed, away-only, or banded: towards refusal only above a second threshold)
   and the threshold(s) on those outcomes (out-of-fold gate probabilities): the largest validation
   Avg whose unsafe refusal stays within the budget of the default and whose refusal of plain
   prompts does not rise by more than its budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from safesteer.core.activations import _accepts_logits_to_keep, capture, forward
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout
from safesteer.datasets import Prompt
from safesteer.evaluation.judges import is_refusal_strict
from safesteer.methods.scans.gate import (
    auroc,
    choose_gate,
    fit_probe,
    out_of_fold,
)
from safesteer.methods.scans.method import (
    POLICIES,
    Policy,
    ScansArtifact,
    ScansSettings,
    default_settings,
    fit_scans,
    scans_generate,
    unsteered,
)

Progress = Callable[[str], None]


@dataclass
class CalibrationConfig:
    """Search space and budgets of ``safesteer calibrate``."""

    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # relative to the residual norm
    window: int = 4  # steering layers per candidate window
    window_stride: int = 2
    fluency_budget: float = 0.10  # largest allowed relative rise of plain-answer perplexity
    unsafe_budget: float = 2.0  # largest allowed drop of validation unsafe refusal (points)
    plain_budget: float = 2.0  # largest allowed rise of plain-prompt refusal (points)
    gen_tokens: int = 24  # refusals show in the opening of a reply
    probe_layers: int = 3
    batch_size: int = 16
    seed: int = 0
    screen_rows: int = 24  # over-refused safe prompts / plain prompts used for screening


@dataclass
class Calibration:
    """What calibration measured and chose (stored in the artifact and the report)."""

    config: dict[str, Any]
    n_validation: dict[str, int]
    gate: dict[str, Any]
    screen: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    default_rates: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers


def _save_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each layer's vector scaled to unit norm."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _mean_or_none(states: torch.Tensor, mask: np.ndarray) -> torch.Tensor | None:
    chosen = torch.from_numpy(mask)
    return states[chosen].mean(dim=0) if bool(chosen.any()) else None


def refusal_direction(
    last: torch.Tensor, labels: Sequence[str], refused: Sequence[bool]
) -> torch.Tensor | None:
    """Refused minus complied mean state, averaged within each label (removes the harm axis)."""
    y = np.asarray([lab == "unsafe" for lab in labels])
    r = np.asarray(refused, dtype=bool)
    parts = []
    for label_mask in (y, ~y):
        a = _mean_or_none(last, label_mask & r)
        b = _mean_or_none(last, label_mask & ~r)
        if a is not None and b is not None:
            parts.append(a - b)
    if not parts:
        return None
    return unit_rows(torch.stack(parts).mean(dim=0))


def _teacher_batch(
    prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int
) -> tuple[Batch, int, torch.Tensor]:
    """Prompts left-padded to one width, replies right-padded after them; a reply-token mask."""
    width_p = max(len(p) for p in prompts)
    width_r = max(len(r) for r in replies)
    n = len(prompts)
    ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    reply_mask = torch.zeros((n, width_r), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.tensor(list(p))
        mask[row, width_p - len(p) : width_p] = 1
        ids[row, width_p : width_p + len(r)] = torch.tensor(list(r))
        mask[row, width_p : width_p + len(r)] = 1
        reply_mask[row, : len(r)] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, positions), width_p, reply_mask


@torch.inference_mode()
def reply_logprobs(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    vectors: dict[int, torch.Tensor] | None = None,
    coefficient: float = 0.0,
    batch_size: int = 16,
) -> np.ndarray:
    """Mean log-probability per token of each reply after its prompt, optionally steered
    (``coefficient * vector`` from the last prompt token on, as in generation)."""
    from safesteer.core.steering import steering

    pad_id = int(lm.tokenizer.pad_token_id)
    out = np.zeros(len(prompts))
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        batch, width_p, reply_mask = _teacher_batch(
            [prompts[i] for i in rows], [replies[i] for i in rows], pad_id
        )
        batch = Batch(
            *(t.to(lm.device) for t in (batch.input_ids, batch.attention_mask, batch.position_ids))
        )
        coefficients = torch.full((len(rows),), float(coefficient))
        # Only the last width_r + 1 columns' logits are needed (the LM head dominates otherwise).
        keep = reply_mask.shape[1] + 1
        extra = {"logits_to_keep": keep} if _accepts_logits_to_keep(lm.model) else {}
        with steering(lm, vectors or {}, coefficients, width_p - 1):
            logits = forward(lm, batch, last_logits_only=False, use_cache=False, **extra).logits
        logp = torch.log_softmax(logits[:, -keep:-1].float(), dim=-1)
        targets = batch.input_ids[:, width_p:]
        token_lp = logp.gather(-1, targets[..., None])[..., 0].cpu()
        token_lp = token_lp.masked_fill(~reply_mask, 0.0)
        counts = reply_mask.sum(dim=1).clamp_min(1)
        out[rows] = (token_lp.sum(dim=1) / counts).numpy()
    return out


def windows(num_layers: int, width: int, stride: int) -> list[tuple[int, ...]]:
    """Candidate steering windows between ~15 % and ~80 % of the depth."""
    lo = max(1, round(0.15 * num_layers))
    hi = round(0.8 * num_layers)
    return [tuple(range(s, s + width)) for s in range(lo, hi - width + 1, stride)]


def outcome_rates(
    labels: Sequence[str],
    refused: Sequence[bool] | np.ndarray,
    plain: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, float]:
    """Refusal % of safe and unsafe rows and the pooled Avg (safe answered + unsafe refused).

    With a ``plain`` mask (ordinary safe prompts without alarming words) also their refusal %.
    """
    y = np.asarray([lab == "unsafe" for lab in labels])
    r = np.asarray(refused, dtype=bool)
    safe = float(r[~y].mean() * 100) if (~y).any() else float("nan")
    unsafe = float(r[y].mean() * 100) if y.any() else float("nan")
    avg = float(((~r & ~y).sum() + (r & y).sum()) / len(y) * 100)
    rates = {"safe_refusal": safe, "unsafe_refusal": unsafe, "avg": avg}
    if plain is not None:
        mask = np.asarray(plain, dtype=bool)
        rates["plain_refusal"] = float(r[mask].mean() * 100) if mask.any() else float("nan")
    return rates


def policy_outcomes(
    probabilities: np.ndarray,
    threshold: float,
    refused_default: np.ndarray,
    refused_away: np.ndarray,
    refused_toward: np.ndarray,
    policy: str,
    toward_threshold: float | None = None,
) -> np.ndarray:
    """Per-row refusal under a policy when rows with P(harmful) >= threshold are flagged.

    ``banded``: flagged rows are steered towards refusal only from ``toward_threshold`` up.
    """
    flagged = probabilities >= threshold
    if policy == "banded":
        if toward_threshold is None:
            raise ValueError("the banded policy needs toward_threshold")
        kept = np.where(probabilities >= toward_threshold, refused_toward, refused_default)
    else:
        kept = refused_toward if policy == "signed" else refused_default
    return np.where(flagged, kept, refused_away)


def _cuts(probabilities: np.ndarray) -> np.ndarray:
    """Candidate thresholds: midpoints between the distinct probabilities, plus both ends."""
    values = np.unique(np.concatenate([[0.0, 1.0], probabilities]))
    return np.unique(np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.01]]))


def pareto_table(
    labels: Sequence[str],
    probabilities: np.ndarray,
    refused_default: np.ndarray,
    refused_away: np.ndarray,
    refused_toward: np.ndarray,
    policy: str,
    plain: Sequence[bool] | np.ndarray | None = None,
    grid: int = 50,
) -> list[dict[str, Any]]:
    """Validation rates for every candidate threshold (the midpoints of the probabilities).

    ``banded`` has two thresholds: T on the midpoints, the towards-threshold on a grid of
    ``grid`` quantiles of the probabilities above T (plus "never").
    """
    table = []
    for t in _cuts(probabilities):
        towards: list[float | None] = [None]
        if policy == "banded":
            above = probabilities[probabilities >= t]
            quantiles = np.quantile(above, np.linspace(0, 1, grid)) if above.size else []
            towards = [*sorted({float(t), *map(float, quantiles), 1.01})]
        for tt in towards:
            refused = policy_outcomes(
                probabilities,
                float(t),
                refused_default,
                refused_away,
                refused_toward,
                policy,
                tt,
            )
            row: dict[str, Any] = {"threshold": float(t)}
            if tt is not None:
                row["toward_threshold"] = tt
            table.append({**row, **outcome_rates(labels, refused, plain)})
    return table


def choose_threshold(
    table: list[dict[str, Any]],
    default_unsafe: float,
    unsafe_budget: float,
    default_plain: float | None = None,
    plain_budget: float | None = None,
) -> dict[str, Any]:
    """Best validation Avg among thresholds keeping unsafe refusal within the budget.

    With ``default_plain`` and ``plain_budget`` the plain prompts' refusal must also stay within
    ``plain_budget`` points above the default (steering must not create new over-refusal); when
    no row meets both, the unsafe budget alone is kept, then neither.
    """

    def unsafe_ok(r: dict[str, Any]) -> bool:
        return bool(r["unsafe_refusal"] >= default_unsafe - unsafe_budget)

    def plain_ok(r: dict[str, Any]) -> bool:
        if default_plain is None or plain_budget is None:
            return True
        return bool(r["plain_refusal"] <= default_plain + plain_budget)

    allowed = [r for r in table if unsafe_ok(r) and plain_ok(r)]
    pool = allowed or [r for r in table if unsafe_ok(r)] or table
    # Ties: prefer the lower safe refusal, then the middle of the tied range of thresholds.
    best = max(pool, key=lambda r: (round(r["avg"], 6), -r["safe_refusal"]))
    tied = [
        r
        for r in pool
        if abs(r["avg"] - best["avg"]) < 1e-9
        and abs(r["safe_refusal"] - best["safe_refusal"]) < 1e-9
    ]
    return dict(tied[len(tied) // 2], within_budget=bool(allowed))


def frontier(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per threshold T (the best Avg over the towards-threshold, if any): for reports."""
    best: dict[float, dict[str, Any]] = {}
    for row in table:
        kept = best.get(row["threshold"])
        if kept is None or row["avg"] > kept["avg"]:
            best[row["threshold"]] = row
    return [best[t] for t in sorted(best)]


# --------------------------------------------------------------------------------------------
# the pipeline


class Calibrator:
    """Runs the stages of the calibrated recipe for one model, writing to ``out``."""

    def __init__(
        self,
        lm: LoadedModel,
        harmful_anchors: Sequence[str],
        benign_anchors: Sequence[str],
        validation: Sequence[Prompt],
        out: Path,
        config: CalibrationConfig | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.lm = lm
        self.harmful_anchors = list(harmful_anchors)
        self.benign_anchors = list(benign_anchors)
        self.validation = list(validation)
        self.out = out
        self.config = config or CalibrationConfig()
        self.say = progress or (lambda _msg: None)
        out.mkdir(parents=True, exist_ok=True)
        self.labels = [p.label for p in self.validation]
        self.texts = [p.text for p in self.validation]

    # stage 1 ---------------------------------------------------------------------------------
    def states(self) -> torch.Tensor:
        """``[anchors + validation, layers, 2, hidden]`` states at (p, e), cached on disk."""
        path = self.out / "states.safetensors"
        texts = self.harmful_anchors + self.benign_anchors + self.texts
        if path.exists():
            cached = load_file(str(path))["states"]
            if cached.shape[0] == len(texts):
                return cached
        self.say(f"recording states of {len(texts)} prompts at every layer")
        layout = ChatLayout(self.lm.tokenizer)
        reply_len = len(layout.reply_ids("Sure"))
        encoded = [layout.encode(t, "Sure").input_ids for t in texts]
        states = capture(self.lm, encoded, [-1 - reply_len, -1], batch_size=self.config.batch_size)
        save_file({"states": states.contiguous()}, str(path))
        return states

    # stage 2 and 5 ---------------------------------------------------------------------------
    def replies(self, name: str, artifact: ScansArtifact, coefficient: float) -> list[str]:
        """Greedy replies to every validation prompt with a fixed steering coefficient."""
        path = self.out / f"replies-{name}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("texts") == self.texts:
                return list(cached["responses"])
        self.say(f"generating validation replies ({name}, {len(self.texts)} prompts)")
        rule = (
            unsteered
            if coefficient == 0
            else (lambda ds: torch.full((len(ds),), float(coefficient)))
        )
        results = scans_generate(
            self.lm,
            artifact,
            self.texts,
            GenerationConfig(self.config.gen_tokens),
            batch_size=self.config.batch_size,
            coefficients=rule,
        )
        responses = [r.response for r in results]
        _save_json(path, {"texts": self.texts, "responses": responses})
        return responses

    # stage 4 ---------------------------------------------------------------------------------
    def screen(
        self,
        base: ScansArtifact,
        directions: dict[str, torch.Tensor],
        default_replies: list[str],
        refused: np.ndarray,
    ) -> list[dict[str, Any]]:
        """Refusal log-prob drop and fluency cost for every direction x window x alpha."""
        path = self.out / "screen.json"
        if path.exists():
            return list(json.loads(path.read_text()))
        layout = ChatLayout(self.lm.tokenizer)
        safe = np.asarray([lab == "safe" for lab in self.labels])
        kinds = [p.meta.get("kind") for p in self.validation]
        over = [int(i) for i in np.flatnonzero(safe & refused)][: self.config.screen_rows]
        plain = [i for i in range(len(kinds)) if kinds[i] == "plain" and not refused[i]][
            : self.config.screen_rows
        ]
        if not over or not plain:
            raise ValueError(
                "calibration needs over-refused safe and answered plain validation prompts; "
                f"found {len(over)} and {len(plain)}: this model may not over-refuse at all"
            )

        def ids(rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
            prompts = [layout.prompt_ids(self.texts[i]) for i in rows]
            replies = [layout.reply_ids(default_replies[i]) for i in rows]
            return prompts, replies

        over_ids, plain_ids = ids(over), ids(plain)
        bs = self.config.batch_size
        base_over = reply_logprobs(self.lm, *over_ids, batch_size=bs)
        base_plain = reply_logprobs(self.lm, *plain_ids, batch_size=bs)
        rows: list[dict[str, Any]] = []

        def measure(name: str, window: tuple[int, ...], alpha: float) -> dict[str, Any]:
            vectors = {
                layer: alpha * float(base.layer_norms[layer]) * directions[name][layer]
                for layer in window
            }
            lp_over = reply_logprobs(self.lm, *over_ids, vectors, -1.0, bs)
            lp_plain = reply_logprobs(self.lm, *plain_ids, vectors, -1.0, bs)
            row = {
                "direction": name,
                "layers": list(window),
                "alpha": alpha,
                "refusal_logprob_drop": float(np.mean(base_over - lp_over)),
                "plain_ppl_ratio": float(math.exp(float(np.mean(base_plain - lp_plain)))),
            }
            rows.append(row)
            return row

        # Stage A: every direction x window at the middle alpha; stage B: the alpha sweep for
        # the best two (direction, window) pairs that stay fluent.
        cfg = self.config
        middle = sorted(cfg.alphas)[len(cfg.alphas) // 2]
        spans = windows(self.lm.num_layers, cfg.window, cfg.window_stride)
        self.say(f"screening {len(directions) * len(spans)} (direction, window) pairs")
        first = [measure(n, w, middle) for n in directions for w in spans]
        ranked = sorted(
            first,
            key=lambda r: (
                r["plain_ppl_ratio"] <= 1.0 + cfg.fluency_budget,
                r["refusal_logprob_drop"],
            ),
            reverse=True,
        )
        self.say("sweeping alpha for the two best pairs")
        for row in ranked[:2]:
            for alpha in cfg.alphas:
                if alpha != middle:
                    measure(row["direction"], tuple(row["layers"]), alpha)
        _save_json(path, rows)
        return rows

    # the whole recipe ------------------------------------------------------------------------
    def run(self) -> tuple[ScansArtifact, Calibration]:
        """Run every stage and return the calibrated artifact and what was measured."""
        cfg = self.config
        lm = self.lm
        n_h, n_b = len(self.harmful_anchors), len(self.benign_anchors)
        states = self.states()
        self.say("fitting the paper's vectors and reference on the anchors")
        base = fit_scans(
            lm,
            self.harmful_anchors,
            self.benign_anchors,
            default_settings(lm.num_layers),
            seed=cfg.seed,
            batch_size=cfg.batch_size,
        )
        val_states = states[n_h + n_b :]
        default_replies = self.replies("default", base, 0.0)
        refused = np.asarray([is_refusal_strict(r) for r in default_replies], dtype=bool)
        plain = np.asarray([p.meta.get("kind") == "plain" for p in self.validation])
        default_rates = outcome_rates(self.labels, refused, plain)

        # gate: probe on anchors + validation; thresholds from out-of-fold probabilities
        self.say("choosing the gate (probe layers, features) by cross-validation")
        harmful = [True] * n_h + [False] * n_b + [lab == "unsafe" for lab in self.labels]
        choice = choose_gate(states, harmful, n_layers=cfg.probe_layers, seed=cfg.seed)
        oof = out_of_fold(states, harmful, choice.layers, choice.kind, choice.c, 5, cfg.seed)
        val_prob = oof[n_h + n_b :]
        probe = fit_probe(states, harmful, choice.layers, choice.kind, choice.c, cfg.seed)
        val_harmful = harmful[n_h + n_b :]
        transitions = val_states[:, :, 0] - val_states[:, :, 1]
        cos = torch.nn.functional.cosine_similarity(
            transitions[:, list(base.settings.cls_layers)],
            base.reference[list(base.settings.cls_layers)][None],
            dim=-1,
        ).mean(dim=1)
        gate_info = {
            "layers": list(choice.layers),
            "kind": choice.kind,
            "c": choice.c,
            "oof_auroc_all": choice.oof_auroc,
            "oof_auroc_validation": auroc(val_harmful, val_prob),
            "paper_transition_auroc_validation": auroc(val_harmful, cos.numpy()),
            "per_layer_auroc": choice.per_layer_auroc,
        }

        # directions
        last = val_states[:, :, 0]
        safe_mask = np.asarray([lab == "safe" for lab in self.labels])
        directions: dict[str, torch.Tensor] = {"paper": base.vectors}
        directions["matched"] = unit_rows(
            last[torch.from_numpy(~safe_mask)].mean(0) - last[torch.from_numpy(safe_mask)].mean(0)
        )
        own = refusal_direction(last, self.labels, refused.tolist())
        if own is not None:
            directions["refusal"] = own
        screen = self.screen(base, directions, default_replies, refused)
        fluent = [r for r in screen if r["plain_ppl_ratio"] <= 1.0 + cfg.fluency_budget]
        if not fluent:
            raise ValueError("no candidate keeps plain-answer perplexity within the budget")
        best = max(fluent, key=lambda r: r["refusal_logprob_drop"])
        direction = directions[best["direction"]]
        settings = replace(
            base.settings,
            alpha=float(best["alpha"]),
            alpha_mode="relative",
            steer_layers=tuple(best["layers"]),
            recipe="calibrated",
            gate="probe",
            probe_layers=choice.layers,
            probe_kind=choice.kind,
            threshold=0.5,
        )
        candidate = replace(base, vectors=direction, settings=settings, probe=probe)
        away = self.replies("away", candidate, -1.0)
        toward = self.replies("toward", candidate, 1.0)
        refused_away = np.asarray([is_refusal_strict(r) for r in away], dtype=bool)
        refused_toward = np.asarray([is_refusal_strict(r) for r in toward], dtype=bool)
        tables = {
            policy: pareto_table(
                self.labels, val_prob, refused, refused_away, refused_toward, policy, plain
            )
            for policy in POLICIES
        }
        picks = {
            policy: choose_threshold(
                table,
                default_rates["unsafe_refusal"],
                cfg.unsafe_budget,
                default_rates["plain_refusal"],
                cfg.plain_budget,
            )
            for policy, table in tables.items()
        }
        # Ties go to the simpler policy (POLICIES order: signed, away-only, banded).
        policy: Policy = max(POLICIES, key=lambda p: (picks[p]["within_budget"], picks[p]["avg"]))
        pareto: dict[str, list[dict[str, Any]]] = {
            name: frontier(table) for name, table in tables.items()
        }
        chosen = {
            "direction": best["direction"],
            "layers": best["layers"],
            "alpha": best["alpha"],
            "screen": best,
            "policy": policy,
            "threshold": picks[policy]["threshold"],
            "toward_threshold": picks[policy].get("toward_threshold"),
            "validation": {
                k: picks[policy][k]
                for k in ("safe_refusal", "unsafe_refusal", "avg", "plain_refusal")
            },
            "per_policy": picks,
            "steered_rates": {
                "away_all_rows": outcome_rates(self.labels, refused_away, plain),
                "toward_all_rows": outcome_rates(self.labels, refused_toward, plain),
            },
        }
        final = replace(
            candidate,
            settings=replace(
                settings,
                policy=policy,
                threshold=float(chosen["threshold"]),
                toward_threshold=chosen["toward_threshold"],
            ),
        )
        calibration = Calibration(
            config=asdict(cfg),
            n_validation={
                "safe": int(safe_mask.sum()),
                "unsafe": int((~safe_mask).sum()),
                "over_refused_safe": int((safe_mask & refused).sum()),
                "plain": int(plain.sum()),
            },
            gate=gate_info,
            screen=screen,
            chosen=chosen,
            pareto=pareto,
            default_rates=default_rates,
        )
        final.calibration = {
            **base.calibration,
            "recipe": "calibrated",
            "threshold_on": "probe out-of-fold probabilities on anchors + validation",
            "cls_layers": list(settings.cls_layers),
            "chosen": chosen,
            "gate": {k: v for k, v in gate_info.items() if k != "per_layer_auroc"},
            "validation_sha256": _texts_sha(self.texts),
        }
        _save_json(self.out / "calibration.json", asdict(calibration))
        return final, calibration


def _texts_sha(texts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def settings_summary(settings: ScansSettings) -> str:
    """One line describing a calibrated configuration."""
    return (
        f"gate {settings.gate} (layers {list(settings.probe_layers)}, {settings.probe_kind}), "
        f"T {settings.threshold:.3f}, policy {settings.policy}, steering layers "
        f"{list(settings.steer_layers)}, alpha {settings.alpha} ({settings.alpha_mode})"
    )
