"""Hydra wiring: the schema in the ConfigStore and a compose() for library use and tests.

conf/config.yaml lists ``spava_schema`` first in its defaults, so every composed config is typed
by the dataclasses in spava_plan.config before the YAML groups supply values.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .config import CommandLineConfig, MethodConfig, SpavaConfig, to_config
from .errors import ConfigError

CONFIG_MODULE = "spava_plan.conf"
CONFIG_NAME = "config"


def register_schema() -> None:
    """The schema for conf/config.yaml, and the ``${spava_pid:}`` resolver its output dirs use."""
    import os

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="spava_schema", node=CommandLineConfig)
    if not OmegaConf.has_resolver("spava_pid"):
        OmegaConf.register_new_resolver("spava_pid", lambda: str(os.getpid()), use_cache=True)


def compose_config(overrides: Sequence[str] = ()) -> SpavaConfig:
    """Compose conf/config.yaml with command-line style overrides into a validated SpavaConfig."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's override / missing-config errors
        raise hydra_error(exc) from None
    return to_config(cfg)


def hydra_error(exc: BaseException) -> ConfigError:
    """A Hydra / OmegaConf composition error as one ConfigError line naming the setting:
    an unknown group option (model=foo), a value of the wrong type (gpus=abc), an unknown key
    (foo=1) or an override that does not parse."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        choices = f"; choose one of {', '.join(options)}" if options else ""
        return ConfigError(f"unknown {group} {option!r}{choices}", setting=group.split("/")[-1])
    cause = exc.__cause__
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if key:
        reason = str(cause if cause is not None else exc).splitlines()[0]
        if "not in" in reason:
            reason = f"unknown setting {key!r} ({reason})"
        return ConfigError(reason, setting=str(key))
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(first, setting="overrides")


def method_preset(name: str) -> MethodConfig:
    """The method group's YAML (conf/method/<name>.yaml) on its schema: a baseline planned for
    comparison gets exactly the settings `method=<name>` would give it."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    text = files(CONFIG_MODULE).joinpath("method", f"{name}.yaml").read_text()
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MethodConfig), OmegaConf.create(text)))
    assert isinstance(obj, MethodConfig)
    return obj


def with_method(cfg: SpavaConfig, name: str) -> SpavaConfig:
    """``cfg`` with its method group replaced by method ``name``'s preset (model, topology, video
    and solver unchanged)."""
    import dataclasses

    return dataclasses.replace(cfg, method=method_preset(name))


def remove_empty_dirs(out_dir: str | Path | None) -> None:
    """Hydra creates a job's directory up front: remove it, and its parents up to the working
    directory, while they are empty (a failed or output-less job leaves nothing behind)."""
    if not out_dir:
        return
    path, cwd = Path(out_dir).resolve(), Path.cwd().resolve()
    while path != cwd and cwd in path.parents:
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            break
        path = path.parent
