"""The language models: loading and saving them (``loading``), the gene-level tokenizer of the models
built here (``tokenizer``), training (``training``, in several processes: ``launch``), inference: embeddings, label scoring,
generation and sampling (``inference``, with the gene-vocabulary constraint of ``constraints``),
and a fine-tuned annotator as an MLflow model (``annotator_model``). Each imports torch and
transformers: loaded when first used."""

import lazy_loader as lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__, submodules=["annotator_model", "constraints", "inference", "launch", "loading", "tokenizer", "training"]
)
