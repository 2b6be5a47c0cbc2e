"""Simulated data with a known truth: an atlas of cell types, tissues and donors (``atlas``) and a
Perturb-seq screen in the Jurkat CRISPRi schema (``screen``), both written to h5ad in chunks."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=["atlas", "screen"])
