"""The C2S library: plain Python on anndata, numpy, datasets and transformers (no Kedro)."""
