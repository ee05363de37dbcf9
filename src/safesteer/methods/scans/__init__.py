"""SCANS: refusal directions, transition-based harmfulness scores, signed steering (SPEC §1).

Fit from harmful and benign anchors:
  ``v_l = mean h_l(harmful)[p] - mean h_l(benign)[p]`` (unit norm) and the unsafe reference
  ``d_l = mean_harmful (h_l[p] - h_l[e])`` where p is the last prompt token and e the end of the
  fixed reply prefix ``Sure``.
Classify: ``s_q = mean_{l in L} cos(t_l(q), d_l)``; ``sigma = +1`` (unsafe) when ``s_q >= T``.
Steer: add ``sigma * alpha_l * v_l`` at the steering layers from the last prompt token on.

Modules: ``settings``, ``artifact``, ``fit``, ``decide`` (scores, signs, policies), ``generate``
(fused and two-pass), ``gate`` (the probe gate), ``calibrate`` with ``directions`` and
``policy_choice`` (the calibrated recipe), ``calibrated/`` (shipped artifacts), ``analysis`` and
``control_vectors``. The names below are the library API the README shows.
"""

from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import ScansDecision, ScansResult, classify
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass
from safesteer.methods.scans.settings import ScansSettings, default_settings

__all__ = [
    "ScansArtifact",
    "ScansDecision",
    "ScansResult",
    "ScansSettings",
    "classify",
    "default_settings",
    "fit_scans",
    "scans_generate",
    "scans_generate_two_pass",
]
