"""`safesteer eval` killed with SIGKILL mid-run (a real subprocess) resumes with nothing lost and
nothing duplicated: the final rows equal those of an uninterrupted run (made in this process).

Both tests take tens of seconds on a shared CPU (each subprocess imports torch and transformers),
so both are marked slow."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import build_tiny, make_tokenizer
from safesteer.core.handle import LoadedModel
from safesteer.evaluation.eval_options import EvalOptions
from safesteer.evaluation.evaluate import evaluate
from safesteer.models import load_model

CLI = "from safesteer.cli.main import main; main()"


def _args(model: str | None, out: Path, limit: int, tokens: int) -> list[str]:
    args = [sys.executable, "-c", CLI, "eval", "--suite", "xstest", "--methods", "default,scans"]
    args += ["--limit", str(limit), "--max-new-tokens", str(tokens), "--batch-size", "1"]
    args += ["--anchor-size", "4", "--bootstrap", "10", "--output-dir", str(out)]
    return args + (["--model", model] if model else [])


def _env() -> dict[str, str]:
    # one thread: the same arithmetic in every process, so greedy decoding repeats exactly
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in _lines(path):
        with contextlib.suppress(json.JSONDecodeError):  # the line the kill cut short
            rows.append(json.loads(line))
    return rows


def _finish(args: list[str]) -> str:
    result = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _key(row: dict[str, Any]) -> tuple[str, int]:
    return row["method"], row["id"]


def _uninterrupted(lm: LoadedModel, out: Path, limit: int, tokens: int) -> None:
    """The same run in this process (one torch thread, as in the subprocesses), never killed."""
    options = EvalOptions(
        suite="xstest",
        methods=["default", "scans"],
        limit=limit,
        max_new_tokens=tokens,
        batch_size=1,
        anchor_size=4,
        bootstrap=10,
        output_dir=str(out),
    )
    evaluate(options, lm=lm, show=False)


def _kill_resume_compare(
    model: str | None, lm: LoadedModel, tmp_path: Path, limit: int, tokens: int
) -> None:
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    responses = killed / "responses.jsonl"
    proc = subprocess.Popen(
        _args(model, killed, limit, tokens),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_lines(responses)) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no rows written in 300 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = {_key(r): r for r in _complete_rows(responses)}
    total = 2 * 2 * limit  # two methods, two XSTest subsets
    assert 2 <= len(before) < total
    assert not (killed / "summary.json").exists()

    log = _finish(_args(model, killed, limit, tokens))  # resume
    # stderr is a pipe, not a terminal: the progress bar leaves a plain status line at the end
    assert f"/{total} (100.0 %)" in log, log[-2000:]
    _uninterrupted(lm, whole, limit, tokens)
    resumed = [json.loads(line) for line in _lines(responses)]
    reference = [json.loads(line) for line in _lines(whole / "responses.jsonl")]
    assert len(resumed) == len({_key(r) for r in resumed}) == total  # nothing duplicated
    assert {_key(r) for r in resumed} == {_key(r) for r in reference}  # nothing lost
    by_key = {_key(r): r for r in resumed}
    for key, row in before.items():  # rows written before the kill are kept as they were
        assert by_key[key] == row
    strip = ("layer_cosines", "score")  # floats: compared with a tolerance below
    for got, want in zip(resumed, reference, strict=True):
        assert {k: v for k, v in got.items() if k not in strip} == {
            k: v for k, v in want.items() if k not in strip
        }
        if want["score"] is not None:
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["n_prompts"] == 2 * limit


@pytest.mark.slow
def test_killed_eval_resumes_tiny_model(tmp_path: Path) -> None:
    """A tiny model in a folder: fast, and enough rows that the kill lands mid-run."""
    folder = tmp_path / "tiny"
    tiny = build_tiny("llama", make_tokenizer(), seed=0)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    _kill_resume_compare(str(folder), load_model(str(folder)), tmp_path, limit=20, tokens=4)


@pytest.mark.slow
def test_killed_eval_resumes_embedded_model(embedded: LoadedModel, tmp_path: Path) -> None:
    """The embedded SmolLM2 (two processes, each loading it: tens of seconds)."""
    _kill_resume_compare(None, embedded, tmp_path, limit=3, tokens=3)
