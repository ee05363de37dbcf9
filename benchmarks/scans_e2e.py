"""End-to-end SCANS (decision + steered generation, fused path) vs plain generation.

Workloads on the same queries, repeated in alternating order, stop tokens disabled so every run
decodes exactly N tokens:

* ``plain``    – encode, ``generate_ids``, detokenise (no steering, no decision);
* ``fused``    – ``scans_generate``: one prefill of prompt + reply prefix (the classifier reads its
  states from it), the cache rolled back to before the last prompt token, that token rerun steered;
* ``two_pass`` – ``scans_generate_two_pass`` (batched): a full classification forward, then a
  steered generation with its own prefill (for reference);
* ``single``   – a prototype written here, not in the library (skip with ``--no-prototype``): the
  decision and the steered last prompt token in one forward (:func:`single_forward_fused`). Its
  decisions and token ids are checked against ``fused``.

The prompt phase of each workload is its first ``N_PREFILL`` forwards; the count is checked against
the forwards each run makes (``new_tokens - 1`` decode forwards follow the prompt phase), so a
change in the library cannot make a decode step count as decision cost. (Until this check, the
fused path was counted with three prompt-phase forwards after it had gone down to two: its "forward
time" then included the first decode step, ~0.4 prefills at batch 1.)

The decision step's cost is reported in *prefill equivalents* three ways:

* tokens:      (prompt-phase tokens of SCANS - prompt tokens) / prompt tokens, counted from the
               attention masks of the forwards actually run (real tokens, padding excluded);
* time, forwards: (time of SCANS' prompt-phase forwards - plain prefill) / plain prefill;
* time, end-to-end: (SCANS total - plain total) / plain prefill (includes steering in decode).

Target: <= 0.25 prefill equivalents.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import (
    Report,
    Run,
    Target,
    build_parser,
    finish_args,
    fit_artifact,
    fixed_length,
    load_lm,
    median,
    mixed_queries,
    paired_ratios,
    summary,
    time_call,
)

NAME = "scans_e2e"

# Prompt-phase forwards per workload: the fused path runs prompt + reply and the steered last token;
# two-pass runs the classification forward and the generation prefill; plain runs one prefill.
N_PREFILL = {"plain": 1, "fused": 2, "two_pass": 2, "single": 1}


def check_prompt_phase(name: str, forwards: int, new_tokens: int) -> None:
    """Fail when a run's forwards do not split into ``N_PREFILL[name]`` + ``new_tokens - 1``."""
    expected = N_PREFILL[name] + new_tokens - 1
    if forwards != expected:
        raise RuntimeError(
            f"workload {name!r} ran {forwards} forwards for {new_tokens} new tokens, not "
            f"{N_PREFILL[name]} prompt-phase + {new_tokens - 1} decode forwards: update N_PREFILL"
        )


def single_forward_fused(lm: Any, artifact: Any, queries: list[str], config: Any) -> list[Any]:
    """Prototype: SCANS decision and steered last prompt token in *one* prompt-phase forward.

    Each row runs ``prompt + reply + [p+, p-]``: two copies of the last prompt token p at p's
    position, which a custom 4-D mask lets attend to the prompt before p (and themselves) only; at
    the steering layers p+ gets ``+alpha_l v_l`` and p- gets ``-alpha_l v_l``. The decision reads
    its states at p and at the reply's end; then each row keeps the KV of p (coefficient 0), p+
    or p- as position p and decodes from that column's logits. Needs plain dynamic cache layers and
    sdpa or eager attention. Returns ``(sigma, token_ids)`` per query.
    """
    import torch

    from safesteer.core.activations import hidden_of, recording, with_hidden
    from safesteer.core.generation import decode_loop, new_cache
    from safesteer.core.layout import Batch, ChatLayout, left_pad
    from safesteer.core.steering import steering
    from safesteer.methods.scans.decide import _decisions, policy_coefficients

    settings = artifact.settings
    layout = ChatLayout(lm.tokenizer, settings.system_prompt)
    reply = layout.reply_ids(settings.reply_prefix)
    r = len(reply)
    encoded = [layout.prompt_ids(q) for q in queries]
    pad_id = int(lm.tokenizer.pad_token_id)
    implementation = lm.model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise RuntimeError(f"the prototype needs sdpa or eager attention, not {implementation}")
    with torch.inference_mode():
        full = left_pad([e + reply for e in encoded], pad_id, lm.device)
        w = full.width - r  # generation prompt columns; p is column w - 1
        last = full.input_ids[:, w - 1 : w]
        ids = torch.cat([full.input_ids, last, last], dim=1)
        mask2d = torch.cat([full.attention_mask, torch.ones_like(last), torch.ones_like(last)], 1)
        pos_p = full.position_ids[:, w - 1 : w]
        positions = torch.cat([full.position_ids, pos_p, pos_p], dim=1)
        n = ids.shape[1]
        rows = torch.arange(n, device=ids.device)
        allowed = (rows[None, :] <= rows[:, None])[None].repeat(ids.shape[0], 1, 1)
        allowed &= mask2d[:, None, :].bool()
        for copy in (n - 2, n - 1):  # p+ and p-: the prompt before p, and themselves
            allowed[:, copy, :] = False
            allowed[:, copy, : w - 1] = mask2d[:, : w - 1].bool()
        allowed |= torch.eye(n, dtype=torch.bool, device=ids.device)[None]  # no empty rows
        mask4d = allowed[:, None]
        if implementation == "eager":
            mask4d = torch.zeros(mask4d.shape, dtype=lm.dtype, device=ids.device).masked_fill(
                ~mask4d, torch.finfo(lm.dtype).min
            )
        vectors = artifact.steering_vectors()
        handles = []
        for layer, vector in vectors.items():
            v = vector.to(lm.layer_device(layer), lm.dtype)

            def hook(module: Any, args: Any, output: Any, v: Any = v) -> Any:
                hidden = hidden_of(output).clone()
                hidden[:, -2] += v
                hidden[:, -1] -= v
                return with_hidden(output, hidden)

            handles.append(lm.layers[layer].register_forward_hook(hook))
        cache = new_cache(lm)
        keep = torch.tensor([w - 1, n - 2, n - 1], device=ids.device)
        try:
            with recording(lm, settings.recorded_layers, [-(r + 3), -3]) as rec:
                out = lm.model(
                    input_ids=ids,
                    attention_mask=mask4d,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=keep,
                )
        finally:
            for handle in handles:
                handle.remove()
        if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise RuntimeError("the prototype handles plain dynamic cache layers only")
        decisions = _decisions(artifact, rec.stacked())
        coefficients = policy_coefficients(artifact)(decisions)
        choice = torch.where(coefficients > 0, 1, torch.where(coefficients < 0, 2, 0))
        chosen_column = keep[choice.to(keep.device)]
        batch_index = torch.arange(ids.shape[0], device=ids.device)
        for layer_cache in cache.layers:
            for attr in ("keys", "values"):
                tensor = getattr(layer_cache, attr)
                picked = tensor[batch_index, :, chosen_column.to(tensor.device)][:, :, None]
                setattr(layer_cache, attr, torch.cat([tensor[:, :, : w - 1], picked], dim=2))
        first = out.logits[batch_index, choice.to(out.logits.device)].float()
        prompt = Batch(full.input_ids[:, :w], full.attention_mask[:, :w], full.position_ids[:, :w])
        with steering(lm, vectors, coefficients, w - 1):
            generated = decode_loop(lm, prompt, first, cache, config)
    return [(d.sigma, t) for d, t in zip(decisions, generated.token_ids, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(NAME, __doc__ or NAME, default_reps=2)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--anchors", type=int, default=None, help="per side (default 32; quick 8)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--no-two-pass", action="store_true")
    parser.add_argument(
        "--no-prototype", action="store_true", help="skip the one-forward 'single' prototype"
    )
    args = finish_args(parser.parse_args(argv))
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    anchors = args.anchors or (8 if args.quick else 32)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from safesteer.core.generation import GenerationConfig, decode_texts, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass

    lm = load_lm(args.device)
    artifact = fit_artifact(lm, anchors, args.seed)
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    reply_len = len(layout.reply_ids(artifact.settings.reply_prefix))
    config = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=args.repetition_penalty)
    warm = GenerationConfig(max_new_tokens=2, repetition_penalty=args.repetition_penalty)
    queries_all = mixed_queries(max(batch_sizes), args.seed)

    report = Report(
        NAME,
        args,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "batch_sizes": batch_sizes,
            "new_tokens": new_tokens,
            "repetition_penalty": args.repetition_penalty,
            "anchors_per_side": anchors,
            "reply_prefix": artifact.settings.reply_prefix,
            "reply_prefix_tokens": reply_len,
            "steer_layers": list(artifact.settings.steer_layers),
            "cls_layers": list(artifact.settings.cls_layers),
            "stop_tokens": "disabled (fixed-length decoding)",
        },
    )
    main_rows: list[list[Any]] = []
    cost_rows: list[list[Any]] = []
    breakdown_rows: list[list[Any]] = []
    agreement: dict[int, dict[str, int]] = {}
    worst: dict[str, float] = {}
    for bs in batch_sizes:
        queries = queries_all[:bs]

        def plain(cfg: GenerationConfig = config, qs: list[str] = queries) -> Any:
            with fixed_length():
                encoded = [layout.prompt_ids(q) for q in qs]
                return decode_texts(lm, generate_ids(lm, encoded, cfg))

        def fused(cfg: GenerationConfig = config, qs: list[str] = queries, b: int = bs) -> Any:
            with fixed_length():
                return scans_generate(lm, artifact, qs, cfg, batch_size=b)

        def two_pass(cfg: GenerationConfig = config, qs: list[str] = queries, b: int = bs) -> Any:
            with fixed_length():
                return scans_generate_two_pass(lm, artifact, qs, cfg, batch_size=b)

        workloads = {"plain": plain, "fused": fused}
        if not args.no_two_pass:
            workloads["two_pass"] = two_pass

        def single(cfg: GenerationConfig = config, qs: list[str] = queries) -> Any:
            with fixed_length():
                return single_forward_fused(lm, artifact, qs, cfg)

        if not args.no_prototype:
            workloads["single"] = single
            with fixed_length():
                ref = scans_generate(lm, artifact, queries, config, batch_size=bs)
            proto = single(config)
            agreement[bs] = {
                "decisions_equal": sum(
                    a.decision.sigma == b[0] for a, b in zip(ref, proto, strict=True)
                ),
                "tokens_equal": sum(a.token_ids == b[1] for a, b in zip(ref, proto, strict=True)),
                "rows": bs,
            }
        for fn in workloads.values():
            fn(warm)
        runs: dict[str, list[Run]] = {n: [] for n in workloads}
        names = list(workloads)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                run, _ = time_call(
                    workloads[name],
                    lm.model,
                    args.device,
                    n_prefill=N_PREFILL[name],
                    new_tokens=new_tokens,
                )
                check_prompt_phase(name, len(run.forward_seconds), new_tokens)
                runs[name].append(run)

        base = runs["plain"]
        per_method: dict[str, Any] = {}
        for name in names:
            rs = runs[name]
            tokens = [
                (r.prefill_real_tokens - p.prefill_real_tokens) / p.prefill_real_tokens
                for r, p in zip(rs, base, strict=True)
            ]
            positions = [
                (r.prefill_positions - p.prefill_positions) / p.prefill_positions
                for r, p in zip(rs, base, strict=True)
            ]
            fwd_time = [(r.prefill - p.prefill) / p.prefill for r, p in zip(rs, base, strict=True)]
            e2e_time = [(r.total - p.total) / p.prefill for r, p in zip(rs, base, strict=True)]
            total_ratio = paired_ratios([r.total for r in rs], [p.total for p in base])
            decode_ratio = paired_ratios(
                [p.decode_tokens_per_s for p in base], [r.decode_tokens_per_s for r in rs]
            )
            per_method[name] = {
                "runs": [r.to_json() for r in rs],
                "total_vs_plain": summary(total_ratio),
                "decode_slowdown_vs_plain": summary(decode_ratio),
                "prefill_equiv_tokens": summary(tokens),
                "prefill_equiv_padded_positions": summary(positions),
                "prefill_equiv_forward_time": summary(fwd_time),
                "prefill_equiv_end_to_end_time": summary(e2e_time),
            }
            main_rows.append(
                [
                    bs,
                    name,
                    median([r.total for r in rs]),
                    median(total_ratio),
                    median([1e3 * r.prefill for r in rs]),
                    median([r.decode_tokens_per_s for r in rs]),
                    median(decode_ratio),
                ]
            )
            if name != "plain":
                cost_rows.append(
                    [
                        bs,
                        name,
                        median(tokens),
                        median(positions),
                        median(fwd_time),
                        median(e2e_time),
                    ]
                )
        fused_runs = runs["fused"]
        breakdown = [
            median(
                [r.forward_seconds[k] / p.prefill for r, p in zip(fused_runs, base, strict=True)]
            )
            for k in range(N_PREFILL["fused"])
        ]
        breakdown_rows.append([bs, *breakdown])
        per_method["fused"]["forward_breakdown_in_prefills"] = breakdown
        report.data[f"batch_{bs}"] = {
            "prompt_tokens": [len(layout.prompt_ids(q)) for q in queries],
            "methods": per_method,
        }
        fused_cost = per_method["fused"]
        for key in ("prefill_equiv_tokens", "prefill_equiv_forward_time"):
            worst[f"{key}@{bs}"] = fused_cost[key]["median"]

    report.table(
        f"SCANS end to end ({new_tokens} new tokens, medians of {args.reps} interleaved reps)",
        [
            "batch",
            "workload",
            "total s",
            "total vs plain",
            "prompt phase ms",
            "decode tok/s",
            "decode slowdown",
        ],
        main_rows,
    )
    report.table(
        "Decision cost in prefill equivalents (extra over plain / plain prefill)",
        ["batch", "workload", "tokens", "padded positions", "forward time", "end-to-end time"],
        cost_rows,
    )
    report.table(
        "Fused path forwards, each in plain prefills of the same batch",
        ["batch", "prompt + reply (decision states)", "steered last prompt token"],
        breakdown_rows,
    )
    for bs in batch_sizes:
        report.target(
            Target(
                f"decision cost, tokens, batch {bs}",
                worst[f"prefill_equiv_tokens@{bs}"],
                0.25,
                "<=",
                "prefills",
            )
        )
        report.target(
            Target(
                f"decision cost, forward time, batch {bs}",
                worst[f"prefill_equiv_forward_time@{bs}"],
                0.25,
                "<=",
                "prefills",
            )
        )
    if agreement:
        report.data["single_vs_fused_agreement"] = {str(k): v for k, v in agreement.items()}
        report.table(
            "Prototype 'single' vs library 'fused': agreement",
            ["batch", "decisions equal", "token ids equal", "rows"],
            [
                [bs, a["decisions_equal"], a["tokens_equal"], a["rows"]]
                for bs, a in agreement.items()
            ],
        )
    report.note(
        "prompt phase = from the first forward's start to the end of the last prompt-phase forward "
        f"({N_PREFILL} forwards per workload), host work between them included."
    )
    return report.emit()


if __name__ == "__main__":
    main()
