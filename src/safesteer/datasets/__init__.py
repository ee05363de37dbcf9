"""Datasets: the registry of evaluation and anchor sets, their loaders, anchors and sampling."""

from safesteer.datasets.loaders import TEST_SET_NAMES, load_test_set
from safesteer.datasets.prompt_files import load_prompt_file
from safesteer.datasets.readers import LABEL_COLUMNS, TEXT_COLUMNS, Label, Prompt
from safesteer.datasets.registry import (
    BUNDLED_DIR,
    DATA_DIR_ENV,
    REGISTRY,
    DatasetError,
    DatasetSpec,
    dataset_path,
    dataset_status,
    download,
    get_spec,
    resolve_data_dir,
    sha256_file,
    verify,
    verify_report,
)
from safesteer.datasets.sampling import Anchors, draw_anchors, stratified_sample

__all__ = [
    "BUNDLED_DIR",
    "DATA_DIR_ENV",
    "LABEL_COLUMNS",
    "REGISTRY",
    "TEST_SET_NAMES",
    "TEXT_COLUMNS",
    "Anchors",
    "DatasetError",
    "DatasetSpec",
    "Label",
    "Prompt",
    "dataset_path",
    "dataset_status",
    "download",
    "draw_anchors",
    "get_spec",
    "load_prompt_file",
    "load_test_set",
    "resolve_data_dir",
    "sha256_file",
    "stratified_sample",
    "verify",
    "verify_report",
]
