"""Kedro project settings. kedro-mlflow registers its hooks itself (plugin entry point)."""

from kedro.config import OmegaConfigLoader

from c2s_kedro.hooks import DistributedRunHook, UpstreamOutputsHook

HOOKS = (DistributedRunHook(), UpstreamOutputsHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/local, conf/test, conf/gpu) lists only the keys it changes; nested
    # parameter dicts are merged key by key instead of replaced whole.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
