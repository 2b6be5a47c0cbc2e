"""Kedro dataset classes the catalog needs and kedro-datasets lacks."""

from c2s_kedro.datasets.h5ad_dataset import H5adDataset
from c2s_kedro.datasets.metrics_dataset import MetricsDataset
from c2s_kedro.datasets.model_dataset import HFModelDataset
from c2s_kedro.datasets.numpy_dataset import NpyDataset

__all__ = ["H5adDataset", "HFModelDataset", "MetricsDataset", "NpyDataset"]
