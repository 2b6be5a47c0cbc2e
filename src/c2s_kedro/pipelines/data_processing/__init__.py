"""raw h5ad -> QC'd, log10-normalized h5ad with PCA/UMAP and UMAP plots."""

from c2s_kedro.pipelines.data_processing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
