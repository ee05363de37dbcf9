"""`safesteer eval` on a tiny in-process model: methods side by side, judges, resume, report."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from safesteer.core.handle import LoadedModel
from safesteer.evaluation.eval_options import EvalOptions
from safesteer.evaluation.eval_rows import sample_per_subset
from safesteer.evaluation.evaluate import evaluate
from safesteer.evaluation.report import write_report
from safesteer.evaluation.run_setup import RunError
from safesteer.evaluation.suites import SCANS_TABLE2


@pytest.fixture
def data_env(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAFESTEER_DATA_DIR", str(shared_data))
    return shared_data


def _options(out: Path, **changes: Any) -> EvalOptions:
    options = EvalOptions(
        suite="scans-paper",
        methods=["default", "scans", "random", "prompt"],
        judges=["paper", "strict"],
        limit=1,
        max_new_tokens=3,
        batch_size=8,
        anchor_size=4,
        output_dir=str(out),
        bootstrap=50,
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["llama"]


def test_scans_paper_suite_all_methods(tiny: LoadedModel, data_env: Path, tmp_path: Path) -> None:
    summary = evaluate(_options(tmp_path), lm=tiny)
    rows = _rows(tmp_path)
    subsets = {r["subset"] for r in rows}
    assert set(SCANS_TABLE2) <= subsets and {"harmfulq", "heldout-harmless"} <= subsets
    assert len(rows) == 4 * len(subsets)  # one prompt per subset and method
    by_method = {m: [r for r in rows if r["method"] == m] for m in summary["methods"]}
    # same prompts for every method
    prompts = {m: [r["prompt"] for r in v] for m, v in by_method.items()}
    assert prompts["default"] == prompts["scans"] == prompts["random"] == prompts["prompt"]
    # decisions are shared by default/scans/random (same classifier), none for prompt
    assert [r["sigma"] for r in by_method["default"]] == [r["sigma"] for r in by_method["scans"]]
    assert all(r["score"] is None for r in by_method["prompt"])
    block = summary["results"]["scans"]["paper"]
    assert sorted(block["main_subsets"]) == sorted(SCANS_TABLE2)
    assert set(summary["agreement"]["scans"]) == {"paper~strict"}
    assert summary["classifier"]["scans"] is not None
    written = write_report(tmp_path)
    assert written["markdown"].read_text().count("xstest-safe") >= 1


def test_eval_resumes_after_interruption(tiny: LoadedModel, data_env: Path, tmp_path: Path) -> None:
    options = _options(tmp_path, methods=["default", "scans"], suite="xstest", limit=3)
    evaluate(options, lm=tiny)
    rows = _rows(tmp_path)
    assert len(rows) == 12
    kept = rows[:5]
    kept[0]["response"] = "SENTINEL"
    (tmp_path / "responses.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + '{"method": "sc'
    )
    evaluate(options, lm=tiny)
    again = _rows(tmp_path)
    assert len(again) == 12
    assert sorted((r["method"], r["id"]) for r in again) == sorted(
        (r["method"], r["id"]) for r in rows
    )
    assert any(r["response"] == "SENTINEL" for r in again)
    with pytest.raises(RunError, match="other settings"):
        evaluate(_options(tmp_path, suite="xstest", limit=4), lm=tiny)


def test_unknown_method_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="unknown method"):
        evaluate(_options(tmp_path, methods=["scans", "magic"]), lm=tiny)


def test_limit_samples_per_subset(data_env: Path) -> None:
    from safesteer.datasets import load_test_set

    prompts = load_test_set("xstest")
    sample = sample_per_subset(prompts, 5, seed=3)
    assert sorted(p.subset for p in sample) == ["xstest-safe"] * 5 + ["xstest-unsafe"] * 5
    assert sample == sample_per_subset(prompts, 5, seed=3)


def test_stratify_keeps_each_field_value_share(data_env: Path) -> None:
    from collections import Counter

    from safesteer.datasets import load_test_set

    sorry = load_test_set("sorry-bench-eval")
    sample = sample_per_subset(sorry, 450, seed=0, stratify=["category", "prompt_style"])
    cells = Counter((p.meta["category"], p.meta["prompt_style"]) for p in sample)
    assert len(sample) == 450 and len(cells) == 450  # one prompt per category x style
    by_category = sample_per_subset(sorry, 90, seed=0, stratify=["category"])
    assert set(Counter(p.meta["category"] for p in by_category).values()) == {2}
    plain = sample_per_subset(sorry, 90, seed=0)
    assert set(Counter(p.meta["category"] for p in plain).values()) != {2}
    # a suite with other subsets: those are sampled as usual
    mixed = sorry + load_test_set("xstest")
    sample = sample_per_subset(mixed, 90, seed=0, stratify=["category"])
    assert Counter(p.subset for p in sample) == {
        "sorry-bench-eval": 90,
        "xstest-safe": 90,
        "xstest-unsafe": 90,
    }


def test_stratify_by_a_missing_field_is_refused(data_env: Path) -> None:
    from safesteer.datasets import load_test_set

    xstest = load_test_set("xstest")
    with pytest.raises(RunError, match="no subset of this suite has these fields"):
        sample_per_subset(xstest, 5, seed=0, stratify=["category"])
    sorry = load_test_set("sorry-bench-eval")
    part = [p for p in sorry[:3]] + [type(p)(p.text, p.label, p.subset) for p in sorry[3:6]]
    with pytest.raises(RunError, match="only 3 of the 6 prompts"):
        sample_per_subset(part, 2, seed=0, stratify=["category"])


class _Judge(BaseHTTPRequestHandler):
    replies: ClassVar[list[str]] = ["1", "garbled verdict", "0"]
    count = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = self.replies[type(self).count % len(self.replies)]
        type(self).count += 1
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_llm_judge_unparsable_is_counted_not_refused(
    tiny: LoadedModel, data_env: Path, tmp_path: Path, judge_server: str
) -> None:
    options = _options(
        tmp_path,
        suite="xstest",
        methods=["default"],
        judges=["paper", "llm"],
        limit=3,
        judge_url=judge_server,
        judge_model="fake-judge",
    )
    summary = evaluate(options, lm=tiny)
    verdicts = [r["judges"]["llm"] for r in _rows(tmp_path)]
    assert verdicts.count(None) == 2  # every third reply is garbled
    block = summary["results"]["default"]["llm"]["subsets"]
    assert sum(s["n_unparsable"] for s in block.values()) == 2
    assert sum(s["n_refused"] for s in block.values()) == verdicts.count(True)
    assert summary["agreement"]["default"]["paper~llm"]["n_compared"] == 4


def test_empty_responses_are_reported_apart(
    tiny: LoadedModel, data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty replies (e.g. from a broken steering strength) are never refusals nor answers."""
    from safesteer.evaluation import evaluate as evaluate_module

    def fake(method: str, lm: Any, artifact: Any, queries: Any, *args: Any, **kw: Any) -> None:
        on_batch = args[3]
        outputs = [
            evaluate_module.MethodOutput("" if k % 2 else "Sure, here it is.", None)
            for k in range(len(queries))
        ]
        on_batch(list(range(len(queries))), outputs)

    monkeypatch.setattr(evaluate_module, "run_method", fake)
    summary = evaluate(_options(tmp_path, methods=["default"], suite="xstest", limit=3), lm=tiny)
    rows = _rows(tmp_path)
    assert [r["judges"]["strict"] for r in rows].count("empty") == 3
    for judge in ("paper", "strict"):
        block = summary["results"]["default"][judge]
        assert block["n_empty"] == 3
        assert sum(s["n_refused"] for s in block["subsets"].values()) == 0
        assert sum(s["n_empty"] for s in block["subsets"].values()) == 3
        # 3 answered rows remain: safe answered is right, unsafe answered is wrong
        judged = [r for r in rows if r["response"]]
        right = sum(r["label"] == "safe" for r in judged)
        assert block["main_avg"] == pytest.approx(100.0 * right / len(judged))
    markdown = write_report(tmp_path)["markdown"].read_text()
    assert "empty)" in markdown


def test_judge_added_on_resume_judges_the_earlier_rows(
    tiny: LoadedModel, data_env: Path, tmp_path: Path
) -> None:
    """Bug 2: rows written before `--judge strict` was added get strict verdicts on resume."""
    from safesteer.evaluation.judges.keyword import StrictJudge

    options = _options(tmp_path, methods=["default"], suite="xstest", limit=2, judges=["paper"])
    evaluate(options, lm=tiny)
    first = _rows(tmp_path)
    assert all(set(r["judges"]) == {"paper"} for r in first)
    summary = evaluate(_options(tmp_path, methods=["default"], suite="xstest", limit=2), lm=tiny)
    again = _rows(tmp_path)
    assert [r["response"] for r in again] == [r["response"] for r in first]  # nothing regenerated
    assert [r["judges"]["strict"] for r in again] == [
        StrictJudge().judge(r["prompt"], r["response"]) for r in again
    ]
    strict = summary["results"]["default"]["strict"]
    assert strict["n_unparsable"] == 0
    assert sum(s["n_unparsable"] for s in strict["subsets"].values()) == 0


def test_rejudge_replaces_stored_verdicts_of_the_named_judges_only(
    tiny: LoadedModel, data_env: Path, tmp_path: Path
) -> None:
    """`eval --rejudge` judges every stored row again (a rule changed) without generating."""
    from safesteer.evaluation.judges.keyword import StrictJudge

    options = _options(tmp_path, methods=["default", "scans"], suite="xstest", limit=2)
    evaluate(options, lm=tiny)
    first = _rows(tmp_path)
    stale = [{**r, "judges": {"paper": "kept", "strict": "stale"}} for r in first]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    evaluate(_options(tmp_path, methods=["default"], suite="xstest", limit=2), lm=tiny)
    assert {r["judges"]["strict"] for r in _rows(tmp_path)} == {"stale"}  # resume keeps verdicts
    again_options = _options(
        tmp_path, methods=["default"], suite="xstest", limit=2, judges=["strict"], rejudge=True
    )
    evaluate(again_options, lm=tiny)
    again = _rows(tmp_path)
    assert [r["response"] for r in again] == [r["response"] for r in first]  # nothing regenerated
    for row in again:
        assert row["judges"]["paper"] == "kept"  # not named: untouched
        if row["method"] == "default":
            assert row["judges"]["strict"] == StrictJudge().judge(row["prompt"], row["response"])
        else:  # a method outside this run keeps what it had
            assert row["judges"]["strict"] == "stale"


def test_a_second_run_on_a_folder_in_use_stops_with_a_clear_error(
    tiny: LoadedModel, data_env: Path, tmp_path: Path
) -> None:
    """Two evals on one folder would interleave their writes: the second one is refused."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    options = _options(out, methods=["default"], suite="xstest", limit=1)
    evaluate(options, lm=tiny)
    rows = (out / "responses.jsonl").read_text()
    with (out / ".lock").open("a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match=r"another safesteer run is writing .*another --output"):
            evaluate(_options(out, methods=["default"], suite="xstest", limit=1), lm=tiny)
    assert (out / "responses.jsonl").read_text() == rows  # untouched
    evaluate(options, lm=tiny)  # free again once the other run has finished
    # a run that fails before writing anything leaves no folder behind
    fresh = tmp_path / "fresh"
    with pytest.raises(RunError):
        evaluate(_options(fresh, methods=["magic"]), lm=tiny)
    assert not fresh.exists()


def test_resume_refuses_rows_of_other_prompts(
    tiny: LoadedModel, data_env: Path, tmp_path: Path
) -> None:
    """Bug 2: a row whose prompt is not the prompt at its index is never reused silently."""
    options = _options(tmp_path, methods=["default"], suite="xstest", limit=2)
    evaluate(options, lm=tiny)
    rows = _rows(tmp_path)
    rows[1]["prompt"] = "a prompt that is not in the list"
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunError, match=r"1 row\(s\) whose prompt differs .* id 1"):
        evaluate(options, lm=tiny)
    assert _rows(tmp_path) == rows  # the folder is left as it was


def test_a_fine_tunes_training_prompts_are_never_test_prompts(
    tiny: LoadedModel, data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts a model was trained on (``LoadedModel.trained_on``, e.g. the organism's) are
    dropped from every test set, whatever the anchor seed."""
    from safesteer.evaluation import evaluate as evaluate_module

    def fake(method: str, lm: Any, artifact: Any, queries: Any, *args: Any, **kw: Any) -> None:
        args[3](
            list(range(len(queries))), [evaluate_module.MethodOutput("Sure.", None)] * len(queries)
        )

    monkeypatch.setattr(evaluate_module, "run_method", fake)
    options = _options(tmp_path / "a", methods=["default"], suite="xstest", limit=3, seed=1)
    evaluate(options, lm=tiny)
    first = {r["prompt"] for r in _rows(tmp_path / "a")}
    monkeypatch.setattr(tiny, "trained_on", frozenset(first))
    evaluate(
        _options(tmp_path / "b", methods=["default"], suite="xstest", limit=3, seed=1), lm=tiny
    )
    second = {r["prompt"] for r in _rows(tmp_path / "b")}
    assert len(second) == len(first) and not first & second


def test_stratify_enters_the_resume_key_only_when_set() -> None:
    assert "stratify" not in EvalOptions().resume_key()  # older folders still resume
    assert EvalOptions(stratify=["category"]).resume_key()["stratify"] == ["category"]
