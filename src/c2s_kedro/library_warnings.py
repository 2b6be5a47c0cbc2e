"""Warnings of the libraries under the project that a user of the project cannot act on.

Each ``kedro`` command used to start with them (omegaconf's deprecation of a function that Kedro
and kedro-mlflow call, kedro-mlflow's own PythonModel without type hints, kedro-viz's use of a
deprecated FastAPI class), and with Kedro's advice against dotted dataset names, which this project
uses on purpose: the screen's datasets are ``perturbation.*`` (one namespace, see
pipeline_registry.py) and the posterior pipeline reads them by that name. Filters match the
message and the module that issues it, so the same warnings about the user's own code still show.

Kedro's parameter validator reads the type hints of every node of every pipeline at each run; the
nodes name their data types (AnnData, Dataset, LanguageModel...) for type checkers only, so that
a run does not import torch or pyplot for them, and the validator's warning that it could not
resolve those names (a NameError, one per node) is left out too; the nodes take no typed
parameters, so it has nothing to check there.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, module regex of the code that triggers it)
LIBRARY_NOISE = (
    (r"register_new_resolver\(\) is deprecated", r"(kedro|kedro_mlflow)(\..*)?$"),
    (r"One or more dataset names contain '\.' characters", r"kedro\.pipeline\.node$"),
    (r"ORJSONResponse is deprecated", r"kedro_viz(\..*)?$"),
)


TYPE_HINT_VALIDATOR_LOGGER = "kedro.validation.type_extractor"


def unresolved_type_hint(record: logging.LogRecord) -> bool:
    """False for the validator's warning about a type-checking-only name in a node's hints."""
    return not (record.getMessage().startswith("Could not extract type hints")
                and isinstance(record.args, tuple) and isinstance(record.args[-1], NameError))


def ignore_library_noise() -> None:
    """Install the filters (idempotent: ``warnings.filterwarnings`` and ``Logger.addFilter`` do
    not add a filter twice)."""
    for message, module in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, module=module)
    logging.getLogger(TYPE_HINT_VALIDATOR_LOGGER).addFilter(unresolved_type_hint)


def before_kedro_plugins() -> None:
    """``kedro.init`` entry point: runs before Kedro loads its plugins' commands. Loading
    kedro-mlflow's commands defines its ``KedroPipelineModel``, a PythonModel without type hints,
    and MLflow warns about it through a filter of its own (so no warnings filter reaches it); the
    class is defined here once, with that one warning not shown."""
    ignore_library_noise()
    shown = warnings.showwarning
    warnings.showwarning = lambda *args, **kwargs: None
    try:
        import kedro_mlflow.mlflow  # noqa: F401
    except ImportError:
        pass
    finally:
        warnings.showwarning = shown
