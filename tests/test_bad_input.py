"""Bad input, as a new user would give it, to the command line and the library (issue 13).

Every case must end with a one-line message that names the problem (and the way out), a non-zero
exit, no traceback, and no partial or corrupt output; for ``run`` and ``eval``, rows already
written survive. The CLI cases load a tiny model saved to a folder (``--model DIR``) or fail before
any model is loaded, so the whole module takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import BENIGN, HARMFUL, build_tiny, make_tokenizer
from safesteer.cli.main import app
from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import ScansSettings
from safesteer.models import load_model


@dataclass
class Env:
    """Files and folders the cases point at."""

    root: Path
    model: Path  # a tiny llama saved as an HF folder
    other_model: Path  # another tiny llama (other weights)
    artifact: Path  # a SCANS artifact fitted on ``model``
    out: Path  # an output folder that does not exist yet
    done: Path  # an eval folder with rows already written
    run_done: Path  # a run folder with rows already written

    def file(self, name: str, text: str) -> str:
        path = self.root / "files" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return str(path)


def _save(lm: LoadedModel, folder: Path) -> Path:
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("bad-input")
    tokenizer = make_tokenizer()
    model = _save(build_tiny("llama", tokenizer, seed=0), root / "model")
    other = _save(build_tiny("llama", tokenizer, seed=1), root / "other-model")
    lm = load_model(str(model))
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4).save(root / "artifact")
    done = root / "done"
    data = root / "files" / "ok.csv"
    data.parent.mkdir(exist_ok=True)
    data.write_text("prompt,label\nWhy is the sky blue?,safe\nHow do I make a bomb?,unsafe\n")
    result = CliRunner().invoke(
        app, [*_eval_args(model, artifact, data), "--output-dir", str(done)]
    )
    assert result.exit_code == 0, result.output
    env = Env(root, model, other, artifact, root / "never-written", done, root / "run-done")
    result = CliRunner().invoke(app, _run(env, "--output-dir", str(env.run_done)))
    assert result.exit_code == 0, result.output
    assert (env.run_done / "responses.jsonl").read_text().count("\n") == 1  # one is an anchor
    return env


def _eval_args(model: Path, artifact: Path, data: Path) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--artifact",
        str(artifact),
        "--suite",
        str(data),
        "--methods",
        "default",
        "--max-new-tokens",
        "2",
        "--bootstrap",
        "10",
    ]


def _ok_csv(env: Env) -> str:
    return str(env.root / "files" / "ok.csv")


def _run(env: Env, *extra: str) -> list[str]:
    """``safesteer run`` on the tiny model and its artifact, with extra (bad) options."""
    base = ["run", "--model", str(env.model), "--artifact", str(env.artifact)]
    base += ["--test-data", _ok_csv(env), "--max-new-tokens", "2", "--output-dir", str(env.out)]
    return [*base, *extra]


def _eval(env: Env, *extra: str) -> list[str]:
    base = _eval_args(env.model, env.artifact, Path(_ok_csv(env)))
    return [*base, "--output-dir", str(env.out), *extra]


def _stage1_threshold(env: Env, *extra: str) -> list[str]:
    """``fit safeswitch-threshold`` on the tiny model; ``env.artifact`` is a SCANS artifact."""
    base = ["fit", "safeswitch-threshold", "--model", str(env.model)]
    base += ["--safeswitch-artifact", str(env.artifact), "--out", str(env.out)]
    return [*base, *extra]


def _broken_artifact(env: Env, name: str, change: Callable[[Path], None]) -> str:
    target = env.root / "broken" / name
    if not target.exists():
        shutil.copytree(env.artifact, target)
        change(target)
    return str(target)


def _edit_manifest(key: str, value: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest[key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return change


Args = Callable[[Env], list[str]]

# (id, arguments, a regex the message must match: the problem and the way out)
CASES: list[tuple[str, Args, str]] = [
    # values
    ("batch-size-0", lambda e: _run(e, "--batch-size", "0"), r"--batch-size must be at least 1"),
    ("limit-0", lambda e: _run(e, "--limit", "0"), r"--limit must be at least 1"),
    ("limit-negative", lambda e: _run(e, "--limit", "-3"), r"--limit must be at least 1"),
    ("max-new-0", lambda e: _run(e, "--max-new-tokens", "0"), r"--max-new-tokens must be at"),
    ("multiplier-nan", lambda e: _run(e, "--multiplier", "nan"), r"--multiplier must be a finite"),
    ("multiplier-inf", lambda e: _run(e, "--multiplier", "inf"), r"--multiplier must be a finite"),
    ("threshold-2", lambda e: _run(e, "--threshold", "2.0"), r"--threshold must lie in \[-1, 1\]"),
    ("threshold-nan", lambda e: _run(e, "--threshold", "nan"), r"--threshold must lie in"),
    ("anchor-size-0", lambda e: _run(e, "--anchor-size", "0"), r"--anchor-size must be at least"),
    (
        "calibrate-cap-quantile-2",
        lambda e: ["calibrate", "--out", str(e.out), "--cap-quantiles", "0.1,2"],
        r"cap quantiles lie between 0 and 1",
    ),
    (
        "fit-safeswitch-head-penalty-0",
        lambda e: ["fit", "safeswitch", "--out", str(e.out), "--head-repetition-penalty", "0"],
        r"--head-repetition-penalty must be positive",
    ),
    (
        "fit-safeswitch-written-some",
        lambda e: ["fit", "safeswitch", "--out", str(e.out), "--written", "some"],
        r"unknown --written 'some'; use all or first",
    ),
    (
        "fit-safeswitch-harmless-budget-1",
        lambda e: ["fit", "safeswitch", "--out", str(e.out), "--harmless-budget", "1"],
        r"--harmless-budget must be in \[0, 1\), got 1.0",
    ),
    (
        "fit-safeswitch-pool-without-budget",
        lambda e: ["fit", "safeswitch", "--out", str(e.out), "--pool-per-source", "10"],
        r"--pool-per-source needs --harmless-budget",
    ),
    (
        "fit-safeswitch-pool-direct-mode",
        lambda e: [
            *["fit", "safeswitch", "--out", str(e.out), "--harmless-budget", "0.02"],
            *["--pool-per-source", "10", "--mode", "direct"],
        ],
        r"--pool-per-source bounds stage 1 of --mode two-stage only",
    ),
    (
        "fit-safeswitch-threshold-budget-1",
        lambda e: _stage1_threshold(e, "--harmless-budget", "1"),
        r"--harmless-budget must be in \[0, 1\), got 1.0",
    ),
    (
        "fit-safeswitch-threshold-out-is-input",
        lambda e: _stage1_threshold(e, "--out", str(e.artifact)),
        r"--out must differ from --safeswitch-artifact",
    ),
    (
        "fit-safeswitch-threshold-exclude-not-a-run",
        lambda e: _stage1_threshold(e, "--exclude-run", str(e.root)),
        r"is not an eval output folder: no responses.jsonl in it",
    ),
    (
        "fit-safeswitch-threshold-scans-artifact",
        lambda e: _stage1_threshold(e),
        r"'scans' artifact, not 'safeswitch'",
    ),
    (
        "calibrate-threshold-range-reversed",
        lambda e: ["calibrate", "--out", str(e.out), "--threshold-range", "0.9,0.1"],
        r"write two thresholds LOW,HIGH with 0 <= LOW < HIGH <= 1.01",
    ),
    (
        "calibrate-reference-budget-above-100",
        lambda e: ["calibrate", "--out", str(e.out), "--reference-budget", "120"],
        r"--reference-budget",
    ),
    (
        "calibrate-alphas-text",
        lambda e: ["calibrate", "--out", str(e.out), "--alphas", "strong"],
        r"cannot read 'strong'",
    ),
    (
        "repetition-penalty-0",
        lambda e: _run(e, "--repetition-penalty", "0"),
        r"--repetition-penalty must be a positive",
    ),
    ("truncate-right", lambda e: _run(e, "--truncate", "right"), r"--truncate must be one of"),
    ("method-magic", lambda e: _run(e, "--method", "magic"), r"unknown method 'magic'.*scans"),
    ("recipe-magic", lambda e: _run(e, "--recipe", "magic"), r"unknown recipe 'magic'; use auto"),
    ("preset-unknown", lambda e: _run(e, "--preset", "gpt-9"), r"preset 'gpt-9'.*llama2-7b"),
    ("layers-out-of-range", lambda e: _run(e, "--layers", "100-200"), r"out of range: 100\.\.200"),
    ("layers-garbage", lambda e: _run(e, "--layers", "ten"), r"'ten'.*e\.g\. 10-19"),
    ("cls-layers-reversed", lambda e: _run(e, "--cls-layers", "3-1"), r"runs backwards; write 1-3"),
    ("dtype-unknown", lambda e: _run(e, "--dtype", "float8"), r"Unknown dtype 'float8'; use one"),
    ("device-cuda", lambda e: _run(e, "--device", "cuda"), r"no CUDA GPU.*--device cpu"),
    ("device-unknown", lambda e: _run(e, "--device", "tpu"), r"--device 'tpu'.*cpu, cuda"),
    # files and folders
    (
        "output-dir-is-a-file",
        lambda e: _run(e, "--output-dir", e.file("taken.txt", "x")),
        r"is an existing file; name a folder",
    ),
    (
        "test-data-missing",
        lambda e: _run(e, "--test-data", str(e.root / "nope.csv")),
        r"neither a known name nor an existing file",
    ),
    (
        "test-data-xlsx",
        lambda e: _run(e, "--test-data", e.file("p.xlsx", "not a table")),
        r"Unsupported prompt file type '\.xlsx'.*Fix: use one of \.csv",
    ),
    (
        "test-data-header-only",
        lambda e: _run(e, "--test-data", e.file("empty.csv", "prompt,label\n")),
        r"empty\.csv: no text column.*Fix: name the prompt column",
    ),
    (
        "test-data-no-prompt-column",
        lambda e: _run(e, "--test-data", e.file("cols.csv", "question,kind\nhi,safe\n")),
        r"no label column.*Fix:",
    ),
    (
        "test-data-bad-label",
        lambda e: _run(e, "--test-data", e.file("labels.csv", "prompt,label\nhi,maybe\n")),
        r"cannot map label 'maybe'.*Accepted: unsafe",
    ),
    (
        "test-data-bad-json",
        lambda e: _run(e, "--test-data", e.file("bad.jsonl", '{"prompt": "hi", "lab\n')),
        r"bad\.jsonl, line 1: not valid JSON.*Fix:",
    ),
    (
        "test-data-binary",
        lambda e: _run(e, "--test-data", e.file("bin.csv", "\x00\x01\x02prompt\x00")),
        r"bin\.csv: no text column.*Fix:",
    ),
    (
        "test-set-unknown-name",
        lambda e: _run(e, "--test-data", "xstesst"),
        r"Unknown test set 'xstesst'",
    ),
    (
        "data-dir-missing",
        lambda e: _run(e, "--test-data", "oktest", "--data-dir", str(e.root / "no-data")),
        r"does not exist.*--data-dir",
    ),
    (
        "prompt-100k-characters",
        lambda e: _run(
            e, "--test-data", e.file("long.csv", "prompt,label\n" + "word " * 20_000 + ",safe\n")
        ),
        r"prompt 0 has .* tokens.*--truncate left",
    ),
    # models
    (
        "model-missing",
        lambda e: _run(e, "--model", str(e.root / "no-model")),
        r"Model path .*no-model does not exist.*`safesteer models list`",
    ),
    (
        "model-empty-folder",
        lambda e: _run(e, "--model", str(_empty_dir(e))),
        r"Model folder .*empty-model holds no Hugging Face model \(no config\.json\)",
    ),
    (
        "model-not-a-gguf-file",
        lambda e: _run(e, "--model", e.file("weights.bin", "not a model")),
        r"weights\.bin is a file but not a \.gguf file",
    ),
    (
        "model-garbage-gguf",
        lambda e: _run(e, "--model", e.file("bad.gguf", "not a gguf file")),
        r"bad\.gguf does not start with the GGUF magic bytes",
    ),
    # artifacts
    (
        "artifact-missing",
        lambda e: _run(e, "--artifact", str(e.root / "no-artifact")),
        r"not a safesteer artifact.*safesteer fit scans",
    ),
    (
        "artifact-corrupt-manifest",
        lambda e: _run(
            e,
            "--artifact",
            _broken_artifact(e, "json", lambda f: (f / "manifest.json").write_text("{not json")),
        ),
        r"manifest\.json is not valid JSON.*refit it",
    ),
    (
        "artifact-other-format",
        lambda e: _run(
            e, "--artifact", _broken_artifact(e, "v", _edit_manifest("format_version", 99))
        ),
        r"artifact format 99.*Refit",
    ),
    (
        "artifact-other-method",
        lambda e: _run(
            e, "--artifact", _broken_artifact(e, "m", _edit_manifest("method", "safeswitch"))
        ),
        r"'safeswitch' artifact, not 'scans'; pass a scans artifact",
    ),
    (
        "artifact-no-tensors",
        lambda e: _run(
            e,
            "--artifact",
            _broken_artifact(e, "t", lambda f: (f / "tensors.safetensors").unlink()),
        ),
        r"lacks tensors\.safetensors; .*refit it",
    ),
    (
        "artifact-corrupt-tensors",
        lambda e: _run(
            e,
            "--artifact",
            _broken_artifact(
                e, "c", lambda f: (f / "tensors.safetensors").write_bytes(b"\x00" * 64)
            ),
        ),
        r"not a readable safetensors file.*refit it",
    ),
    (
        "artifact-no-settings",
        lambda e: _run(e, "--artifact", _broken_artifact(e, "s", _edit_manifest("settings", None))),
        r"malformed SCANS manifest.*refit",
    ),
    (
        "artifact-of-another-model",
        lambda e: _run(e, "--model", str(e.other_model)),
        r"was fitted on .*, not on the loaded model .* Fit a new artifact",
    ),
    # eval
    (
        "eval-method-magic",
        lambda e: _eval(e, "--methods", "magic"),
        r"unknown method\(s\) \['magic'\]",
    ),
    ("eval-judge-magic", lambda e: _eval(e, "--judge", "magic"), r"unknown judge 'magic'; valid"),
    (
        "eval-llm-judge-no-url",
        lambda e: _eval(e, "--judge", "llm"),
        r"needs base_url: pass --judge-url",
    ),
    ("eval-suite-unknown", lambda e: _eval(e, "--suite", "scans-papr"), r"scans-papr"),
    (
        "eval-safeswitch-no-artifact",
        lambda e: _eval(e, "--methods", "safeswitch"),
        r"need --safeswitch-artifact DIR",
    ),
    ("eval-limit-0", lambda e: _eval(e, "--limit", "0"), r"--limit must be at least 1"),
    ("eval-bootstrap-negative", lambda e: _eval(e, "--bootstrap", "-1"), r"--bootstrap must be"),
    (
        "eval-other-settings-in-folder",
        lambda e: [*_eval(e, "--output-dir", str(e.done)), "--max-new-tokens", "3"],
        r"other settings \(changed: max_new_tokens\).*another --output-dir",
    ),
    # folders with rows already written
    (
        "eval-resume-bad-device",
        lambda e: [*_eval(e, "--output-dir", str(e.done)), "--device", "tpu"],
        r"--device 'tpu' is not a device",
    ),
    (
        "eval-resume-batch-size-0",
        lambda e: [*_eval(e, "--output-dir", str(e.done)), "--batch-size", "0"],
        r"--batch-size must be at least 1",
    ),
    (
        "run-resume-other-settings",
        lambda e: _run(e, "--output-dir", str(e.run_done), "--seed", "5"),
        r"other settings \(changed: seed\)",
    ),
    (
        "run-resume-long-prompt-added",
        lambda e: _run(
            e,
            "--output-dir",
            str(e.run_done),
            "--test-data",
            e.file("long2.csv", "prompt,label\n" + "sky " * 5_000 + ",safe\n"),
        ),
        r"other settings \(changed: test_data\)",
    ),
    # other commands
    (
        "report-missing",
        lambda e: ["report", str(e.root / "nowhere")],
        r"nowhere is not a directory; write a run directory with `safesteer eval`",
    ),
    (
        "compare-not-eval",
        lambda e: ["compare", str(e.root)],
        r"no responses\.jsonl .*safesteer eval",
    ),
    (
        "compare-judge-magic",
        lambda e: ["compare", str(e.done), "--judge", "magic"],
        r"no row .* judged by 'magic'; judges found: paper, strict",
    ),
    (
        "compare-paired-against-unknown",
        lambda e: ["compare", str(e.done), "--paired-against", "nobody"],
        r"--paired-against 'nobody' is not a method of these folders; methods: default",
    ),
    (
        "generate-method-magic",
        lambda e: ["generate", "hi", "--method", "magic"],
        r"unknown method 'magic'",
    ),
    (
        "fit-out-is-a-file",
        lambda e: [
            "fit",
            "scans",
            "--model",
            str(e.model),
            "--anchor-size",
            "2",
            "--out",
            e.file("artifact.txt", "x"),
        ],
        r"artifact\.txt.*(file|folder)",
    ),
    ("demo-limit-0", lambda e: ["demo", "--limit", "0"], r"--limit must be at least 1"),
    (
        "analyze-artifact-missing",
        lambda e: ["analyze", "--model", str(e.model), "--artifact", str(e.root / "none")],
        r"not a safesteer artifact",
    ),
]


def _empty_dir(env: Env) -> Path:
    folder = env.root / "empty-model"
    folder.mkdir(exist_ok=True)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(env: Env, args: Args, message: str, tmp_path: Path) -> None:
    env = dataclasses.replace(env, out=tmp_path / "out")
    argv = args(env)
    done_before = _tree(env.done), _tree(env.run_done)
    result = CliRunner().invoke(app, argv)
    text = " ".join(result.output.split())
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {text}"
    assert "Traceback" not in result.output
    assert "error" in text.lower(), text
    assert re.search(message, text), text
    assert not env.out.exists(), f"partial output left in {env.out}"
    assert (_tree(env.done), _tree(env.run_done)) == done_before  # rows written survive


def test_compare_out_without_suffix_writes_markdown_and_json(env: Env, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(env.done), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.md").read_text().startswith("| method |")
    assert json.loads((tmp_path / "t.json").read_text())
    assert not (tmp_path / "t").exists()


def test_at_least_forty_kinds() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------
# library level


def test_library_refuses_bad_values_before_loading(tmp_path: Path) -> None:
    from safesteer.evaluation.eval_options import EvalOptions
    from safesteer.evaluation.evaluate import evaluate
    from safesteer.evaluation.run_setup import RunError, RunOptions
    from safesteer.evaluation.runner import run

    with pytest.raises(RunError, match="--batch-size"):
        run(RunOptions(batch_size=0, output_dir=str(tmp_path / "r")))
    with pytest.raises(RunError, match="--limit"):
        evaluate(EvalOptions(limit=0, output_dir=str(tmp_path / "e")))
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_library_refuses_non_finite_steering(tiny_models: dict[str, LoadedModel]) -> None:
    from safesteer.core.generation import GenerationConfig
    from safesteer.methods.scans.generate import scans_generate

    lm = tiny_models["llama"]
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    broken = artifact.with_settings(alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        scans_generate(lm, broken, ["hi"], GenerationConfig(max_new_tokens=2))
    nan_vectors = dataclasses.replace(artifact, vectors=torch.full_like(artifact.vectors, math.nan))
    with pytest.raises(ArtifactError, match="non-finite values in its refusal vectors; refit"):
        scans_generate(lm, nan_vectors, ["hi"], GenerationConfig(max_new_tokens=2))


def test_long_fits_report_progress_as_lines_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal (a log file, nohup), progress messages are timestamped lines, not a
    transient status line that leaves nothing behind."""
    from safesteer.cli.common import err, progress_lines

    assert not err.is_terminal
    with progress_lines("fitting") as progress:
        progress("labelling answers: 16/1200")
        progress("probers trained")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("s ", 1)[1] for line in lines] == [
        "labelling answers: 16/1200",
        "probers trained",
    ]
    assert all(line.split("s ", 1)[0].strip().isdigit() for line in lines)
