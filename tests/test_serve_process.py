"""`safesteer serve` as a real process: the loopback-only rule without a key, and SIGTERM while
streams are in flight (they finish, then the process exits). The SIGTERM test is slow: the
subprocess imports torch and transformers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import BENIGN, build_tiny
from safesteer.cli.main import app
from safesteer.serving.local import free_port, is_healthy

HANG_GUARD_S = 180  # only against a hung test; nothing is timed


def test_no_key_binds_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SAFESTEER_API_KEY"}
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 1
    assert "needs an API key" in result.output and "127.0.0.1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    lm = build_tiny("llama", tokenizer)
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    port, key = free_port(), "k" * 16
    env = {**os.environ, "SAFESTEER_API_KEY": key, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", "from safesteer.cli.main import main; main()", "serve"]
    args += ["--model", str(folder), "--port", str(port), "--threads", "1"]
    args += ["--served-model-name", "tiny", "--max-tokens-limit", "200"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not is_healthy(port, key):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60
        )
        streams = [
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": q}],
                max_tokens=200,
                stream=True,
            )
            for q in BENIGN
        ]
        firsts = [next(iter(s)) for s in streams]  # every stream has started
        assert all(f.choices[0].delta.role == "assistant" for f in firsts)
        proc.send_signal(signal.SIGTERM)
        with ThreadPoolExecutor(len(streams)) as pool:
            rests = list(pool.map(list, streams))
        for rest in rests:
            reasons = [c.choices[0].finish_reason for c in rest if c.choices]
            assert reasons[-1] in ("stop", "length")
        # uvicorn shuts down gracefully, then re-raises the signal (the conventional exit status)
        assert proc.wait(HANG_GUARD_S) in (0, -signal.SIGTERM)
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
        assert not is_healthy(port, key)  # it is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_benchmark_statistics() -> None:
    from benchmarks.serve_concurrency import Outcome, percentile, phase_stats

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == 9.0
    stats = phase_stats(
        [Outcome(ttft=0.5, latency=1.5, tokens=11), Outcome(error="APIConnectionError: x")], 2.0
    )
    assert stats["errors"] == 1 and stats["tokens"] == 11
    assert stats["tokens_per_second"] == 5.5
    assert stats["decode_tokens_per_second_per_request"]["p50"] == 10.0
