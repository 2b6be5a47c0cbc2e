"""Cell sentences as prompts: the templates (``prompt_templates/<task>.json``) and the formatters
that fill them, fitted to a model's context (``formatting``), an example of a custom formatter
(``example_formatters``), the training sets built from a split (``training_sets``) and a
screen's perturbation-response prompts (``perturbation``)."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=["example_formatters", "formatting", "perturbation", "training_sets"])
