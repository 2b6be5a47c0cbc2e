"""The C2S library: plain Python on anndata, numpy, datasets and transformers (no Kedro).

Each module is imported when first used (``core.models.loading`` imports torch and transformers): the
pipelines' nodes call ``core.<module>.<name>``, so a run imports only what its nodes use.
"""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    submodules=[
        "annotation", "cell_generation", "data", "embedding", "evaluation", "models", "perturbation",
        "perturbation_diagnostics", "perturbation_evaluation", "plotting", "prompts", "sentences", "simulate",
        "tracking",
    ],
)
