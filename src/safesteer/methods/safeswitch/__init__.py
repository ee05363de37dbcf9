"""SafeSwitch: probers on internal states decide, a refusal head answers flagged prompts (SPEC §2).

Modules: ``settings`` (settings, prompts, prober), ``artifact``, ``generate`` (the switching hooks
and switched generation), ``train`` (training prompts and labelling), ``probe`` (prober training),
``head`` (refusal head), ``fit`` (``fit_safeswitch``) and ``baselines``. The names below are the
library API docs/safeswitch.md shows.
"""

from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import SwitchResult, safeswitch_generate
from safesteer.methods.safeswitch.settings import SafeSwitchSettings

__all__ = ["SafeSwitchArtifact", "SafeSwitchSettings", "SwitchResult", "safeswitch_generate"]
