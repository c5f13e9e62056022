"""Load any SAELens SAE from a local folder or a SAELens release, with one-line errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY

from csae_plugin._compat import quiet_library_notices


class SAELoadError(ValueError):
    """An SAE could not be loaded; the message says why and what to do."""


def _check_architecture(architecture: str, where: str) -> None:
    if architecture in SAE_CLASS_REGISTRY:
        return
    if architecture == "causal":
        raise SAELoadError(
            f"{where} is a causal SAE, which SAELens only knows after `import csae_plugin`; "
            "import it before loading"
        )
    known = ", ".join(sorted(SAE_CLASS_REGISTRY))
    raise SAELoadError(f"{where} has unknown architecture {architecture!r} (known: {known})")


def check_sae_weights(sae: SAE, where: str) -> None:
    """Raise :class:`SAELoadError` if a parameter of ``sae`` holds NaN or inf, or ``k`` is not
    a whole number (either would make every later number meaningless)."""
    for name, param in sae.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise SAELoadError(
                f"{where} has NaN or inf values in {name}; retrain or re-save the SAE"
            )
    k = getattr(sae.cfg, "k", None)
    if k is not None and (not float(k).is_integer() or k < 1):
        raise SAELoadError(f"{where} has k={k}; k must be a whole number >= 1")


def load_sae_from_folder(path: str | Path, device: str = "cpu") -> SAE:
    """Load a saved SAE folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(path)
    cfg_path = folder / SAE_CFG_FILENAME
    if folder.is_file():
        raise SAELoadError(
            f"SAE path {str(folder)!r} is a file; pass the folder that holds "
            f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} ({str(folder.parent)!r})"
        )
    if not folder.is_dir():
        raise SAELoadError(f"SAE folder {str(folder)!r} does not exist; pass a saved SAE folder")
    if not cfg_path.is_file() or not (folder / SAE_WEIGHTS_FILENAME).is_file():
        raise SAELoadError(
            f"{str(folder)!r} is not a saved SAE: it needs {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME} (as written by SAE.save_model)"
        )
    where = f"SAE folder {str(folder)!r}"
    try:
        str(folder.absolute()).encode()
    except UnicodeEncodeError:
        raise SAELoadError(
            f"{where}: its path is not valid UTF-8, which safetensors cannot open; rename the "
            "folder (or the folders above it), or copy the SAE to a UTF-8 path"
        ) from None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAELoadError(f"{str(cfg_path)!r} is corrupt ({err}); re-save the SAE") from err
    if not isinstance(cfg, dict):
        raise SAELoadError(
            f"{str(cfg_path)!r} is corrupt (a JSON {type(cfg).__name__}, not an object of "
            "SAE settings); re-save the SAE"
        )
    architecture = cfg.get("architecture", "standard")
    _check_architecture(architecture, where)
    k = cfg.get("k")
    if isinstance(k, float) and not k.is_integer() and cfg.get("activation") != "batchtopk":
        raise SAELoadError(f"{where} has k={k} in {SAE_CFG_FILENAME}; k must be a whole number")
    try:
        with quiet_library_notices():  # the evals load the model with the SAE's kwargs
            sae = SAE.load_from_disk(folder, device=device)
    except Exception as err:  # safetensors/torch raise many types for a damaged file
        raise SAELoadError(f"{where} could not be loaded ({_load_failure(err)})") from err
    check_sae_weights(sae, where)
    return sae


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def _load_failure(err: Exception) -> str:
    """Why ``SAE.load_from_disk`` failed, and the fix, on one line (torch's state-dict errors
    put the cause on their second line)."""
    text = " ".join(str(err).split())
    mismatch = _SIZE_MISMATCH.search(text)
    if mismatch:
        name, saved, expected = mismatch.groups()
        return (
            f"{name} has shape [{saved}] in {SAE_WEIGHTS_FILENAME} but [{expected}] by the "
            f"d_in and d_sae in {SAE_CFG_FILENAME}; the config does not match the weights: "
            "fix it or re-save the SAE"
        )
    if len(text) > 240:
        text = text[:237] + "..."
    return f"{type(err).__name__}: {text or 'no message'}; re-save the SAE"


def load_sae(spec: str, device: str = "cpu") -> tuple[SAE, str, str]:
    """Load an SAE given as a local folder or as ``release/sae_id`` (or ``release:sae_id``).

    Returns the SAE and the (release, sae_id) pair that names its result files, as SAEBench does.
    """
    folder = Path(spec)
    if folder.exists() or spec.startswith((".", "/", "~")):
        sae = load_sae_from_folder(folder.expanduser(), device=device)
        return sae, "local", folder.expanduser().resolve().name
    release, sep, sae_id = spec.partition(":") if ":" in spec else spec.partition("/")
    if not sep or not sae_id:
        raise SAELoadError(
            f"SAE {spec!r} is neither an existing folder nor 'release:sae_id'; "
            "pass a saved SAE folder or a SAELens release and id"
        )
    if sep == "/" and release not in _releases():
        raise SAELoadError(
            f"SAE folder {spec!r} does not exist (in {os.getcwd()!r}), and {release!r} is not "
            "a SAELens release; check the folder's path"
        )
    try:
        with quiet_library_notices():
            sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as err:
        raise SAELoadError(
            f"SAELens release {release!r} / id {sae_id!r} could not be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
            "offline, pass a saved SAE folder instead"
        ) from err
    check_sae_weights(sae, f"SAE {release}:{sae_id}")
    return sae, release, sae_id


def _releases() -> set[str]:
    """SAELens's directory of releases (shipped with it: no hub request)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return set(get_pretrained_saes_directory())


def sae_model(spec: str) -> tuple[str | None, dict]:
    """The model an SAE was trained on, without loading its weights or reaching the hub:
    ``(model_name, model_from_pretrained_kwargs)`` from a folder's ``cfg.json`` or from
    SAELens's directory of releases (``release:sae_id``); ``(None, {})`` when not recorded."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        try:
            cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None, {}  # load_sae_from_folder says what is wrong
        if not isinstance(cfg, dict):
            return None, {}
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        name = cfg.get("model_name") or meta.get("model_name")
        kwargs = cfg.get("model_from_pretrained_kwargs") or meta.get("model_from_pretrained_kwargs")
        return name, dict(kwargs or {})
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = spec.partition(":")[0] if ":" in spec else spec.partition("/")[0]
    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        return None, {}
    overrides = lookup.config_overrides or {}
    kwargs = overrides.get("model_from_pretrained_kwargs") if isinstance(overrides, dict) else None
    return lookup.model, dict(kwargs or {})
