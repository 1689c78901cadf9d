"""Data: the request schema, splits, torch datasets, real-log loaders and the simulator."""

from genrerank.data.builder import Requests
from genrerank.data.importer import from_arrow, from_pandas, import_table
from genrerank.data.schema import (
    CategoricalFeature,
    DataValidationError,
    FeatureSpec,
    read_dataset,
    table_from_rows,
    write_dataset,
)
from genrerank.data.splits import assign_time_split

__all__ = [
    "CategoricalFeature",
    "DataValidationError",
    "FeatureSpec",
    "read_dataset",
    "write_dataset",
    "Requests",
    "assign_time_split",
    "from_arrow",
    "from_pandas",
    "import_table",
    "table_from_rows",
]
