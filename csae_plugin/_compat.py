"""Workarounds for the pinned dependency set, in one place.

sae-bench pins ``datasets < 4``. datasets 3.x formats torch tensors through
``from torchvision.io import VideoReader`` whenever torchvision is importable, and torchvision
>= 0.26 no longer has ``VideoReader`` (huggingface/datasets#8085). Once anything has imported
torchvision (sae-bench does), SAELens's activations store would then die with that ImportError.
Telling datasets that torchvision is unavailable makes it format plain tensors, which is all the
plugin needs.
"""

import contextlib
import logging
import warnings
from collections.abc import Iterator

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
