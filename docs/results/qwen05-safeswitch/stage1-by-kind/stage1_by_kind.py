"""Stage 1's P(harmful) on the held-out parts of a SafeSwitch artifact's own training pool, by kind
of prompt (harmful, scary-but-safe, plain), and how many each threshold flags.

Reads only training prompts (the fit's val and test splits, rebuilt from its seed); no test set.
Prefill only. Usage (about 5 min for Qwen-0.5B on 2 cores):

    D=docs/results/qwen05-safeswitch/stage1-by-kind
    SAFESTEER_DATA_DIR=../shared/data python $D/stage1_by_kind.py runs/q05/safeswitch-v5 \
        qwen2.5-coder-0.5b 1200 > $D/v5.json
"""

from __future__ import annotations

import json
import sys

import torch

from safesteer.core.layout import ChatLayout
from safesteer.datasets.validation import validation_set
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.train import load_training_prompts, split_rows
from safesteer.models import load_model

THRESHOLDS = (0.5, 0.659, 0.88, 0.97)


def main(artifact_dir: str, model: str, limit: int) -> None:
    lm = load_model(model, dtype="float32")
    switch = SafeSwitchArtifact.load(artifact_dir, lm)
    settings = switch.settings
    layout = ChatLayout(lm.tokenizer, settings.system_prompt)
    config = switch.training["config"]
    data = load_training_prompts(None, limit, config["seed"], head_extra=256, written="all")
    harmful = [p.harmful for p in data.prompts]
    splits = split_rows(harmful, config["seed"])
    kind_of = {p.text: str(p.meta.get("kind", "-")) for p in validation_set(None, 0)}
    groups: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in splits["val"] + splits["test"]:
            prompt = data.prompts[i]
            ids = torch.tensor([layout.prompt_ids(prompt.text)])
            states = lm.model(ids, output_hidden_states=True).hidden_states[settings.layer + 1]
            p1 = float(switch.stage1.probability(states[:, -1, :].float())[0])
            side = "harmful" if prompt.harmful else "harmless"
            name = f"{side}: {prompt.source}"
            if prompt.source == "validation-written":
                name += f" ({kind_of.get(prompt.text, '?')})"
            groups.setdefault(name, []).append(p1)
            groups.setdefault(f"{side}: all", []).append(p1)
    out = {
        "artifact": artifact_dir,
        "threshold1": settings.threshold1,
        "groups": {
            name: {"n": len(ps), **{str(t): sum(p >= t for p in ps) for t in THRESHOLDS}}
            for name, ps in sorted(groups.items())
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
