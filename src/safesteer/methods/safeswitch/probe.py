"""SafeSwitch probers: training with early stopping, threshold calibration, metrics, layer sweep.

A prober is ``Linear(d, 64) → ReLU → Linear(64, 2)`` trained on logits with cross-entropy (softmax
applied once, in the loss) and AdamW; training stops when the validation loss has not improved for
``patience`` epochs and keeps the best epoch's weights. The decision threshold is calibrated on the
validation split (best balanced accuracy) and stored in the artifact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from safesteer.methods.safeswitch.settings import PROBER_HIDDEN, Prober

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProberConfig:
    """Prober training. lr 1e-3 (the original's 1e-5 × 20 epochs barely moves on small data)."""

    hidden: int = PROBER_HIDDEN
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    max_epochs: int = 200
    patience: int = 10
    seed: int = 42
    # None: calibrate on the validation split; a number: use it (the paper's fixed 0.5)
    fixed_threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def train_prober(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: ProberConfig,
) -> tuple[Prober, dict[str, Any]]:
    """Cross-entropy on logits with AdamW; stops when the validation loss has not improved for
    ``patience`` epochs and returns the best epoch's weights (no validation rows: train loss)."""
    if x_train.shape[0] == 0:
        raise ValueError("no training rows for the prober")
    x_train, x_val = x_train.float(), x_val.float()
    y_train, y_val = y_train.long(), y_val.long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        prober = Prober(x_train.shape[1], config.hidden)
    prober.get_buffer("mean").copy_(x_train.mean(dim=0))
    std = x_train.std(dim=0) if x_train.shape[0] > 1 else torch.ones(x_train.shape[1])
    prober.get_buffer("scale").copy_(std.clamp_min(1e-4))
    optimizer = torch.optim.AdamW(
        prober.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    has_val = x_val.shape[0] > 0
    best_loss, best_epoch, best_state = math.inf, -1, prober.state_dict()
    epochs_run = 0
    with torch.enable_grad():
        for epoch in range(config.max_epochs):
            prober.train()
            order = torch.randperm(x_train.shape[0], generator=generator)
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = F.cross_entropy(prober(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epochs_run = epoch + 1
            prober.eval()
            with torch.no_grad():
                xs, ys = (x_val, y_val) if has_val else (x_train, y_train)
                monitored = float(F.cross_entropy(prober(xs), ys))
            if monitored < best_loss - 1e-6:
                best_loss, best_epoch = monitored, epoch + 1
                best_state = {k: v.clone() for k, v in prober.state_dict().items()}
            elif epoch + 1 - best_epoch >= config.patience:
                break
    prober.load_state_dict(best_state)
    prober.eval()
    return prober, {
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "best_loss": best_loss,
        "monitored": "validation loss" if has_val else "training loss",
        "stopped_early": epochs_run < config.max_epochs,
    }


def calibrate_threshold(probs: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold with the best balanced accuracy (midpoints; ties: nearest 0.5).

    One-class or empty validation data gives 0.5. Probabilities and labels of different lengths,
    non-finite probabilities or labels other than 0/1 raise ``ValueError``.
    """
    p = np.asarray(probs, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=int).reshape(-1)
    if p.size != y.size:
        raise ValueError(f"{p.size} probabilities for {y.size} labels; give one per label")
    if not np.isfinite(p).all():
        raise ValueError("the prober's validation probabilities are not all finite")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()) - {0, 1})}")
    if p.size == 0 or y.min() == y.max():
        return 0.5
    values = np.unique(p)
    candidates = [0.5, *((values[1:] + values[:-1]) / 2).tolist(), float(values[0]) - 1e-6]
    best_t, best_score = 0.5, -1.0
    for t in candidates:
        pred = p >= t
        score = 0.5 * (float(pred[y == 1].mean()) + float((~pred[y == 0]).mean()))
        if score > best_score + 1e-12 or (
            abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)
        ):
            best_t, best_score = float(t), score
    return best_t


def _ranked_within_budget(probs: Sequence[float], budget: float, what: str) -> np.ndarray:
    """``probs`` sorted ascending, after checking ``budget`` lies in [0, 1) and every probability
    is finite (``what`` names the budget in the error)."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"the {what} budget must be in [0, 1), got {budget}")
    p = np.sort(np.asarray(probs, dtype=float).reshape(-1))
    if not np.isfinite(p).all():
        raise ValueError("the prober's validation probabilities are not all finite")
    return p


def budget_threshold(harmful_probs: Sequence[float], budget: float) -> float:
    """The largest t with at most ``budget`` (a fraction) of ``harmful_probs`` below t.

    Used for the combined method: a row is steered away from refusal when its P(harmful) is below
    t, so ``budget`` bounds the share of (validation) harmful prompts that would be steered. No
    harmful probabilities give 0 (nothing can be bounded, so nothing is steered).
    """
    p = _ranked_within_budget(harmful_probs, budget, "steering")
    return float(p[int(np.floor(budget * p.size))]) if p.size else 0.0


def false_flag_threshold(harmless_probs: Sequence[float], budget: float) -> float:
    """The smallest t with at most ``budget`` (a fraction) of ``harmless_probs`` at or above t.

    Stage 1 flags a row when its P(harmful) reaches the threshold, so ``budget`` bounds the share
    of (validation) harmless prompts it flags. No harmless probabilities give 0 (no bound).
    """
    p = _ranked_within_budget(harmless_probs, budget, "false-flag")[::-1]
    if not p.size:
        return 0.0
    allowed = int(np.floor(budget * p.size))  # this many may stay at or above t; < p.size
    return float(np.nextafter(p[allowed], np.inf))


def binary_metrics(
    probs: Sequence[float], labels: Sequence[int], threshold: float
) -> dict[str, Any]:
    """Accuracy, F1 and AUROC (None with one class) at ``threshold``."""
    from sklearn.metrics import f1_score, roc_auc_score

    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=int)
    if p.size == 0:
        return {"n": 0, "positives": 0, "accuracy": None, "f1": None, "auroc": None}
    pred = (p >= threshold).astype(int)
    auroc = float(roc_auc_score(y, p)) if y.min() != y.max() else None
    return {
        "n": int(p.size),
        "positives": int(y.sum()),
        "accuracy": float((pred == y).mean()),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auroc": auroc,
    }


@dataclass
class FittedProber:
    """A trained prober with its calibrated threshold and metrics."""

    prober: Prober
    threshold: float
    history: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        return {
            "threshold": self.threshold,
            "history": self.history,
            "val": self.val,
            "test": self.test,
        }


def fit_prober(
    features: torch.Tensor,
    labels: torch.Tensor,
    splits: dict[str, list[int]],
    config: ProberConfig,
) -> FittedProber:
    """Train on ``splits['train']``, stop early and calibrate on ``val``, report on ``test``.

    Rows whose label is negative (unknown) or whose features are not finite are left out.
    """
    usable = (labels >= 0) & torch.isfinite(features).all(dim=1)

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([i for i in splits[name] if bool(usable[i])], dtype=torch.long)
        return features[idx], labels[idx]

    x_tr, y_tr = part("train")
    x_va, y_va = part("val")
    x_te, y_te = part("test")
    prober, history = train_prober(x_tr, y_tr, x_va, y_va, config)
    p_va = prober.probability(x_va).tolist()
    threshold = (
        calibrate_threshold(p_va, y_va.tolist())
        if config.fixed_threshold is None
        else config.fixed_threshold
    )
    return FittedProber(
        prober,
        threshold,
        history,
        binary_metrics(p_va, y_va.tolist(), threshold),
        binary_metrics(prober.probability(x_te).tolist(), y_te.tolist(), threshold),
    )


def layer_sweep(
    prompt_states: torch.Tensor,
    labels: torch.Tensor,
    splits: dict[str, list[int]],
    config: ProberConfig,
    progress: Progress | None = None,
) -> list[FittedProber]:
    """One prober per decoder layer on the last-prompt-token states ``[n, layers, hidden]``."""
    fitted: list[FittedProber] = []
    for layer in range(prompt_states.shape[1]):
        fitted.append(fit_prober(prompt_states[:, layer], labels, splits, config))
        if progress is not None and (layer + 1) % 8 == 0:
            progress(f"layer sweep: {layer + 1}/{prompt_states.shape[1]} probers trained")
    return fitted


def sweep_table(fitted: Sequence[FittedProber]) -> list[dict[str, Any]]:
    """Per-layer rows for the report (test metrics at the validation-calibrated threshold)."""
    return [
        {
            "layer": layer,
            "threshold": f.threshold,
            "val_auroc": f.val["auroc"],
            "test_accuracy": f.test["accuracy"],
            "test_f1": f.test["f1"],
            "test_auroc": f.test["auroc"],
            "epochs": f.history["epochs_run"],
        }
        for layer, f in enumerate(fitted)
    ]


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy, F1 and AUROC per layer as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("test_accuracy", "accuracy"), ("test_f1", "F1"), ("test_auroc", "AUROC")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(layers, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("test split")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
