"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from c2s_kedro.library_warnings import ignore_library_noise

ignore_library_noise()  # also for sessions created outside the `kedro` command (notebooks, tests)

from c2s_kedro.hooks import (
    EnvironmentLayersHook,
    MlflowRunLivenessHook,
    MlflowRunNameHook,
    MlflowRunTagsHook,
    MlflowStoreHook,
    ParameterNamespaceHook,
    ProjectMlflowHook,
    StopBetweenNodesHook,
    UserEntriesHook,
)

# Hooks of one kind run last-registered first: kedro-mlflow's (last) opens the MLflow run before the
# project's run hooks name, tag and watch it; the ones marked tryfirst run before it.
HOOKS = (
    ParameterNamespaceHook(),
    StopBetweenNodesHook(),
    EnvironmentLayersHook(),
    UserEntriesHook(),
    MlflowStoreHook(),
    MlflowRunNameHook(),
    MlflowRunLivenessHook(),
    MlflowRunTagsHook(),
    ProjectMlflowHook(),
)

# kedro-mlflow's hook is registered above (ProjectMlflowHook keeps the catalog lazy); its plugin entry
# point would register it a second time. Both spellings of its distribution name.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-mlflow", "kedro_mlflow")

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/local, conf/test, conf/gpu) lists only the keys it changes; nested
    # parameter dicts are merged key by key instead of replaced whole.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
