"""The cells before they become sentences: the default data (``pbmc68k``), the checks at the door
(``validation``), normalization and embedding (``preprocessing``), the train/val/test split
(``splitting``) and a Perturb-seq screen's own checks (``screen``)."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=["pbmc68k", "preprocessing", "screen", "splitting", "validation"])
