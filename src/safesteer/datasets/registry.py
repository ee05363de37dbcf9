"""Dataset registry: what each set is, where its files live, and how to check or fetch them.

The entries are data: ``registry.json`` next to this module (package data). Every set has a
:class:`DatasetSpec` naming its files relative to a *data root* (the layout of
``shared/data``: ``advbench/AdvBench.csv`` and so on), their licence, upstream URLs and sha256.
Sets under a permissive licence ship inside the package (``datasets/bundled/``); the others are
read from a user-supplied data folder (``--data-dir`` or ``SAFESTEER_DATA_DIR``) or downloaded
from upstream on request and checked against the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLED_DIR",
    "DATA_DIR_ENV",
    "REGISTRY",
    "DatasetError",
    "DatasetSpec",
    "dataset_path",
    "dataset_status",
    "download",
    "get_spec",
    "resolve_data_dir",
    "sha256_file",
    "verify",
    "verify_report",
]

DATA_DIR_ENV = "SAFESTEER_DATA_DIR"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
_DOWNLOAD_TIMEOUT_S = 60.0


class DatasetError(ValueError):
    """A dataset problem a user can fix; the message names the problem and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one dataset.

    ``files`` are paths relative to a data root; ``sha256`` and, where the set can be fetched file
    by file, ``upstream_urls`` are parallel to ``files``. A set whose upstream is an archive or a
    page has a single URL and must be placed by hand. ``rows`` is the number of records upstream
    (lines, CSV rows, JSON items or parquet rows summed over ``files``).
    """

    name: str
    description: str
    files: tuple[str, ...]
    licence: str
    upstream_urls: tuple[str, ...]
    sha256: tuple[str, ...]
    bundled: bool
    roles: tuple[str, ...]
    rows: int = 0

    @property
    def downloadable(self) -> bool:
        """Whether :func:`download` can fetch every file on its own."""
        return len(self.upstream_urls) == len(self.files) and len(self.files) > 0


REGISTRY_FILE = Path(__file__).resolve().parent / "registry.json"


def _load_registry(path: Path = REGISTRY_FILE) -> tuple[dict[str, DatasetSpec], dict[str, str]]:
    """The :class:`DatasetSpec` entries (in file order) and name aliases of ``registry.json``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    specs: dict[str, DatasetSpec] = {}
    for entry in data["datasets"]:
        spec = DatasetSpec(
            name=entry["name"],
            description=entry["description"],
            files=tuple(entry["files"]),
            licence=entry["licence"],
            upstream_urls=tuple(entry["upstream_urls"]),
            sha256=tuple(entry["sha256"]),
            bundled=bool(entry["bundled"]),
            roles=tuple(entry["roles"]),
            rows=int(entry.get("rows", 0)),
        )
        specs[spec.name] = spec
    return specs, dict(data["aliases"])


REGISTRY: dict[str, DatasetSpec]
_ALIASES: dict[str, str]
REGISTRY, _ALIASES = _load_registry()


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def get_spec(name: str) -> DatasetSpec:
    """Return the registry entry for ``name`` (case and ``_``/``-`` insensitive)."""
    key = _normalise_name(name)
    if key not in REGISTRY:
        raise DatasetError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(REGISTRY))} "
            "(run `safesteer datasets list` to see them with their status)."
        )
    return REGISTRY[key]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """Return the data folder: ``data_dir`` if given, else ``$SAFESTEER_DATA_DIR``, else None."""
    if data_dir is not None and str(data_dir).strip():
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return None


def _missing_message(spec: DatasetSpec, root: Path | None) -> str:
    missing = list(spec.files)
    if root is not None:
        missing = [rel for rel in spec.files if not (root / rel).is_file()]
    shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
    if root is None:
        where = "no data folder is set"
    elif not root.is_dir():
        where = f"the data folder {root} does not exist"
    else:
        where = f"the data folder {root} does not hold it"
    parts = [
        f"Dataset {spec.name!r} is not available: expected {shown} under a data folder, "
        f"but {where}.",
        f"Fix: pass --data-dir DIR (or set {DATA_DIR_ENV}=DIR) where DIR/{spec.files[0]} exists"
        + ("," if spec.downloadable else "."),
    ]
    if spec.downloadable:
        parts.append(
            f"or fetch it with `safesteer datasets download {spec.name} --dest DIR` "
            f"(upstream: {spec.upstream_urls[0]}"
            + (f" and {len(spec.upstream_urls) - 1} more" if len(spec.upstream_urls) > 1 else "")
            + ")."
        )
    else:
        url = spec.upstream_urls[0] if spec.upstream_urls else "its upstream"
        parts.append(
            f"Get it by hand from {url} and lay the files out as listed "
            f"(`safesteer datasets verify {spec.name} --data-dir DIR` checks them)."
        )
    parts.append(f"Licence: {spec.licence}.")
    return " ".join(parts)


def dataset_path(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Return the local paths of a set's files.

    A data folder that holds every file wins; otherwise bundled sets come from the package.
    Raises :class:`DatasetError` naming the expected paths and how to get them when missing.
    """
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    if root is not None:
        paths = [root / rel for rel in spec.files]
        if all(p.is_file() for p in paths):
            return paths
    if spec.bundled:
        paths = [BUNDLED_DIR / rel for rel in spec.files]
        if all(p.is_file() for p in paths):
            return paths
    raise DatasetError(_missing_message(spec, root))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_report(name: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Check each file of a set; one dict per file: path, expected, actual, ok."""
    spec = get_spec(name)
    paths = dataset_path(spec.name, data_dir)
    report: list[dict[str, Any]] = []
    for path, expected in zip(paths, spec.sha256, strict=True):
        actual = sha256_file(path)
        report.append(
            {"path": path, "expected": expected, "actual": actual, "ok": actual == expected}
        )
    return report


def verify(name: str, data_dir: str | Path | None = None) -> bool:
    """True when every file of the set matches its recorded sha256 (DatasetError if missing)."""
    return all(entry["ok"] for entry in verify_report(name, data_dir))


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    if not isinstance(data, bytes):
        raise DatasetError(f"Download of {url} returned {type(data).__name__}, not bytes.")
    return data


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download(name: str, dest: str | Path) -> list[Path]:
    """Fetch a set from upstream into ``dest`` (same layout as a data folder).

    Every file is checked against its sha256 before anything is written; files already present
    and valid are kept. Raises :class:`DatasetError` on network failure or checksum mismatch.
    """
    spec = get_spec(name)
    dest = Path(dest).expanduser()
    if not spec.downloadable:
        url = spec.upstream_urls[0] if spec.upstream_urls else "its upstream"
        raise DatasetError(
            f"Dataset {spec.name!r} cannot be downloaded file by file: get it from {url}, "
            f"lay it out under {dest} as {spec.files[0]} (and the other {len(spec.files) - 1} "
            f"files), then run `safesteer datasets verify {spec.name} --data-dir {dest}`."
        )
    fetched: list[tuple[Path, bytes | None]] = []
    for rel, url, expected in zip(spec.files, spec.upstream_urls, spec.sha256, strict=True):
        target = dest / rel
        if target.is_file() and sha256_file(target) == expected:
            fetched.append((target, None))
            continue
        try:
            data = _fetch(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DatasetError(
                f"Could not download {spec.name!r} file {rel} from {url}: {exc}. Fix: check "
                f"network access and retry, or download the file by hand, save it as {target}, "
                f"and pass --data-dir {dest}."
            ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DatasetError(
                f"Checksum mismatch for {spec.name!r} file {rel} downloaded from {url}: expected "
                f"sha256 {expected}, got {actual} ({len(data)} bytes). Nothing was written. The "
                "upstream file has changed or the download was corrupted: retry, or obtain the "
                f"original file and place it at {target}."
            )
        fetched.append((target, data))
    for target, payload in fetched:
        if payload is not None:
            _atomic_write(target, payload)
    return [target for target, _ in fetched]


def dataset_status(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per registered set: name, rows, licence, bundled, available, where."""
    status: list[dict[str, Any]] = []
    for spec in REGISTRY.values():
        try:
            paths = dataset_path(spec.name, data_dir)
        except DatasetError:
            available, where = False, "missing"
        else:
            available = True
            where = (
                "bundled"
                if paths[0].is_relative_to(BUNDLED_DIR)
                else str(resolve_data_dir(data_dir))
            )
        status.append(
            {
                "name": spec.name,
                "rows": spec.rows,
                "licence": spec.licence,
                "bundled": spec.bundled,
                "available": available,
                "where": where,
            }
        )
    return status
