"""Re-ranking models, one file each, registered by name (see ``base.build_model``)."""

from genrerank.models import (  # noqa: F401  (registration)
    autoregressive,
    evaluator,
    hierarchical,
    logging,
    nar4rec,
    pointwise,
    prm,
    structured,
)
from genrerank.models.base import MODELS, RerankModel, build_model, register_model

__all__ = ["MODELS", "RerankModel", "build_model", "register_model"]
