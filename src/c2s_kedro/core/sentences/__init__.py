"""Cells as sentences: the rank conversion and its vocabulary (``conversion``, with the numba kernels
of ``kernels``), and the rank -> expression fit that turns sentences back into expression
(``rank_fit``)."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=["conversion", "kernels", "rank_fit"])
