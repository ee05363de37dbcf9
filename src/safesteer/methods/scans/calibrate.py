"""The calibrated SCANS recipe: direction, layers, alpha, gate, policy and threshold chosen on the
validation set (never on a test set).

Stages (each caches its results in the output folder under a key of what they depend on, so a
rerun continues where it stopped and a grown validation set computes only its new prompts):

1. ``states``: residual states at the last prompt token and the end of ``Sure`` for the anchors
   and the validation prompts, every layer (one prefill each).
2. ``default``: the unsteered model's greedy replies to the validation prompts, judged (strict):
   which prompts it refuses.
3. ``gate``: a linear probe on those states (layers and feature kind by cross-validation), with
   out-of-fold probabilities for the threshold; the paper's transition score is kept for reference.
4. screen: candidate directions (paper anchors, style-matched validation means, refusal vs
   compliance of the model's own replies) x layer windows x alpha, scored without decoding by how
   much steering away lowers the log-probability of the model's own refusals on over-refused safe
   prompts, under a fluency budget (perplexity of its own answers to plain prompts and of a
   reference text); the two pairs that remove most refusal (fluent ones first) get the alpha and
   cap sweep.
5. ``away`` / ``toward``: the chosen direction steered away from (and towards) refusal on the
   validation prompts whose outcome some threshold in the searched range reads, judged.
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

from safesteer.core.activations import capture
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import Prompt
from safesteer.evaluation.judges.keyword import is_refusal_strict
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.calibration_cache import (
    EntryCache,
    cached_json,
    cached_rows,
    cached_texts,
    fingerprint,
    model_key,
    save_json,
    texts_sha256,
)
from safesteer.methods.scans.calibration_config import SCREEN_OPTIONS, CalibrationConfig
from safesteer.methods.scans.decide import unsteered
from safesteer.methods.scans.directions import (
    SWEEP_RULE,
    candidate_directions,
    choose_steering,
    projection_cap,
    reply_logprobs,
    sweep_pairs,
    windows,
)
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.gate import auroc, cached_gate_choice, fit_gate, transition_scores
from safesteer.methods.scans.generate import scans_generate
from safesteer.methods.scans.policy_choice import (
    REPORTED_RATES,
    choose_policy,
    judged,
    needed_rows,
    outcome_rates,
    steered_rates,
)
from safesteer.methods.scans.reference_text import gate_prompts, reference_info, screen_windows
from safesteer.methods.scans.refusal_gate import RefusalGateError, calibrate_refusal_gate
from safesteer.methods.scans.settings import default_settings

Progress = Callable[[str], None]


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


# the pipeline ---------------------------------------------------------------------------------
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
        fluency_text: str | None = None,
    ) -> None:
        self.lm = lm
        self.fluency_text = fluency_text
        self.harmful_anchors = list(harmful_anchors)
        self.benign_anchors = list(benign_anchors)
        self.validation = list(validation)
        self.out = out
        self.config = config or CalibrationConfig()
        self.say = progress or (lambda _msg: None)
        out.mkdir(parents=True, exist_ok=True)
        self.labels = [p.label for p in self.validation]
        self.texts = [p.text for p in self.validation]
        self.references = self.reference_prompts()

    # stage 1 ---------------------------------------------------------------------------------
    def states(self) -> torch.Tensor:
        """``[anchors + reference + validation, layers, 2, hidden]`` states at (p, e), cached."""
        texts = self.harmful_anchors + self.benign_anchors + self.references + self.texts
        layout = ChatLayout(self.lm.tokenizer)
        reply_len = len(layout.reply_ids("Sure"))

        def record(missing: list[str]) -> torch.Tensor:
            encoded = [layout.encode(t, "Sure").input_ids for t in missing]
            positions = [-1 - reply_len, -1]
            return capture(self.lm, encoded, positions, batch_size=self.config.batch_size)

        key = fingerprint(model_key(self.lm), "states", "Sure")
        return cached_rows(
            self.out / "states.safetensors",
            key,
            texts,
            record,
            chunk=self.config.save_every,
            announce=lambda n: self.say(f"recording states of {n} prompts at every layer"),
        )

    # stage 2 and 5 ---------------------------------------------------------------------------
    def replies(
        self,
        name: str,
        artifact: ScansArtifact,
        coefficient: float,
        only: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
    ) -> list[str | None]:
        """Greedy replies to the validation prompts (those where the mask ``only`` is true; None
        for the others) with a fixed steering coefficient (cached per prompt under the model, the
        steering and the reply length; ``texts`` replaces the validation prompts)."""
        pool = self.texts if texts is None else list(texts)
        s = artifact.settings
        steering: list[Any] = [coefficient, self.config.gen_tokens, s.system_prompt]
        if coefficient != 0:
            steering += [
                [s.alpha, s.alpha_mode, list(s.steer_layers), s.away_mode],
                artifact.vectors,
                artifact.layer_norms,
                artifact.caps,
            ]
        rule = (
            unsteered
            if coefficient == 0
            else (lambda ds: torch.full((len(ds),), float(coefficient)))
        )

        def generate(missing: list[str]) -> list[str]:
            results = scans_generate(
                self.lm,
                artifact,
                missing,
                GenerationConfig(self.config.gen_tokens),
                batch_size=self.config.batch_size,
                coefficients=rule,
            )
            return [r.response for r in results]

        key = fingerprint(model_key(self.lm), "replies", *steering)
        wanted = [t for i, t in enumerate(pool) if only is None or only[i]]
        done = cached_texts(
            self.out / f"replies-{name}.json",
            key,
            wanted,
            generate,
            chunk=self.config.save_every,
            announce=lambda n: self.say(f"generating validation replies ({name}, {n} prompts)"),
        )
        found = dict(zip(wanted, done, strict=True))
        return [found.get(t) for t in pool]

    # stage 4 ---------------------------------------------------------------------------------
    def _text_ids(self) -> tuple[list[list[int]], list[list[int]]] | None:
        """Windows of the fluency text as (first token, rest) pairs: every position steered."""
        if not self.fluency_text:
            return None
        cfg = self.config
        return screen_windows(
            self.lm.tokenizer, self.fluency_text, cfg.text_window, cfg.text_windows
        )

    def reference_prompts(self) -> list[str]:
        """Windows of the fluency text that join the gate's training as benign prompts."""
        if not self.fluency_text:
            return []
        cfg = self.config
        windows = gate_prompts(
            self.lm.tokenizer, self.fluency_text, cfg.reference_sizes, cfg.reference_per_size
        )
        known = set(self.harmful_anchors + self.benign_anchors + self.texts)
        return [w for w in windows if w not in known]

    def _screen_key(
        self,
        base: ScansArtifact,
        directions: dict[str, torch.Tensor],
        default_replies: list[str],
        last_states: torch.Tensor,
    ) -> str:
        """What the screen's results depend on (its cache key)."""
        names = sorted(directions)
        return fingerprint(
            model_key(self.lm),
            "screen",
            [getattr(self.config, option) for option in SCREEN_OPTIONS],
            self.texts,
            self.labels,
            default_replies,
            self.fluency_text,
            base.layer_norms,
            *(directions[name] for name in names),
            names,
            last_states,
        )

    def screen(
        self,
        base: ScansArtifact,
        directions: dict[str, torch.Tensor],
        default_replies: list[str],
        refused: np.ndarray,
        last_states: torch.Tensor,
        measured: EntryCache | None = None,
    ) -> list[dict[str, Any]]:
        """Refusal log-prob drop and fluency cost for every direction x window x alpha, and for
        clamped away-steering at several caps (``last_states``: validation states at ``p``;
        ``measured`` keeps each candidate's row as soon as it is scored)."""
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
        answered = torch.from_numpy(safe & ~refused)

        def ids(rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
            prompts = [layout.prompt_ids(self.texts[i]) for i in rows]
            replies = [layout.reply_ids(default_replies[i]) for i in rows]
            return prompts, replies

        over_ids, plain_ids, text_ids = ids(over), ids(plain), self._text_ids()
        bs = self.config.batch_size
        base_over = reply_logprobs(self.lm, *over_ids, batch_size=bs)
        base_plain = reply_logprobs(self.lm, *plain_ids, batch_size=bs)
        base_text = None if text_ids is None else reply_logprobs(self.lm, *text_ids, batch_size=2)
        rows: list[dict[str, Any]] = []

        def measure(
            name: str, window: tuple[int, ...], alpha: float, quantile: float | None = None
        ) -> dict[str, Any]:
            def score() -> dict[str, Any]:
                return score_candidate(name, window, alpha, quantile)

            entry = json.dumps([name, list(window), alpha, quantile])
            row: dict[str, Any] = score() if measured is None else measured.get(entry, score)
            rows.append(row)
            return row

        def score_candidate(
            name: str, window: tuple[int, ...], alpha: float, quantile: float | None
        ) -> dict[str, Any]:
            vectors = {
                layer: alpha * float(base.layer_norms[layer]) * directions[name][layer]
                for layer in window
            }
            caps = None
            if quantile is not None:
                caps = {
                    layer: projection_cap(
                        last_states[answered, layer], directions[name][layer], quantile
                    )
                    for layer in window
                }
            lp_over = reply_logprobs(self.lm, *over_ids, vectors, -1.0, bs, caps)
            lp_plain = reply_logprobs(self.lm, *plain_ids, vectors, -1.0, bs, caps)
            text_ratio = 1.0
            if text_ids is not None and base_text is not None:
                lp_text = reply_logprobs(self.lm, *text_ids, vectors, -1.0, 2, caps)
                text_ratio = float(math.exp(float(np.mean(base_text - lp_text))))
            return {
                "direction": name,
                "layers": list(window),
                "alpha": alpha,
                "away_mode": "add" if caps is None else "clamp",
                "cap_quantile": quantile,
                "caps": None if caps is None else [caps[layer] for layer in window],
                "refusal_logprob_drop": float(np.mean(base_over - lp_over)),
                "plain_ppl_ratio": float(math.exp(float(np.mean(base_plain - lp_plain)))),
                "text_ppl_ratio": text_ratio,
            }

        # Stage A: every direction x window at the middle alpha (additive); stage B: for the best
        # two (direction, window) pairs whose plain answers stay fluent, the alpha sweep and the
        # clamp caps.
        cfg = self.config
        middle = sorted(cfg.alphas)[len(cfg.alphas) // 2]
        spans = windows(self.lm.num_layers, cfg.window, cfg.window_stride)
        self.say(f"screening {len(directions) * len(spans)} (direction, window) pairs")
        first = [measure(n, w, middle) for n in directions for w in spans]
        self.say("sweeping alpha and the clamp caps for the two best pairs")
        for row in sweep_pairs(first, cfg.fluency_budget):
            pair = (row["direction"], tuple(row["layers"]))
            for alpha in cfg.alphas:
                if alpha != middle:
                    measure(*pair, alpha)
            for quantile in cfg.cap_quantiles:
                measure(*pair, middle, quantile)
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
        val_states = states[n_h + n_b + len(self.references) :]
        default_replies = [r or "" for r in self.replies("default", base, 0.0)]
        refused = np.asarray([is_refusal_strict(r) for r in default_replies], dtype=bool)
        plain = np.asarray([p.meta.get("kind") == "plain" for p in self.validation])
        default_rates = outcome_rates(self.labels, refused, plain)

        # gate: probe on anchors + reference text + validation; thresholds from out-of-fold
        self.say("choosing the gate (probe layers, features) by cross-validation")
        n_rows = n_h + n_b + len(self.references)
        harmful = [True] * n_h + [False] * (n_rows - n_h) + [lab == "unsafe" for lab in self.labels]
        choice = cached_gate_choice(
            self.out / "gate.json", model_key(lm), states, harmful, cfg.probe_layers, cfg.seed
        )
        gate = fit_gate(choice, states, harmful, cfg.seed)
        val_prob, ref_prob = gate.oof[n_rows:], gate.oof[n_h + n_b : n_rows]
        cos = transition_scores(val_states, base.reference, base.settings.cls_layers)
        gate_info = {
            **gate.info(n_rows),
            "paper_transition_auroc_validation": auroc(harmful[n_rows:], cos),
            **reference_info(ref_prob, cfg.reference_sizes),
        }
        refusal_gate, steer_away = None, None
        if cfg.refusal_gate:
            self.say("fitting the refusal gate (would the model refuse?)")
            ref_replies = self.replies("default", base, 0.0, texts=self.references)
            try:
                refusal_gate, steer_away, gate_info["refusal_gate"] = calibrate_refusal_gate(
                    val_states,
                    states[n_h + n_b : n_rows],
                    self.labels,
                    refused,
                    np.asarray([is_refusal_strict(r or "") for r in ref_replies], dtype=bool),
                    choice.layers,
                    choice.kind,
                    cfg.reference_budget,
                    cfg.seed,
                )
            except RefusalGateError as exc:  # nothing to learn: every row is steered away
                self.say(f"no refusal gate: {exc}")
                gate_info["refusal_gate"] = {"skipped": str(exc)}

        # directions
        last = val_states[:, :, 0]
        safe_mask = np.asarray([lab == "safe" for lab in self.labels])
        directions = candidate_directions(base.vectors, last, self.labels, refused)
        screen_key = self._screen_key(base, directions, default_replies, last)
        measured = EntryCache(self.out / "screen-partial.json", screen_key)
        # The whole screen is cached under the rule that picks the swept pairs as well (its
        # measurements, in screen-partial.json, do not depend on it and are kept).
        screen = cached_json(
            self.out / "screen.json",
            f"{screen_key}:{SWEEP_RULE}",
            lambda: self.screen(base, directions, default_replies, refused, last, measured),
        )
        best, toward_alpha = choose_steering(screen, cfg.fluency_budget)
        direction = directions[best["direction"]]
        caps = None
        if best["away_mode"] == "clamp":
            caps = torch.full((lm.num_layers,), float("nan"))
            for layer, cap in zip(best["layers"], best["caps"], strict=True):
                caps[layer] = float(cap)
        settings = replace(
            base.settings,
            alpha=toward_alpha,
            alpha_mode="relative",
            steer_layers=tuple(best["layers"]),
            recipe="calibrated",
            gate="probe",
            probe_layers=choice.layers,
            probe_kind=choice.kind,
            threshold=0.5,
            away_mode=best["away_mode"],
        )
        candidate = replace(base, vectors=direction, settings=settings, probe=gate.probe, caps=caps)
        # Only the replies some threshold in the searched range uses are generated.
        need_away, need_toward = needed_rows(val_prob, cfg.threshold_range)
        away = self.replies("away", candidate, -1.0, need_away)
        toward = self.replies("toward", candidate, 1.0, need_toward)
        refused_away, refused_toward = judged(away, refused), judged(toward, refused)
        policy, picks, pareto = choose_policy(
            self.labels,
            val_prob,
            (refused, refused_away, refused_toward),
            plain,
            default_rates,
            cfg,
            reference=ref_prob if self.references else None,
            steer_away=steer_away,
        )
        chosen = {
            "direction": best["direction"],
            "layers": best["layers"],
            "alpha": toward_alpha,
            "away_mode": best["away_mode"],
            "cap_quantile": best.get("cap_quantile"),
            "screen": best,
            "policy": policy,
            "threshold": picks[policy]["threshold"],
            "toward_threshold": picks[policy].get("toward_threshold"),
            "validation": {k: picks[policy][k] for k in REPORTED_RATES if k in picks[policy]},
            "per_policy": picks,
            "steered_rates": steered_rates(
                self.labels, plain, refused_away, need_away, refused_toward, need_toward
            ),
        }
        final = replace(
            candidate,
            settings=replace(
                settings,
                policy=policy,
                threshold=float(chosen["threshold"]),
                toward_threshold=chosen["toward_threshold"],
                refusal_threshold=None if refusal_gate is None else refusal_gate.threshold,
            ),
            refusal_probe=None if refusal_gate is None else refusal_gate.probe,
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
            "threshold_on": "probe out-of-fold probabilities (anchors, reference text, validation)",
            "cls_layers": list(settings.cls_layers),
            "chosen": chosen,
            "gate": {k: v for k, v in gate_info.items() if k != "per_layer_auroc"},
            "validation_sha256": texts_sha256(self.texts),
        }
        save_json(self.out / "calibration.json", asdict(calibration))
        return final, calibration
