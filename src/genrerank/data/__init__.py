"""Data: the request schema, splits, torch datasets, real-log loaders and the simulator."""

from genrerank.data.schema import (
    CategoricalFeature,
    DataValidationError,
    FeatureSpec,
    read_dataset,
    write_dataset,
)

__all__ = [
    "CategoricalFeature",
    "DataValidationError",
    "FeatureSpec",
    "read_dataset",
    "write_dataset",
]
