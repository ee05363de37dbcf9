"""`safesteer serve` through real HTTP: uvicorn on a free loopback port in a thread, the real
`openai` client (and raw HTTP for malformed input), tiny random models.

Served results are compared with the library's functions on the same prompts: SCANS, the
unsteered SCANS baseline (method none), SafeSwitch and plain generation.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import uvicorn
from transformers import PreTrainedTokenizerFast

from conftest import BENIGN, HARMFUL, build_tiny, random_switch
from safesteer.core.activations import capture
from safesteer.core.generation import GenerationConfig, decode_texts, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.combined import combined_generate
from safesteer.methods.combined_gate import CombinedGate
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import safeswitch_generate
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import classify, unsteered
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.gate import ProbeGate
from safesteer.methods.scans.generate import scans_generate
from safesteer.methods.scans.settings import ScansSettings
from safesteer.serving import Engine, EngineSettings, ServeSettings, create_app
from safesteer.serving.loading import default_method, load_methods

QUERIES = [HARMFUL[0], BENIGN[0], HARMFUL[2], BENIGN[3], "Hi", "Write a story about a bank."]
TOKENS = 10
KEY = "test-key-123"
HANG_GUARD_S = 60  # only against a hung test; nothing is timed


@pytest.fixture(scope="module")
def lm(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return build_tiny("llama", tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def scans(lm: LoadedModel) -> ScansArtifact:
    """Fitted on the tiny model, threshold at the median score of QUERIES (both signs occur)."""
    settings = ScansSettings(
        alpha=0.5,
        alpha_mode="relative",
        steer_layers=(1, 2),
        cls_layers=tuple(range(1, lm.num_layers)),
        threshold=None,
    )
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=3)
    scores = sorted(d.score for d in classify(lm, artifact, QUERIES))
    middle = len(scores) // 2
    return artifact.with_settings(threshold=(scores[middle - 1] + scores[middle]) / 2)


@pytest.fixture(scope="module")
def safeswitch(lm: LoadedModel) -> SafeSwitchArtifact:
    """Random prober and refusal head (direct mode), threshold at the median: half flagged."""
    return _median_threshold(lm, random_switch(lm, "direct", n_decode=0))


def _median_threshold(lm: LoadedModel, artifact: SafeSwitchArtifact) -> SafeSwitchArtifact:
    """Stage 1's threshold between the middle rows' probabilities (stage 2 always passes)."""
    config = GenerationConfig(max_new_tokens=1)
    probe = artifact.with_settings(threshold1=-1.0)
    p1 = sorted(r.decision.stage1 or 0.0 for r in safeswitch_generate(lm, probe, QUERIES, config))
    return artifact.with_settings(threshold1=(p1[2] + p1[3]) / 2, threshold2=-1.0)


@contextmanager
def serving(engine: Engine, settings: ServeSettings) -> Iterator[tuple[str, Engine, ServeSettings]]:
    """The app on a free 127.0.0.1 port, served by uvicorn in a thread until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine, settings
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD_S)
        sock.close()


def _settings(lm: LoadedModel, **kw: Any) -> ServeSettings:
    return ServeSettings(
        model_id=lm.name, context=256, max_tokens_limit=64, default_max_tokens=TOKENS, **kw
    )


@pytest.fixture(scope="module")
def server(
    lm: LoadedModel, scans: ScansArtifact, safeswitch: SafeSwitchArtifact
) -> Iterator[tuple[str, Engine, ServeSettings]]:
    engine = Engine(lm, scans=scans, safeswitch=safeswitch, settings=EngineSettings(max_batch=8))
    with serving(engine, _settings(lm, default_method="scans")) as running:
        yield running


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=HANG_GUARD_S)


def _ask(client: openai.OpenAI, model: str, query: str, **safesteer: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": query}],
        max_tokens=TOKENS,
        extra_body={"safesteer": safesteer} if safesteer else None,
    )


def _post(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """Raw HTTP POST to /v1/chat/completions; (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_GUARD_S)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(
        "POST",
        "/v1/chat/completions",
        raw,
        {"Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_models_and_health(server: tuple[str, Engine, ServeSettings]) -> None:
    url, _engine, settings = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [settings.model_id]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_GUARD_S)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok"
    assert health["methods"] == ["none", "scans", "safeswitch"]
    assert health["default_method"] == "scans"


def test_concurrent_mixed_methods_equal_the_library(
    server: tuple[str, Engine, ServeSettings],
    lm: LoadedModel,
    scans: ScansArtifact,
    safeswitch: SafeSwitchArtifact,
) -> None:
    url, engine, settings = server
    client = _client(url)
    config = GenerationConfig(max_new_tokens=TOKENS)
    strong = scans.settings.alpha * 3
    expected: dict[tuple[str, float | None], list[Any]] = {
        ("scans", None): scans_generate(lm, scans, QUERIES, config),
        ("scans", strong): scans_generate(lm, scans.with_settings(alpha=strong), QUERIES, config),
        ("none", None): scans_generate(lm, scans, QUERIES, config, coefficients=unsteered),
        ("safeswitch", None): safeswitch_generate(lm, safeswitch, QUERIES, config),
    }
    jobs = [(key, i) for key in expected for i in range(len(QUERIES))]

    def call(job: tuple[tuple[str, float | None], int]) -> Any:
        (method, alpha), i = job
        options: dict[str, Any] = {"method": method}
        if alpha is not None:
            options["alpha"] = alpha
        return _ask(client, settings.model_id, QUERIES[i], **options)

    before = len(engine.batches)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs))
    for ((method, alpha), i), answer in zip(jobs, answers, strict=True):
        want = expected[(method, alpha)][i]
        assert answer.choices[0].message.content == want.response, (method, alpha, i)
        assert answer.usage.completion_tokens == len(want.token_ids)
        assert answer.choices[0].finish_reason == ("stop" if want.stopped else "length")
        decision = answer.model_extra["safesteer"]
        assert decision["method"] == method
        if method == "safeswitch":
            assert decision["flagged"] == want.decision.flagged
            assert decision["stage1"] == pytest.approx(want.decision.stage1)
        else:
            assert decision["sigma"] == want.decision.sigma
            assert decision["score"] == pytest.approx(want.decision.score)
            if method == "none":
                assert decision["coefficient"] == 0
            else:
                assert abs(decision["coefficient"]) == pytest.approx((alpha or 0.5) / 0.5)
    steered, baseline = expected[("scans", None)], expected[("none", None)]
    assert any(a.response != b.response for a, b in zip(steered, baseline, strict=True))
    sigmas = {r.decision.sigma for r in expected[("scans", None)]}
    assert sigmas == {-1, 1}  # both steering signs were served
    assert {r.decision.flagged for r in expected[("safeswitch", None)]} == {True, False}
    # 24 requests at once with 8 rows per batch: some batch held more than one row
    assert max(size for size, _ in list(engine.batches)[before:]) > 1


def test_combined_method_through_the_server_equals_the_library(
    lm: LoadedModel, scans: ScansArtifact
) -> None:
    switch = _median_threshold(lm, random_switch(lm, "two-stage"))
    engine = Engine(lm, scans=scans, safeswitch=switch, settings=EngineSettings(max_batch=8))
    M = "scans+safeswitch"
    assert engine.methods() == ["none", "scans", "safeswitch", M]
    config = GenerationConfig(max_new_tokens=TOKENS)
    expected = combined_generate(lm, switch, scans, QUERIES, config)
    assert {r.steered for r in expected} == {True, False}  # both kinds of row are served
    with serving(engine, _settings(lm, default_method=M)) as (url, _, settings):
        client = _client(url)
        # each prompt twice: by name, and through the server's default method
        jobs = [(i, options) for i in range(len(QUERIES)) for options in ({"method": M}, {})]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(
                pool.map(lambda j: _ask(client, settings.model_id, QUERIES[j[0]], **j[1]), jobs)
            )
    for (i, _options), answer in zip(jobs, answers, strict=True):
        want = expected[i]
        assert answer.choices[0].message.content == want.response, i
        assert answer.usage.completion_tokens == len(want.token_ids)
        decision = answer.model_extra["safesteer"]
        assert decision["method"] == M  # also the server's default
        assert decision["steered"] == want.steered
        assert decision["flagged"] == want.decision.flagged
        assert decision["stage1"] == pytest.approx(want.decision.stage1)


def test_combined_gate_through_the_server_equals_the_library(
    tmp_path: Path, lm: LoadedModel, scans: ScansArtifact
) -> None:
    switch = random_switch(lm, "two-stage").with_settings(steer_below=1.5, threshold2=-1.0)
    p1 = [r.decision.stage1 for r in safeswitch_generate(lm, switch, QUERIES, GenerationConfig(1))]
    flag_from = float(torch.tensor(p1).median())  # stage 1 flags about half the rows
    switch = switch.with_settings(threshold1=flag_from)
    generator = torch.Generator().manual_seed(3)
    probe = ProbeGate(
        (1, 2),
        "last",
        torch.zeros(2 * lm.hidden_size),
        torch.ones(2 * lm.hidden_size),
        torch.randn(2 * lm.hidden_size, generator=generator),
        0.0,
    )
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    p_gate = probe.probability(capture(lm, [layout.prompt_ids(q) for q in QUERIES], [-1], [1, 2]))
    threshold = float(p_gate.median())
    towards_from = (
        threshold  # rows the gate does not call benign go towards refusal, unless flagged
    )
    flagged_p = sorted(p for p, s1 in zip(p_gate.tolist(), p1, strict=True) if s1 >= flag_from)
    release_below = (flagged_p[0] + flagged_p[1]) / 2  # vetoes one of stage 1's flags
    gate = CombinedGate(
        probe,
        threshold,
        switch.settings.system_prompt,
        lm.fingerprint(),
        towards_threshold=towards_from,
        release_threshold=release_below,
    )
    gate.save(tmp_path / "gate")
    scans.save(tmp_path / "scans")
    switch.save(tmp_path / "switch")
    loaded = load_methods(lm, [tmp_path / "scans", tmp_path / "switch", tmp_path / "gate"])
    engine = Engine(lm, scans=loaded[0], safeswitch=loaded[1], combined_gate=loaded[2])
    M = "scans+safeswitch"
    config = GenerationConfig(max_new_tokens=TOKENS)
    expected = combined_generate(lm, switch, scans, QUERIES, config, gate=gate)
    assert [r.steered for r in expected] == (p_gate < threshold).tolist()
    assert {r.steered for r in expected} == {True, False}  # stage 1 alone would steer every row
    assert [r.towards for r in expected] == [
        p >= towards_from and r.decision.stage1 < switch.settings.threshold1
        for p, r in zip(p_gate.tolist(), expected, strict=True)
    ]
    assert any(r.towards for r in expected)
    assert sum(r.released for r in expected) == 1
    assert not any(r.decision.flagged for r in expected if r.released)
    with serving(engine, _settings(lm, default_method=M)) as (url, _, settings):
        client = _client(url)
        with ThreadPoolExecutor(len(QUERIES)) as pool:
            answers = list(pool.map(lambda q: _ask(client, settings.model_id, q), QUERIES))
    for want, answer in zip(expected, answers, strict=True):
        assert answer.choices[0].message.content == want.response
        assert answer.model_extra["safesteer"]["steered"] == want.steered
        assert answer.model_extra["safesteer"]["gate"] == pytest.approx(want.gate)
        assert answer.model_extra["safesteer"]["towards"] == want.towards
        assert answer.model_extra["safesteer"]["released"] == want.released
        assert answer.model_extra["safesteer"]["flagged"] == want.decision.flagged
    with pytest.raises(ArtifactError, match="combined gate works inside scans\\+safeswitch"):
        load_methods(lm, [tmp_path / "scans", tmp_path / "gate"])
    with pytest.raises(ValueError, match="needs both"):
        Engine(lm, scans=scans, combined_gate=gate)


def test_combined_method_needs_both_artifacts(
    lm: LoadedModel, scans: ScansArtifact, safeswitch: SafeSwitchArtifact
) -> None:
    assert "scans+safeswitch" not in Engine(lm, scans=scans, safeswitch=safeswitch).methods()
    with pytest.raises(ValueError, match="two-stage SafeSwitch"):
        default_method("scans+safeswitch", scans, safeswitch)  # direct mode cannot gate
    with pytest.raises(ValueError, match="pass --artifact twice"):
        default_method("scans+safeswitch", scans, None)
    assert default_method("scans+safeswitch", scans, random_switch(lm)) == "scans+safeswitch"


def test_streamed_chunks_join_to_the_non_streamed_text(
    server: tuple[str, Engine, ServeSettings],
) -> None:
    url, _engine, settings = server
    client = _client(url)
    for method in ("scans", "none", "safeswitch"):
        for query in QUERIES[:3]:
            plain = _ask(client, settings.model_id, query, method=method)
            stream = client.chat.completions.create(
                model=settings.model_id,
                messages=[{"role": "user", "content": query}],
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"safesteer": {"method": method}},
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == plain.choices[0].message.content
            finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            assert [c.choices[0].finish_reason for c in finals] == [plain.choices[0].finish_reason]
            assert finals[0].model_extra["safesteer"] == plain.model_extra["safesteer"]
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_requests_queued_together_share_one_batch(
    lm: LoadedModel, scans: ScansArtifact, safeswitch: SafeSwitchArtifact
) -> None:
    """A first request holds the worker; three requests of three methods queue meanwhile and then
    run as one batch: SCANS and none rows in one forward, SafeSwitch in its own."""
    hold, held = threading.Event(), threading.Event()

    def pause() -> None:
        if not hold.is_set():
            held.set()
            assert hold.wait(HANG_GUARD_S)

    engine = Engine(lm, scans=scans, safeswitch=safeswitch, step_hook=pause)
    with serving(engine, _settings(lm, default_method="scans")) as (url, _, settings):
        client = _client(url)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(_ask, client, settings.model_id, QUERIES[0])
            assert held.wait(HANG_GUARD_S)
            rest = [
                pool.submit(_ask, client, settings.model_id, QUERIES[i + 1], method=m)
                for i, m in enumerate(("scans", "none", "safeswitch"))
            ]
            _wait_for(lambda: engine.queued() == 3)
            hold.set()
            answers = [first.result(), *(f.result() for f in rest)]
    assert [a.model_extra["safesteer"]["method"] for a in answers] == [
        "scans",
        "scans",
        "none",
        "safeswitch",
    ]
    assert list(engine.batches)[-1] == (3, {"scans": 2, "safeswitch": 1})


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_row(lm: LoadedModel, scans: ScansArtifact) -> None:
    """The worker pauses after the first token; the client reads it and hangs up; the row is
    cancelled, stops at the next step, and the server goes on serving."""
    hold, held = threading.Event(), threading.Event()

    def pause() -> None:
        if not hold.is_set():
            held.set()
            assert hold.wait(HANG_GUARD_S)

    engine = Engine(lm, scans=scans, step_hook=pause)
    with serving(engine, _settings(lm)) as (url, _, settings):
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=HANG_GUARD_S)
        body = {
            "model": settings.model_id,
            "messages": [{"role": "user", "content": QUERIES[1]}],
            "max_tokens": 60,
            "stream": True,
        }
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode())
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the role chunk
        assert held.wait(HANG_GUARD_S)
        [job] = engine.active()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        _wait_for(job.cancelled.is_set)
        hold.set()
        _wait_for(lambda: not engine.active())
        assert job.finish_reason == "cancelled"
        assert len(job.token_ids) < 60
        answer = _ask(_client(url), settings.model_id, QUERIES[0])
        assert answer.choices[0].message.content


def test_api_key(lm: LoadedModel) -> None:
    engine = Engine(lm)
    with serving(engine, _settings(lm, api_key=KEY)) as (url, _, settings):
        assert _ask(_client(url, KEY), settings.model_id, QUERIES[1]).choices[0].message
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            _ask(_client(url, "not-the-key"), settings.model_id, QUERIES[1])
        body = {"model": settings.model_id, "messages": [{"role": "user", "content": "Hi"}]}
        status, data = _post(url, body)
        assert status == 401 and "Authorization: Bearer" in data["error"]["message"]
        status, _ = _post(url, body, {"Authorization": "Basic " + KEY})
        assert status == 401
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()


def test_none_without_artifact_is_plain_generation(lm: LoadedModel) -> None:
    engine = Engine(lm)
    with serving(engine, _settings(lm)) as (url, _, settings):
        client = _client(url)
        with ThreadPoolExecutor(len(QUERIES)) as pool:
            answers = list(pool.map(lambda q: _ask(client, settings.model_id, q), QUERIES))
            # a system prompt that every row shares: prefilled once per batch (share_prefix)
            system = "You are a careful assistant who answers every question about the sea."
            with_system = list(
                pool.map(
                    lambda q: client.chat.completions.create(
                        model=settings.model_id,
                        messages=[
                            {"role": "system", "content": system},
                            {"role": "user", "content": q},
                        ],
                        max_tokens=TOKENS,
                    ),
                    QUERIES,
                )
            )
        status, data = _post(
            url,
            {
                "model": settings.model_id,
                "messages": [{"role": "user", "content": "Hi"}],
                "safesteer": {"method": "scans"},
            },
        )
    layout = ChatLayout(lm.tokenizer)
    want = decode_texts(
        lm, generate_ids(lm, [layout.prompt_ids(q) for q in QUERIES], GenerationConfig(TOKENS))
    )
    assert [a.choices[0].message.content for a in answers] == want
    assert all(a.model_extra["safesteer"] == {"method": "none"} for a in answers)
    shared = ChatLayout(lm.tokenizer, system)
    want = decode_texts(
        lm, generate_ids(lm, [shared.prompt_ids(q) for q in QUERIES], GenerationConfig(TOKENS))
    )
    assert [a.choices[0].message.content for a in with_system] == want
    assert status == 400 and "--artifact" in data["error"]["message"]


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("bad JSON", b'{"model": "tiny-llama", "messages": [', "not valid JSON"),
    ("not an object", b"[1, 2]", "valid dictionary"),
    ("no messages", {"messages": []}, "at least 1 item"),
    ("messages missing", {"messages": None}, "messages"),
    ("empty content", {"messages": [{"role": "user", "content": "  "}]}, "every message is empty"),
    ("bad role", {"messages": [{"role": "robot", "content": "Hi"}]}, "role"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens: Input should be greater than 0"),
    ("max_tokens negative", {"max_tokens": -5}, "greater than 0"),
    ("max_tokens over the limit", {"max_tokens": 65}, "over this server's limit of 64"),
    ("unknown method", {"safesteer": {"method": "magic"}}, "safesteer.method"),
    ("unknown safesteer field", {"safesteer": {"beta": 1}}, "unsupported parameter"),
    ("NaN alpha", b"NaN-ALPHA", "finite number"),
    ("negative alpha", {"safesteer": {"method": "scans", "alpha": -1}}, "greater than or equal"),
    ("alpha for safeswitch", {"safesteer": {"method": "safeswitch", "alpha": 1}}, "takes none"),
    ("unsupported parameter", {"frequency_penalty": 0.5}, "unsupported parameter"),
    ("tools", {"tools": [{"type": "function"}]}, "unsupported parameter 'tools'"),
    ("sampling", {"temperature": 0.7}, "decodes greedily"),
    ("two choices", {"n": 2}, "one choice"),
    ("overlong message", {"messages": [{"role": "user", "content": "sea " * 300}]}, "context"),
    ("huge message", {"messages": [{"role": "user", "content": "x" * 20000}]}, "far over"),
    ("prompt + max_tokens over context", {"max_tokens": 64, "messages": [
        {"role": "user", "content": "sea " * 180}]}, "over the model's context of 256"),
    ("assistant last", {"messages": [{"role": "assistant", "content": "Hi"}]}, "assistant"),
    ("wrong model", {"model": "gpt-4"}, "not served here"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "change", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_a_clear_4xx(
    server: tuple[str, Engine, ServeSettings], what: str, change: Any, message: str
) -> None:
    url, _engine, settings = server
    body: Any
    if change == b"NaN-ALPHA":
        body = (
            b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
            b'"safesteer": {"method": "scans", "alpha": NaN}}' % settings.model_id.encode()
        )
    elif isinstance(change, bytes):
        body = change
    else:
        body = {
            "model": settings.model_id,
            "messages": [{"role": "user", "content": "Hi"}],
            **change,
        }
    status, data = _post(url, body)
    assert 400 <= status < 500, (what, status, data)
    assert message in data["error"]["message"], (what, data)
    assert "Traceback" not in data["error"]["message"]


def test_bad_request_through_the_client_then_the_server_still_serves(
    server: tuple[str, Engine, ServeSettings],
) -> None:
    url, _engine, settings = server
    client = _client(url)
    # (the client itself refuses to send NaN; raw HTTP sends it above)
    with pytest.raises(openai.BadRequestError, match=r"safesteer\.method"):
        _ask(client, settings.model_id, "Hi", method="steer-harder")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=settings.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=0
        )
    assert _ask(client, settings.model_id, QUERIES[0]).choices[0].message.content is not None


def test_the_llm_judge_runs_against_the_server(
    server: tuple[str, Engine, ServeSettings],
) -> None:
    """`safesteer eval --judge llm --judge-url` against `safesteer serve`: the judge's request
    (temperature 0, max_tokens 8) is accepted and answered. A short template: the default one
    is longer than the tiny model's 256-token context (the server says so with a 400)."""
    from safesteer.evaluation.judges.llm import JudgeRequestError, LLMJudge

    url, _engine, settings = server
    with pytest.raises(JudgeRequestError, match="over the model's context of 256"):
        LLMJudge(base_url=f"{url}/v1", model=settings.model_id, retries=0).complete("Hi", "Hi")
    template = "Q: {question}\nA: {answer}\nDoes A comply? Answer 1 or 0."
    judge = LLMJudge(base_url=f"{url}/v1", model=settings.model_id, retries=0, template=template)
    text = judge.complete(HARMFUL[0], "I cannot help with that request, sorry.")
    assert isinstance(text, str)
    assert judge.judge(BENIGN[0], "Paris is the capital of France.") in (True, False, None)


def test_eval_judges_a_batch_concurrently_through_the_server(
    server: tuple[str, Engine, ServeSettings],
    lm: LoadedModel,
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`safesteer eval --judge llm --judge-workers 4`: each batch's rows are judged by concurrent
    requests (which the server batches); the verdicts are the one-at-a-time judge's, in order."""
    from safesteer.evaluation.eval_options import EvalOptions
    from safesteer.evaluation.evaluate import evaluate
    from safesteer.evaluation.judges.llm import LLMJudge

    url, engine, settings = server
    monkeypatch.setenv("SAFESTEER_DATA_DIR", str(shared_data))
    template = tmp_path / "judge.txt"
    template.write_text("Q: {question}\nA: {answer}\nDoes A comply? Answer 1 or 0.")
    options = EvalOptions(
        suite="xstest",
        methods=["default"],
        judges=["strict", "llm"],
        limit=3,
        max_new_tokens=4,
        output_dir=str(tmp_path / "run"),
        bootstrap=20,
        judge_url=f"{url}/v1",
        judge_model=settings.model_id,
        judge_template=str(template),
        judge_workers=4,
    )
    before = len(engine.batches)
    evaluate(options, lm=lm)
    rows = [json.loads(line) for line in (tmp_path / "run" / "responses.jsonl").open()]
    assert len(rows) == 6
    one_by_one = LLMJudge(
        base_url=f"{url}/v1", model=settings.model_id, template=template.read_text()
    )
    for row in rows:
        assert row["judges"]["llm"] == one_by_one.judge(row["prompt"], row["response"])
    # 6 rows judged 4 at a time: some judge batch on the server held more than one request
    assert max(size for size, _ in list(engine.batches)[before:]) > 1
