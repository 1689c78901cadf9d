"""Names in the registries of torch-importing packages, for the command line's help texts.

``genrerank --help`` must not import torch (seconds), and importing anything under
``genrerank.models`` or ``genrerank.decoding`` does. These lists stand in for
:data:`genrerank.models.MODELS` and :data:`genrerank.decoding.DECODERS` there;
``tests/test_registry_names.py`` fails when a registry and its list differ. Registering a model
or decoder in the package means adding its name here.
"""

from __future__ import annotations

MODEL_NAMES: tuple[str, ...] = (
    "autoregressive", "evaluator", "hierarchical", "logging", "nar4rec", "pointwise", "prm",
    "structured",
)
DECODER_NAMES: tuple[str, ...] = (
    "beam", "context", "contrastive", "greedy", "hungarian", "sample", "satiation",
)
