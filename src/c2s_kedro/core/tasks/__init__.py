"""What the models are used for: cell embeddings (``embedding``), cell-type prediction scored against
baselines (``evaluation``), zero-shot annotation (``annotation``), cell generation
(``cell_generation``) and perturbation-response prediction (``perturbation``)."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__, submodules=["annotation", "cell_generation", "embedding", "evaluation", "perturbation"]
)
