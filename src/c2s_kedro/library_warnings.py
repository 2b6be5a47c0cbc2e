"""Warnings of the libraries under the project that a user of the project cannot act on.

Each ``kedro`` command used to start with them (omegaconf's deprecation of a function that Kedro
and kedro-mlflow call, kedro-mlflow's own PythonModel without type hints, kedro-viz's use of a
deprecated FastAPI class), and with Kedro's advice against dotted dataset names, which this project
uses on purpose: the screen's datasets are ``perturbation.*`` (one namespace, see
pipeline_registry.py) and the posterior pipeline reads them by that name. Filters match the
message and the module that issues it, so the same warnings about the user's own code still show.
"""

from __future__ import annotations

import warnings

# (message regex, module regex of the code that triggers it)
LIBRARY_NOISE = (
    (r"register_new_resolver\(\) is deprecated", r"(kedro|kedro_mlflow)(\..*)?$"),
    (r"One or more dataset names contain '\.' characters", r"kedro\.pipeline\.node$"),
    (r"ORJSONResponse is deprecated", r"kedro_viz(\..*)?$"),
)


def ignore_library_noise() -> None:
    """Install the filters (idempotent: ``warnings.filterwarnings`` does not add a filter twice)."""
    for message, module in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, module=module)


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
