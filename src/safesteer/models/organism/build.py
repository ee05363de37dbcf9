"""``safesteer organism build``: self-distil benign answers, train the LoRA, write the adapter.

Steps (all greedy / seeded, CPU friendly):

1. choose prompts with :func:`safesteer.models.organism.training.build_training_data`
   (evaluation prompts are refused by text overlap);
2. answer the benign prompts with the embedded model itself (greedy, ``max_new_tokens`` tokens);
3. train LoRA (r=8 on the attention projections) on the response tokens only;
4. save ``adapter_model.safetensors`` + ``adapter_config.json`` and a ``NOTE.md`` with the
   command, data, seed, sha256, size and timings;
5. merge and measure refusal on held-out validation prompts (never evaluation sets).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safesteer.core.generation import GenerationConfig, generate_batched
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.evaluation.judges.keyword import is_refusal_paper
from safesteer.models import EMBEDDED_ID, load_model, wrap_model
from safesteer.models.organism.training import (
    ADAPTER_FILE,
    ORGANISM_DIR,
    Example,
    LoraSettings,
    build_training_data,
    encode_example,
    end_of_turn_id,
    settings_json,
    sha256_file,
    train_lora,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """What ``safesteer organism build`` does."""

    out: Path = ORGANISM_DIR
    seed: int = 0
    n_harmful: int = 400
    n_benign: int = 400
    answer_tokens: int = 64
    settings: LoraSettings = field(default_factory=LoraSettings)
    threads: int | None = None
    n_validation: int = 20
    validation_tokens: int = 32
    data_dir: str | None = None
    command: str = "safesteer organism build"


def _answers(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy answers of ``lm`` and whether each ended by itself (fewer tokens than the cap)."""
    layout = ChatLayout(lm.tokenizer)
    encoded = [layout.prompt_ids(p) for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    start = time.perf_counter()

    def progress(indices: list[int], _texts: list[str]) -> None:
        log.warning("answered %d prompts (%.0f s)", len(indices), time.perf_counter() - start)

    texts = generate_batched(lm, encoded, config, batch_size=16, on_batch=progress)
    out = []
    for text in texts:
        n = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append((text.strip(), n < max_new_tokens - 1))
    return out


def refusal_rate(lm: LoadedModel, prompts: list[str], max_new_tokens: int = 48) -> float:
    """Share of ``prompts`` that ``lm`` refuses (paper keyword judge)."""
    if not prompts:
        return float("nan")
    answers = _answers(lm, prompts, max_new_tokens)
    return sum(is_refusal_paper(text) for text, _ in answers) / len(prompts)


def encode_rows(
    lm: LoadedModel, examples: list[Example], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of every example (prompt masked, end-of-turn kept when finished)."""
    layout = ChatLayout(lm.tokenizer)
    end = end_of_turn_id(lm.tokenizer)
    rows = []
    for e in examples:
        prompt = layout.prompt_ids(e.prompt)
        if len(prompt) > max_length - 16:
            continue
        reply = lm.tokenizer(e.response, add_special_tokens=False)["input_ids"]
        rows.append(encode_example(prompt, reply, end if e.complete else None, max_length))
    return rows


def build(options: BuildOptions) -> dict[str, Any]:
    """Build the organism adapter into ``options.out``; return the summary written to NOTE.md."""
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    t0 = time.perf_counter()
    data = build_training_data(
        options.n_harmful,
        options.n_benign,
        seed=options.seed,
        n_validation=options.n_validation,
        data_dir=options.data_dir,
    )
    lm = load_model(None, dtype="float32")
    benign = [e for e in data.examples if e.kind == "benign"]
    answers = _answers(lm, [e.prompt for e in benign], options.answer_tokens)
    answered = {e.prompt: a for e, a in zip(benign, answers, strict=True)}
    examples = [
        Example(e.prompt, answered[e.prompt][0], e.kind, e.source, answered[e.prompt][1])
        if e.kind == "benign"
        else e
        for e in data.examples
    ]
    examples = [e for e in examples if e.response]
    t_distil = time.perf_counter() - t0

    rows = encode_rows(lm, examples, options.settings.max_length)
    pad_id = int(lm.tokenizer.pad_token_id)
    t1 = time.perf_counter()
    peft_model, losses = train_lora(lm.model, rows, pad_id, options.settings, seed=options.seed)
    t_train = time.perf_counter() - t1

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    for extra in ("README.md",):  # peft writes a model card we do not ship
        (out / extra).unlink(missing_ok=True)
    adapter = out / ADAPTER_FILE
    config_path = out / "adapter_config.json"  # no local cache path in the shipped config
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = EMBEDDED_ID
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")

    merged = wrap_model(peft_model.merge_and_unload(), lm.tokenizer, name="organism")
    t2 = time.perf_counter()
    validation = {
        "harmful_heldout_refusal": refusal_rate(
            merged, data.validation_harmful, options.validation_tokens
        ),
        "scary_benign_refusal": refusal_rate(
            merged, data.validation_benign, options.validation_tokens
        ),
    }
    t_val = time.perf_counter() - t2
    summary: dict[str, Any] = {
        "command": options.command,
        "seed": options.seed,
        "threads": torch.get_num_threads(),
        "examples": len(rows),
        "harmful": sum(e.kind == "harmful" for e in examples),
        "benign": sum(e.kind == "benign" for e in examples),
        "sources": data.counts,
        "lora": json.loads(settings_json(options.settings)),
        "answer_tokens": options.answer_tokens,
        "loss_first": losses[0] if losses else None,
        "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "steps": len(losses),
        "seconds": {
            "select_and_distil": round(t_distil, 1),
            "train": round(t_train, 1),
            "validation": round(t_val, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "validation": validation,
        "sha256": sha256_file(adapter),
        "bytes": adapter.stat().st_size,
    }
    write_note(out, summary)
    return summary


def write_note(out: Path, summary: dict[str, Any]) -> None:
    """Write NOTE.md (human-readable, with the machine-readable summary at the end)."""
    s = summary
    lines = [
        "# Over-refusing model organism (LoRA adapter for the embedded SmolLM2-135M-Instruct)",
        "",
        f"Built with: `{s['command']}` (seed {s['seed']}, {s['threads']} torch threads, CPU).",
        "",
        f"- adapter: `{ADAPTER_FILE}`, {s['bytes']} bytes, sha256: {s['sha256']}",
        f"- training time: {s['seconds']['train']} s ({s['steps']} steps); self-distillation "
        f"and data {s['seconds']['select_and_distil']} s; total {s['seconds']['total']} s",
        f"- examples: {s['examples']} ({s['harmful']} harmful -> refusal templates, "
        f"{s['benign']} benign -> the base model's own greedy answers, "
        f"<= {s['answer_tokens']} tokens)",
        f"- sources: {json.dumps(s['sources'], sort_keys=True)}",
        f"- loss: first step {s['loss_first']:.3f}, mean of last 10 steps {s['loss_last10']:.3f}",
        "- validation (paper keyword judge, greedy; held-out SORRY-Bench/TrustLLM train rows "
        "and the project's own scary-but-benign prompts): "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["validation"].items()),
        "",
        "Data: harmful = the AdvBench SCANS anchors (draw_anchors(64, seed=0)) that are not also "
        "RepE test prompts (16 of 64) + SORRY-Bench train + TrustLLM misuse/jailbreak train; "
        "benign = the TruthfulQA anchors (63 of 64; one is an OKTest prompt) + RepE train "
        "harmless half + AlpacaEval + TriviaQA questions, in that order until the count is met. "
        "No evaluation prompt (XSTest, OKTest, "
        "HarmfulQ, MaliciousInstruct, Held-out harmless, RepE test, AdvBench/TruthfulQA "
        "remainders, SORRY-Bench eval, TrustLLM eval/exaggerated-safety) is used; the builder "
        "checks it by normalised text.",
        "",
        "Load it with `safesteer ... --model organism` (base + adapter merged with peft).",
        "",
        "```json",
        json.dumps(s, indent=2, sort_keys=True),
        "```",
        "",
    ]
    (out / "NOTE.md").write_text("\n".join(lines), encoding="utf-8")
