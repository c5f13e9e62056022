"""Workarounds for the pinned dependency set, in one place: every change the package makes to
another library's modules or objects (datasets' torchvision flag, gguf's reader, SAELens's cache
runner's model loader, SAELens's trainer's progress bar) and the notices and progress bars it
silences.

sae-bench pins ``datasets < 4``. datasets 3.x formats torch tensors through
``from torchvision.io import VideoReader`` whenever torchvision is importable, and torchvision
>= 0.26 no longer has ``VideoReader`` (huggingface/datasets#8085). Once anything has imported
torchvision (sae-bench does), SAELens's activations store would then die with that ImportError.
Telling datasets that torchvision is unavailable makes it format plain tensors, which is all the
plugin needs.
"""

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import datasets.config


def patch_datasets_torchvision() -> None:
    """Stop datasets 3.x from importing the removed ``torchvision.io.VideoReader``."""
    datasets.config.TORCHVISION_AVAILABLE = False


LIBRARY_NOTICES = (
    # SAELens's activations store builds batches with torch.tensor(tensor); harmless
    "To copy construct from a tensor",
    # SAELens's advice to load the model with the SAE's kwargs: the plugin loads the model with them itself
    "This SAE has non-empty model_from_pretrained_kwargs",
    # SAELens's runner on override_model / override_dataset, which train_sae always passes
    "You just passed in a",
    # SAELens compares the dataset's rows with the training *tokens* (2885 rows of 128 tokens
    # "are fewer than" 40000); a real shortfall still says "beginning new epoch"
    "The training dataset contains fewer samples",
)
"""Library warnings and log lines that say nothing to a user of this package."""


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIBRARY_NOTICES)


@contextlib.contextmanager
def quiet_library_notices() -> Iterator[None]:
    """Silence :data:`LIBRARY_NOTICES` (and only them) for the duration."""
    sae_lens_logger = logging.getLogger("sae_lens")
    notices = _DropNotices()
    sae_lens_logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            for text in LIBRARY_NOTICES:
                warnings.filterwarnings("ignore", message=rf"\s*{text}", category=UserWarning)
            yield
    finally:
        sae_lens_logger.removeFilter(notices)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide the progress bars transformers, huggingface_hub and datasets draw on stderr (a
    model's "Loading weights", downloads, dataset maps) for the duration, through their own
    switches, which are restored after."""
    import datasets
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_off = hub.are_progress_bars_disabled()
    datasets_on = datasets.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # hub's too
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if hub_off:
            hub.disable_progress_bars()
        else:
            hub.enable_progress_bars()
        if datasets_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Parse each GGUF file once while transformers reads it three times (for the duration,
    ``gguf.GGUFReader`` is replaced by a reader that returns one instance per path).

    transformers reads the file for the tokenizer, the config and the weights, each time with
    a new ``gguf.GGUFReader``, whose constructor decodes every metadata field in Python, slow
    for a 262k-entry vocabulary (timed in ``docs/benchmarks.md``). The reader only reads the
    (memory-mapped) file, so one per path serves all three.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


@contextlib.contextmanager
def cache_runner_uses(model: Any) -> Iterator[None]:
    """SAELens's ``CacheActivationsRunner`` loads its model by name from the hub
    (``sae_lens.cache_activations_runner.load_model``); for the duration it gets ``model``."""
    from unittest import mock

    from sae_lens import cache_activations_runner

    with mock.patch.object(cache_activations_runner, "load_model", lambda **_: model):
        yield


def sparse_progress_bar(trainer: Any, steps: int) -> None:
    """Move a SAELens ``SAETrainer``'s progress bar about 50 times over a run of ``steps``
    steps in a terminal, 10 times into a log file (its private ``_update_pbar``, on this one
    trainer, gets a matching ``update_interval``).

    SAELens moves the bar every 100 steps, so a short run would show 0% to the end; into a log
    file (not a terminal) every move is a new chunk of text.
    """
    moves = 50 if sys.stderr.isatty() else 10
    trainer._update_pbar = partial(trainer._update_pbar, update_interval=max(1, steps // moves))
