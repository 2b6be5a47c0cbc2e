"""The cells before they become sentences: the default data (``pbmc68k``), the checks at the door
(``validation``), normalization and embedding (``preprocessing``) and the train/val/test split
(``splitting``)."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=["pbmc68k", "preprocessing", "splitting", "validation"])
