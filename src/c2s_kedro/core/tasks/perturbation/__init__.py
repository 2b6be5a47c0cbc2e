"""Perturbation-response prediction (workflow notes sections 10-11): a screen split and its perturbed
cells paired with control cells (``pairs``), its targets as tokens of the model (``tokens``), a
posterior over responses sampled and summarised as expression (``posterior``), whether the model
reads its inputs (``diagnostics``) and the scores against held-out cells and baselines
(``evaluation``). The screen's own checks are ``data.screen``, its prompts ``prompts.perturbation``."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__, submodules=["diagnostics", "evaluation", "pairs", "posterior", "tokens"]
)
