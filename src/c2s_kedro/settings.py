"""Kedro project settings. kedro-mlflow registers its hooks itself (plugin entry point)."""

from kedro.config import OmegaConfigLoader

from c2s_kedro.library_warnings import ignore_library_noise

ignore_library_noise()  # also for sessions created outside the `kedro` command (notebooks, tests)

from c2s_kedro.hooks import (
    CatalogStaysLazyHook,
    EnvironmentLayersHook,
    MlflowRunLivenessHook,
    MlflowRunNameHook,
    MlflowRunTagsHook,
    MlflowStoreHook,
    ParameterNamespaceHook,
    StopBetweenNodesHook,
)
from c2s_kedro.runner import ProjectSession, plugins_off_this_rank

HOOKS = (
    CatalogStaysLazyHook(),
    ParameterNamespaceHook(),
    StopBetweenNodesHook(),
    EnvironmentLayersHook(),
    MlflowStoreHook(),
    MlflowRunNameHook(),
    MlflowRunLivenessHook(),
    MlflowRunTagsHook(),
)

# Under torchrun only rank 0 runs the plugins' hooks (kedro-mlflow: one process creates the store and
# records the one run); c2s_kedro.runner runs the same nodes on every rank and keeps their saves in memory.
DISABLE_HOOKS_FOR_PLUGINS = plugins_off_this_rank()

# Any pipeline runs alone: its missing upstream outputs are produced first, in the same run
# (c2s_kedro.runner.UpstreamRunner, the default runner of this session class).
SESSION_CLASS = ProjectSession

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/local, conf/test, conf/gpu) lists only the keys it changes; nested
    # parameter dicts are merged key by key instead of replaced whole.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
