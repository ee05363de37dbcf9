"""bfloat16 against float32 on the CPU: decoding speed and how far greedy replies agree.

``python -m benchmarks.cpu_dtype --model qwen2.5-coder-0.5b --threads 1`` (the model must be
fetched). The library loads models in float32 on the CPU (``--dtype auto``). CPUs with AMX or
AVX512-BF16 run bfloat16 matrix products several times faster; this measures, in one run:

- tokens/s of plain greedy decoding at batch 16 in each dtype (fixed length, interleaved
  repetitions), and their ratio;
- on the same prompts decoded to their end: the share of replies that are token-for-token equal,
  where the differing ones first differ, and the share on which the strict refusal judge gives the
  same verdict.

Prompts: anchor-pool prompts (half AdvBench, half TruthfulQA training anchors), never a test set.
A calibration's thresholds are read on float32 states; before evaluating in bfloat16, calibrate in
bfloat16 as well.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from benchmarks.common import (
    build_parser,
    finish_args,
    fixed_length,
    interleave,
    machine_info,
    mixed_queries,
    paired_ratios,
    summary,
)

DTYPES = ("float32", "bfloat16")


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("cpu_dtype", __doc__ or "", default_reps=3)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32, help="prompts for the agreement part")
    args = finish_args(parser.parse_args(argv), quick_reps=1)
    if args.device != "cpu":
        raise SystemExit("cpu_dtype measures the CPU path; use --device cpu")
    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.evaluation.judges.keyword import is_refusal_strict
    from safesteer.models import load_model

    models = {dtype: load_model(args.model, dtype=dtype) for dtype in DTYPES}
    layout = ChatLayout(models["float32"].tokenizer)
    new_tokens = 8 if args.quick else args.new_tokens
    n_prompts = 8 if args.quick else args.prompts
    queries = mixed_queries(max(16, n_prompts), args.seed)
    timed = [layout.prompt_ids(q) for q in queries[:16]]
    config = GenerationConfig(max_new_tokens=new_tokens)

    def workload(dtype: str) -> Any:
        def run() -> float:
            start = time.perf_counter()
            generate_ids(models[dtype], timed, config)
            return len(timed) * new_tokens / (time.perf_counter() - start)

        return run

    with fixed_length():
        rates = interleave(args.reps, {dtype: workload(dtype) for dtype in DTYPES})
    ratio = paired_ratios(rates["bfloat16"], rates["float32"])

    prompts = [layout.prompt_ids(q) for q in queries[:n_prompts]]
    replies = {
        dtype: generate_ids(models[dtype], prompts, GenerationConfig(max_new_tokens=new_tokens))
        for dtype in DTYPES
    }
    pairs = list(zip(replies["float32"].token_ids, replies["bfloat16"].token_ids, strict=True))
    tokenizer = models["float32"].tokenizer
    verdicts = [
        (is_refusal_strict(tokenizer.decode(a)), is_refusal_strict(tokenizer.decode(b)))
        for a, b in pairs
    ]
    agreement = {
        "prompts": len(pairs),
        "identical_replies": sum(a == b for a, b in pairs) / len(pairs),
        # where the replies that differ first differ (tokens from the start of the reply)
        "first_difference_when_different": summary(
            [first_difference(a, b) for a, b in pairs if a != b]
        ),
        "same_strict_verdict": sum(x == y for x, y in verdicts) / len(verdicts),
        "refusals": {
            "float32": sum(x for x, _ in verdicts),
            "bfloat16": sum(y for _, y in verdicts),
        },
    }
    report = {
        "benchmark": "cpu_dtype",
        "model": args.model,
        "machine": machine_info(args.device),
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "reps": args.reps,
        "tokens_per_s_batch16": {dtype: summary(rates[dtype]) for dtype in DTYPES},
        "bf16_speedup": summary(ratio),
        "agreement": agreement,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = args.out.with_name(args.out.name.replace("cpu_dtype", f"cpu_dtype.{args.model}"))
    name.write_text(json.dumps(report, indent=2) + "\n")
    speed = report["tokens_per_s_batch16"]
    print(
        f"{args.model}: batch-16 tokens/s float32 {speed['float32']['median']:.1f}, "
        f"bfloat16 {speed['bfloat16']['median']:.1f} "
        f"(x{report['bf16_speedup']['median']:.2f}); identical replies "
        f"{agreement['identical_replies']:.0%} (the others first differ at token "
        f"{agreement['first_difference_when_different']['median']:.0f}, median), "
        f"same strict verdict "
        f"{agreement['same_strict_verdict']:.0%} -> {name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
