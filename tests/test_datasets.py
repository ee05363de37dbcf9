"""Tests for safesteer.datasets: registry, loaders, anchors, sampling, download and CLI."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from safesteer.cli.datasets import datasets_app
from safesteer.datasets import (
    BUNDLED_DIR,
    DATA_DIR_ENV,
    REGISTRY,
    DatasetError,
    Prompt,
    dataset_path,
    dataset_status,
    download,
    draw_anchors,
    load_prompt_file,
    load_test_set,
    resolve_data_dir,
    sha256_file,
    stratified_sample,
    verify,
)
from safesteer.datasets import registry as registry_module


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder next to the repository, or skip."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "MANIFEST.md").is_file():
        pytest.skip(f"shared data folder not found at {root}")
    return root


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _counts(prompts: list[Prompt]) -> Counter[str]:
    return Counter(p.label for p in prompts)


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_has_every_manifest_set() -> None:
    expected = {
        "advbench",
        "truthfulqa",
        "xstest",
        "xstest-current",
        "oktest",
        "harmfulq",
        "malicious",
        "heldout-harmless",
        "repe",
        "sorry-bench-train",
        "sorry-bench-eval",
        "trustllm-misuse-train",
        "trustllm-misuse-eval",
        "trustllm-jailbreak-train",
        "trustllm-jailbreak-eval",
        "trustllm-exaggerated-safety",
        "alpaca-eval",
        "trivia-qa",
        "judge-prompts",
        "mmlu",
        "xsum",
        "wikitext2",
    }
    assert expected <= set(REGISTRY)
    bundled = {name for name, spec in REGISTRY.items() if spec.bundled}
    assert bundled == {"advbench", "truthfulqa", "xstest", "xstest-current", "harmfulq"}
    for spec in REGISTRY.values():
        assert len(spec.sha256) == len(spec.files)
        assert all(len(h) == 64 for h in spec.sha256)
        assert spec.upstream_urls


def test_registry_matches_shared_sha256sums(data_dir: Path) -> None:
    sums = {}
    for line in (data_dir / "sha256sums.txt").read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.strip()] = digest
    for spec in REGISTRY.values():
        for rel, digest in zip(spec.files, spec.sha256, strict=True):
            assert sums[rel] == digest, rel
    assert len(REGISTRY["mmlu"].files) == 114


def test_bundled_copies_match_shared_files(data_dir: Path) -> None:
    for spec in REGISTRY.values():
        if not spec.bundled:
            continue
        for rel, digest in zip(spec.files, spec.sha256, strict=True):
            bundled = BUNDLED_DIR / rel
            assert sha256_file(bundled) == sha256_file(data_dir / rel) == digest
        assert list((BUNDLED_DIR / spec.files[0]).parent.glob("LICENSE.*.txt"))
        assert verify(spec.name)  # bundled, no data dir


def test_non_permissive_sets_are_not_bundled() -> None:
    shipped = {p.relative_to(BUNDLED_DIR).parts[0] for p in BUNDLED_DIR.rglob("*") if p.is_file()}
    # validation/ holds prompts written for safesteer itself (Apache-2.0 like the project).
    assert shipped <= {"advbench", "truthfulqa", "xstest", "harmfulq", "validation", "README.md"}


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir() is None
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")


def test_dataset_path_prefers_data_dir_then_bundled(data_dir: Path, tmp_path: Path) -> None:
    assert dataset_path("advbench") == [BUNDLED_DIR / "advbench/AdvBench.csv"]
    assert dataset_path("advbench", data_dir) == [data_dir / "advbench/AdvBench.csv"]
    assert dataset_path("advbench", tmp_path) == [BUNDLED_DIR / "advbench/AdvBench.csv"]
    assert dataset_path("oktest", data_dir) == [data_dir / "oktest/OKTest.csv"]


def test_missing_non_bundled_set_has_helpful_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        dataset_path("oktest")
    message = str(info.value)
    for needle in (
        "oktest",
        "oktest/OKTest.csv",
        "--data-dir",
        DATA_DIR_ENV,
        "safesteer datasets download oktest",
        "https://raw.githubusercontent.com/zouyingcao/SCANS/",
        "no data folder is set",
    ):
        assert needle in message
    with pytest.raises(DatasetError, match="does not hold it"):
        load_test_set("malicious", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        dataset_path("repe", tmp_path / "nope")


def test_unknown_dataset_name() -> None:
    with pytest.raises(DatasetError, match="Known datasets"):
        dataset_path("no-such-set")


def test_verify_detects_a_changed_file(tmp_path: Path, data_dir: Path) -> None:
    target = tmp_path / "oktest" / "OKTest.csv"
    target.parent.mkdir(parents=True)
    target.write_bytes((data_dir / "oktest/OKTest.csv").read_bytes())
    assert verify("oktest", tmp_path)
    target.write_bytes(target.read_bytes() + b"\n")
    assert not verify("oktest", tmp_path)


def test_dataset_status(data_dir: Path) -> None:
    without = {row["name"]: row for row in dataset_status()}
    assert without["advbench"]["available"] and without["advbench"]["where"] == "bundled"
    assert not without["oktest"]["available"] and without["oktest"]["where"] == "missing"
    assert without["truthfulqa"]["rows"] == 817
    with_dir = {row["name"]: row for row in dataset_status(data_dir)}
    assert all(row["available"] for row in with_dir.values())
    assert with_dir["oktest"]["where"] == str(data_dir)
    assert set(with_dir["mmlu"]) == {"name", "rows", "licence", "bundled", "available", "where"}


# ---------------------------------------------------------------------------------------------
# Download


class _FakeResponse(io.BytesIO):
    pass


def test_download_rejects_wrong_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_urlopen(url: str, timeout: float = 0) -> _FakeResponse:
        return _FakeResponse(b"not the real file")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DatasetError) as info:
        download("malicious", tmp_path)
    message = str(info.value)
    assert "Checksum mismatch" in message
    assert REGISTRY["malicious"].sha256[0] in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_download_writes_verified_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path
) -> None:
    spec = REGISTRY["repe"]
    by_url = {
        url: (data_dir / rel).read_bytes()
        for rel, url in zip(spec.files, spec.upstream_urls, strict=True)
    }

    def fake_urlopen(url: str, timeout: float = 0) -> _FakeResponse:
        return _FakeResponse(by_url[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    paths = download("repe", tmp_path / "dest")
    assert paths == [tmp_path / "dest" / rel for rel in spec.files]
    assert verify("repe", tmp_path / "dest")
    assert not list((tmp_path / "dest").rglob("*.part"))


def test_download_network_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_urlopen(url: str, timeout: float = 0) -> Any:
        raise urllib.error.URLError("unreachable host")

    monkeypatch.setattr(urllib.request, "urlopen", failing_urlopen)
    with pytest.raises(DatasetError) as info:
        download("oktest", tmp_path)
    assert "Could not download" in str(info.value)
    assert "--data-dir" in str(info.value)
    assert not list(tmp_path.rglob("*"))


def test_download_archive_sets_need_manual_steps(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot be downloaded file by file"):
        download("mmlu", tmp_path)


# ---------------------------------------------------------------------------------------------
# Test sets


def test_label_counts(data_dir: Path) -> None:
    xstest = load_test_set("xstest")
    assert _counts(xstest) == {"safe": 250, "unsafe": 200}
    assert Counter(p.subset for p in xstest) == {"xstest-safe": 250, "xstest-unsafe": 200}
    assert _counts(load_test_set("xstest-current")) == {"safe": 250, "unsafe": 200}
    oktest = load_test_set("oktest", data_dir=data_dir)
    assert _counts(oktest) == {"safe": 300}
    assert not any(p.text.endswith("\n") for p in oktest)
    repe = load_test_set("repe", data_dir=data_dir)
    assert Counter((p.subset, p.label) for p in repe) == {
        ("repe-safe", "safe"): 384,
        ("repe-unsafe", "unsafe"): 384,
    }
    assert _counts(load_test_set("malicious", data_dir=data_dir)) == {"unsafe": 100}
    assert _counts(load_test_set("harmfulq")) == {"unsafe": 200}
    assert _counts(load_test_set("heldout", data_dir=data_dir)) == {"safe": 100}
    assert _counts(load_test_set("advbench")) == {"unsafe": 520}
    assert _counts(load_test_set("truthfulqa")) == {"safe": 817}


def test_repe_uses_label_not_order(data_dir: Path) -> None:
    advbench = {p.text for p in load_test_set("advbench")}
    repe = load_test_set("repe", data_dir=data_dir)
    unsafe = [p.text for p in repe if p.label == "unsafe"]
    assert all(text in advbench for text in unsafe)
    assert not any(p.text in advbench for p in repe if p.label == "safe")


def test_safeswitch_sets(data_dir: Path) -> None:
    assert _counts(load_test_set("sorry-bench-eval", data_dir=data_dir)) == {"unsafe": 900}
    over = load_test_set("trustllm-exaggerated-safety", data_dir=data_dir)
    assert _counts(over) == {"safe": 200}
    trivia = load_test_set("trivia-qa", data_dir=data_dir)
    assert len(trivia) == 2000 and isinstance(trivia[0].meta["answer"], list)


def test_sorry_eval_gets_category_and_style_from_the_full_file(
    data_dir: Path, tmp_path: Path
) -> None:
    sorry = load_test_set("sorry-bench-eval", data_dir=data_dir)
    assert Counter(p.meta["category"] for p in sorry) == {str(c): 20 for c in range(1, 46)}
    assert Counter(p.meta["prompt_style"] for p in sorry)["slang"] == 90
    # without the full SORRY-Bench file the rows load as before, without the fields
    (tmp_path / "safeswitch").mkdir()
    rel = "safeswitch/sorry-bench-eval.jsonl"
    (tmp_path / rel).write_bytes((data_dir / rel).read_bytes())
    bare = load_test_set("sorry-bench-eval", data_dir=tmp_path)
    assert [p.text for p in bare] == [p.text for p in sorry]
    assert "category" not in bare[0].meta


def test_default_set_excludes_anchors() -> None:
    anchors = draw_anchors(64, seed=0)
    assert len(anchors.harmful) == len(set(anchors.harmful)) == 64
    assert len(anchors.benign) == len(set(anchors.benign)) == 64
    prompts = load_test_set("default", exclude=anchors.harmful + anchors.benign)
    assert Counter((p.subset, p.label) for p in prompts) == {
        ("advbench", "unsafe"): 456,
        ("truthfulqa", "safe"): 753,
    }
    texts = {p.text for p in prompts}
    assert not texts & set(anchors.texts())
    # exclusion compares stripped texts
    padded = load_test_set("advbench", exclude=[f"  {t}\n" for t in anchors.harmful])
    assert len(padded) == 456


def test_anchors_are_deterministic() -> None:
    first, again, other = draw_anchors(64, 0), draw_anchors(64, 0), draw_anchors(64, 1)
    assert first == again
    assert first.hashes() == again.hashes()
    assert first.harmful != other.harmful and first.benign != other.benign
    hashes = first.hashes()
    assert set(hashes) == {"harmful", "benign"}
    assert len(hashes["harmful"]) == 64 and all(len(h) == 64 for h in hashes["benign"])
    with pytest.raises(DatasetError, match="out of range"):
        draw_anchors(10_000, 0)


def test_repe_unsafe_loses_anchor_goals(data_dir: Path) -> None:
    anchors = draw_anchors(64, seed=0)
    full = load_test_set("repe", data_dir=data_dir)
    cut = load_test_set("repe", exclude=anchors.texts(), data_dir=data_dir)
    leaked = {p.text for p in full if p.label == "unsafe"} & set(anchors.harmful)
    assert leaked  # RepE's harmful half is made of AdvBench goals
    assert _counts(cut) == {"safe": 384, "unsafe": 384 - len(leaked)}


def test_scans_paper_set(data_dir: Path) -> None:
    full = load_test_set("scans-paper", data_dir=data_dir)
    assert len(full) == 450 + 768 + 300 + 817 + 520 + 100
    subsets = {p.subset for p in full}
    assert subsets == {
        "xstest-safe",
        "xstest-unsafe",
        "repe-safe",
        "repe-unsafe",
        "oktest",
        "truthfulqa",
        "advbench",
        "malicious",
    }
    anchors = draw_anchors(64, seed=3)
    cut = load_test_set("scans-paper", exclude=anchors.texts(), data_dir=data_dir)
    assert sum(p.subset == "advbench" for p in cut) == 456
    assert sum(p.subset == "truthfulqa" for p in cut) == 753


def test_comma_separated_names_and_paths(tmp_path: Path) -> None:
    extra = tmp_path / "mine.txt"
    extra.write_text("first prompt\n\nsecond prompt\n")
    prompts = load_test_set(f"harmfulq, {extra}", default_label="safe")
    assert len(prompts) == 202
    assert Counter(p.subset for p in prompts) == {"harmfulq": 200, "mine": 2}
    with pytest.raises(DatasetError, match="Known names"):
        load_test_set("not-a-set")


# ---------------------------------------------------------------------------------------------
# User prompt files


def test_csv_with_label_words_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    pd.DataFrame(
        {
            "prompt": ["a", "b", "c", "d", "e", "f"],
            "label": ["unsafe", "Harmful", "safe", "benign", "1", "0"],
            "extra": ["x"] * 6,
        }
    ).to_csv(path, index=False)
    prompts = load_prompt_file(path)
    assert [p.label for p in prompts] == ["unsafe", "unsafe", "safe", "safe", "unsafe", "safe"]
    assert prompts[0].subset == "mine"
    assert prompts[0].meta["extra"] == "x"


def test_csv_xstest_type_rule(tmp_path: Path) -> None:
    path = tmp_path / "xs.csv"
    pd.DataFrame(
        {"prompt": ["a", "b"], "type": ["homonyms", "contrast_homonyms"]},
    ).to_csv(path, index=False)
    assert [p.label for p in load_prompt_file(path)] == ["safe", "unsafe"]


def test_unrelated_type_column_is_not_a_label(tmp_path: Path) -> None:
    path = tmp_path / "typed.csv"
    pd.DataFrame({"question": ["a"], "type": ["Adversarial"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match="no label column"):
        load_prompt_file(path)
    assert load_prompt_file(path, default_label="safe")[0].label == "safe"


def test_json_list_of_strings_and_objects(tmp_path: Path) -> None:
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["one", "two"]))
    with pytest.raises(DatasetError, match="default_label"):
        load_prompt_file(strings)
    assert [p.label for p in load_prompt_file(strings, default_label="unsafe")] == [
        "unsafe",
        "unsafe",
    ]
    objects = tmp_path / "objects.json"
    objects.write_text(
        json.dumps(
            [
                {"instruction": "x", "is_harmful": True},
                {"instruction": "y", "is_harmful": False},
                {"instruction": "z", "is_harmful": None},
            ]
        )
    )
    prompts = load_prompt_file(objects, default_label="safe")
    assert [(p.text, p.label) for p in prompts] == [("x", "unsafe"), ("y", "safe"), ("z", "safe")]
    with pytest.raises(DatasetError, match="row 3"):
        load_prompt_file(objects)


def test_jsonl_with_turns_and_bool_label(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"turns": ["hello there", "ignored"], "label": True},
        {"turns": ["how are you"], "label": False},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompt_file(path)
    assert [(p.text, p.label) for p in prompts] == [
        ("hello there", "unsafe"),
        ("how are you", "safe"),
    ]


def test_harmless_flag_column(tmp_path: Path) -> None:
    path = tmp_path / "flags.jsonl"
    path.write_text(json.dumps({"text": "q", "harmless": 1}) + "\n")
    assert load_prompt_file(path)[0].label == "safe"


def test_parquet_and_repe_layout(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "plain.parquet"
    pd.DataFrame({"goal": ["g1", "g2"], "harmful": [True, False]}).to_parquet(path)
    assert [(p.text, p.label) for p in load_prompt_file(path)] == [
        ("g1", "unsafe"),
        ("g2", "safe"),
    ]
    repe_file = data_dir / REGISTRY["repe"].files[0]
    prompts = load_prompt_file(repe_file)
    assert _counts(prompts) == {"safe": 384, "unsafe": 384}


def test_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("  first  \n\n\nsecond\n")
    prompts = load_prompt_file(path, default_label="safe")
    assert [p.text for p in prompts] == ["first", "second"]
    with pytest.raises(DatasetError, match="no label column"):
        load_prompt_file(path)


def test_bad_extension(tmp_path: Path) -> None:
    path = tmp_path / "prompts.xlsx"
    path.write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load_prompt_file(path)
    assert "'.xlsx'" in str(info.value) and ".jsonl" in str(info.value)


def test_no_text_column(tmp_path: Path) -> None:
    path = tmp_path / "wrong.csv"
    pd.DataFrame({"query": ["a"], "label": ["safe"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "no text column" in message and "'query'" in message and "prompt" in message


def test_bad_label_value(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": ["a", "b"], "label": ["safe", "maybe"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "row 2" in message and "'maybe'" in message and "unsafe/harmful" in message
    assert str(path) in message


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_prompt_file(broken)
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompt_file(tmp_path / "absent.csv")
    with pytest.raises(DatasetError, match="default_label"):
        load_prompt_file(broken, default_label="maybe")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Sampling


def _population() -> list[Prompt]:
    prompts = [Prompt(f"a{i}", "unsafe", "adv") for i in range(60)]
    prompts += [Prompt(f"t{i}", "safe", "tqa") for i in range(30)]
    prompts += [Prompt(f"x{i}", "safe", "xs") for i in range(9)]
    prompts += [Prompt("rare", "unsafe", "xs")]
    return prompts


def test_stratified_sample_keeps_proportions() -> None:
    population = _population()
    sample = stratified_sample(population, 20, seed=7)
    assert len(sample) == 20
    groups = Counter((p.subset, p.label) for p in sample)
    assert groups == {
        ("adv", "unsafe"): 12,
        ("tqa", "safe"): 6,
        ("xs", "safe"): 1,
        ("xs", "unsafe"): 1,
    }
    positions = [population.index(p) for p in sample]
    assert positions == sorted(positions)


def test_stratified_sample_is_deterministic() -> None:
    population = _population()
    assert stratified_sample(population, 25, 1) == stratified_sample(population, 25, 1)
    assert stratified_sample(population, 25, 1) != stratified_sample(population, 25, 2)
    assert stratified_sample(population, None, 1) == population
    assert stratified_sample(population, 1000, 1) == population
    assert stratified_sample(population, 0, 1) == []
    small = stratified_sample(population, 3, 0)
    assert len(small) == 3


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_list_verify_download(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    listed = runner.invoke(datasets_app, ["list", "--data-dir", str(data_dir)])
    assert listed.exit_code == 0, listed.output
    assert "advbench" in listed.output and "wikitext2" in listed.output
    ok = runner.invoke(datasets_app, ["verify", "oktest", "--data-dir", str(data_dir)])
    assert ok.exit_code == 0 and "OK" in ok.output
    missing = runner.invoke(datasets_app, ["verify", "oktest", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 1
    monkeypatch.setattr(registry_module, "_DOWNLOAD_TIMEOUT_S", 0.01)

    def failing_urlopen(url: str, timeout: float = 0) -> Any:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", failing_urlopen)
    failed = runner.invoke(datasets_app, ["download", "oktest", "--dest", str(tmp_path)])
    assert failed.exit_code == 1
