"""Cost of a named model here: load time, plain greedy tokens/s at batch 1 and 16, memory.

``python -m benchmarks.model_cost --model qwen2.5-coder-0.5b`` (the model must be fetched). Load
time is measured in a fresh subprocess from the converted cache; tokens/s are medians over
``--reps`` repetitions of a fixed-length greedy decode (no early stop), so every run decodes the
same number of tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import (
    build_parser,
    finish_args,
    fixed_length,
    machine_info,
    memory_snapshot,
    mixed_queries,
    summary,
)

LOAD_SNIPPET = (
    "import time,sys,json;t=time.perf_counter();"
    "from safesteer.models import load_model;lm=load_model(sys.argv[1]);"
    "print(json.dumps({'seconds':time.perf_counter()-t,'layers':lm.num_layers}))"
)


def load_seconds(model: str) -> dict[str, Any]:
    """Load the model in a fresh interpreter (imports included) and time it."""
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET, model], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("model_cost", __doc__ or "", default_reps=3)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = finish_args(parser.parse_args(argv), quick_reps=1)
    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.models import load_model

    load = load_seconds(args.model)
    lm = load_model(args.model, device=args.device)
    after_load = memory_snapshot()
    layout = ChatLayout(lm.tokenizer)
    queries = mixed_queries(16, args.seed)
    config = GenerationConfig(max_new_tokens=8 if args.quick else args.new_tokens)
    results: dict[str, Any] = {}
    with fixed_length():
        for batch in (1, 16):
            prompts = [layout.prompt_ids(q) for q in queries[:batch]]
            generate_ids(lm, prompts, GenerationConfig(2))  # warm-up
            rates = []
            for _ in range(args.reps):
                start = time.perf_counter()
                generate_ids(lm, prompts, config)
                elapsed = time.perf_counter() - start
                rates.append(batch * config.max_new_tokens / elapsed)
            results[f"batch_{batch}"] = {"tokens_per_s": summary(rates)}
    report = {
        "benchmark": "model_cost",
        "model": args.model,
        "model_name": lm.name,
        "machine": machine_info(args.device),
        "threads": torch.get_num_threads(),
        "load": load,
        "memory_after_load": after_load,
        "memory_after_decoding": memory_snapshot(),
        "new_tokens": config.max_new_tokens,
        "reps": args.reps,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = args.out.with_name(args.out.name.replace("model_cost", f"model_cost.{args.model}"))
    name.write_text(json.dumps(report, indent=2) + "\n")
    gib = (report["memory_after_decoding"]["vm_hwm_bytes"] or 0) / 2**30
    print(
        f"{args.model}: load {load['seconds']:.1f} s; tokens/s batch 1 "
        f"{results['batch_1']['tokens_per_s']['median']:.1f}, batch 16 "
        f"{results['batch_16']['tokens_per_s']['median']:.1f}; peak RSS {gib:.2f} GiB -> {name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
