"""One workaround for the pinned dependency set, in one place.

sae-bench pins ``datasets < 4``. datasets 3.x formats torch tensors through
``from torchvision.io import VideoReader`` whenever torchvision is importable, and torchvision
>= 0.26 no longer has ``VideoReader`` (huggingface/datasets#8085). Once anything has imported
torchvision (sae-bench does), SAELens's activations store would then die with that ImportError.
Telling datasets that torchvision is unavailable makes it format plain tensors, which is all the
plugin needs.
"""

import datasets.config


def patch_datasets_torchvision() -> None:
    """Stop datasets 3.x from importing the removed ``torchvision.io.VideoReader``."""
    datasets.config.TORCHVISION_AVAILABLE = False
