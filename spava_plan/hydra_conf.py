"""Hydra wiring: the schema in the ConfigStore and a compose() for library use and tests.

conf/config.yaml lists ``spava_schema`` first in its defaults, so every composed config is typed
by the dataclasses in spava_plan.config before the YAML groups supply values.
"""
from __future__ import annotations

from typing import Sequence

from .config import SpavaConfig, to_config

CONFIG_MODULE = "spava_plan.conf"
CONFIG_NAME = "config"


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="spava_schema", node=SpavaConfig)


def compose_config(overrides: Sequence[str] = ()) -> SpavaConfig:
    """Compose conf/config.yaml with command-line style overrides into a validated SpavaConfig."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from .errors import ConfigError

    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's override / missing-config errors
        raise ConfigError(str(exc).splitlines()[0], setting="overrides") from None
    return to_config(cfg)
