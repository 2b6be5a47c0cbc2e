"""The C2S library: plain Python on anndata, numpy, datasets and transformers (no Kedro).

One folder per stage of the workflow: ``data`` (the cells at the door), ``simulate``, ``sentences``,
``prompts``, ``models`` and ``tasks`` (what the models are used for), beside ``errors``, ``tracking``
and ``plotting``, which every folder uses. Each module is imported when first used (``core.models``
imports torch and transformers): the pipelines' nodes call ``core.<folder>.<module>.<name>``, so a
run imports only what its nodes use.
"""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    submodules=["data", "models", "plotting", "prompts", "sentences", "simulate", "tasks", "tracking"],
)
