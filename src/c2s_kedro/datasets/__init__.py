"""Kedro dataset classes the catalog needs and kedro-datasets lacks.

Each class is imported when the catalog first names it: ``HFModelDataset`` needs torch and
transformers, which a run without a model does not import (nor does ``ArrowDataset``, unlike
kedro-datasets' huggingface package).
"""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    submod_attrs={
        "arrow_dataset": ["ArrowDataset"],
        "h5ad_dataset": ["H5adDataset"],
        "metrics_dataset": ["MetricsDataset"],
        "model_dataset": ["HFModelDataset"],
        "numpy_dataset": ["NpyDataset"],
    },
)
