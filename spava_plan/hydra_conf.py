"""Hydra wiring: the schema in the ConfigStore and a compose() for library use and tests.

conf/config.yaml lists ``spava_schema`` first in its defaults, so every composed config is typed
by the dataclasses in spava_plan.config before the YAML groups supply values.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .compared_rows import row_setting
from .config import CommandLineConfig, MethodConfig, SpavaConfig, VisionParallelConfig, to_config
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
    an unknown group option (model=foo, hydra/launcher=foo), an unknown primary config
    (--config-name foo), a value of the wrong type (gpus=abc), an unknown key (foo=1) or an
    override that does not parse (with how to quote it)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):  # an IOError too: callers must ask here first
        return _missing_config(exc)
    if isinstance(exc, OverrideParseException):
        return _unparsable_override(exc.override, str(exc.message))
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)  # wrapped by another exception
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        choices = f"; choose one of {', '.join(options)}" if options else ""
        return ConfigError(f"unknown {group} {option!r}{choices}", setting=group)
    cause = exc.__cause__
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if key:
        reason = str(cause if cause is not None else exc).splitlines()[0]
        if "not in" in reason:
            reason = f"unknown setting {key!r} ({reason})"
        return ConfigError(reason, setting=str(key))
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(first, setting="overrides")


def _missing_config(exc: BaseException) -> ConfigError:
    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    options = list(getattr(exc, "options", None) or [])
    group, _, option = missing.rpartition("/")
    if not group:  # the primary config (--config-name): conf/config.yaml or a YAML in --config-dir
        return ConfigError(f"unknown primary config {option!r}; spava-plan's is 'config' (the default), or the "
                           "name of a YAML file in --config-dir without .yaml", setting="--config-name")
    choices = f"; choose one of {', '.join(options)}" if options else " (that group has no options)"
    return ConfigError(f"unknown {group} {option!r}{choices}", setting=group)


# Values that cannot go unquoted for any reason but Hydra's punctuation rules: non-ASCII
# characters and quotes (printable ASCII other than ' and " is left to Hydra's own message).
_UNQUOTED = re.compile(r"[ !#-&(-~]*")


def _unparsable_override(override: str, message: str) -> ConfigError:
    """An override Hydra's lexer rejected: say how to write it (quoted) instead of the parser's
    exception; nothing of the user's text reaches the terminal unescaped (ConfigError does that)."""
    key, eq, value = override.partition("=")
    if any(not c.isprintable() for c in override):
        return ConfigError(f"override {override!r} holds a control or formatting character; no setting takes one",
                           setting="overrides")
    if eq and not _UNQUOTED.fullmatch(value):
        quoted = f"'{value}'" if "'" not in value else (f'"{value}"' if '"' not in value
                                                      else "'" + value.replace("'", "\\'") + "'")
        return ConfigError(f"cannot parse override {override!r}: a value with quotes or non-ASCII characters must be "
                           f"quoted for Hydra: {key}={quoted} (in a shell, wrap the whole override in the other kind "
                           "of quotes)", setting=key.lstrip("+~") or "overrides")
    first = message.splitlines()[0] if message else "does not parse"
    first = first.replace("LexerNoViableAltException: ", "unexpected character in ")
    return ConfigError(f"cannot parse override {override!r} ({first}); see "
                       "https://hydra.cc/docs/advanced/override_grammar/basic", setting="overrides")


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
    """``cfg`` with its method group replaced by the preset of comparison row ``name``'s method
    and its vision placement by the row's (compared_rows.row_setting: a plain method name is
    the frame-parallel ViT; model, topology, video and solver unchanged). ``method.anchor`` carries
    over, so every method with an anchor is compared with the same anchor mode."""
    import dataclasses

    method, parallel = row_setting(name)
    return dataclasses.replace(cfg, method=dataclasses.replace(method_preset(method), anchor=cfg.method.anchor),
                               vision=VisionParallelConfig(parallel=parallel))


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


# -- user config folders (--config-dir / --config-path) ------------------------------------------------
# Hydra reads every YAML a composition needs with PyYAML and OmegaConf copies each alias into its
# own nodes: a 300-byte file of nested aliases ("billion laughs") expands to millions of nodes and
# minutes of work, and a FIFO named model/x.yaml blocks the open forever. So a folder the user adds
# is checked before Hydra reads it: regular files only, each at most MAX_YAML_BYTES, composed
# (which is linear in the text: an alias is a reference there) and refused when its expansion
# would exceed MAX_YAML_NODES; malformed YAML is refused with its file, line and column.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # a spava config is a few hundred nodes
MAX_CONFIG_DIR_ENTRIES = 50_000  # files and folders walked per config folder (about a second)
_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")


def config_dirs(args: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, folder) of every --config-dir / --config-path / hydra.searchpath folder in a command line."""
    out = []
    for i, a in enumerate(args):
        if a in _DIR_FLAGS and i + 1 < len(args):
            out.append((a, args[i + 1]))
        elif "=" in a and a.split("=", 1)[0] in _DIR_FLAGS:
            out.append(tuple(a.split("=", 1)))  # type: ignore[arg-type]
    for a in args:  # hydra.searchpath=[file:///dir,pkg://x]: the file:// entries are folders too
        if a.lstrip("+").startswith("hydra.searchpath="):
            out += [("hydra.searchpath", d) for d in re.findall(r"file://([^,\]\s'\"]+)", a)]
    return [(f, d) for f, d in out if not d.startswith(("pkg://", "file://"))] + [
        (f, d[len("file://"):]) for f, d in out if d.startswith("file://")]


def check_config_dirs(args: Sequence[str]) -> None:
    """Refuse (one ConfigError naming the flag) a user config folder Hydra must not read."""
    import os

    for flag, folder in config_dirs(args):
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder!r} is not a folder", setting=flag)
        seen = 0
        for root, dirs, files in os.walk(folder):  # does not follow symlinked folders
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]  # .git, .venv: no groups
            seen += len(dirs) + len(files)
            if seen > MAX_CONFIG_DIR_ENTRIES:
                raise ConfigError(f"{folder!r} holds more than {MAX_CONFIG_DIR_ENTRIES} entries; point it at a "
                                  "folder of config groups", setting=flag)
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    path = os.path.join(root, name)
                    check_yaml_file(path, os.path.relpath(path, folder), flag)


def check_yaml_file(path: str, shown: str, setting: str) -> None:
    import os
    import stat

    import yaml

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{shown} is not a regular file", setting=setting)
            if st.st_size > MAX_YAML_BYTES:
                raise ConfigError(f"{shown} is larger than {MAX_YAML_BYTES >> 20} MiB: not a config file",
                                  setting=setting)
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(MAX_YAML_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror or exc}", setting=setting) from None
    try:
        text = raw.decode("utf-8")
        nodes = 0
        for doc in yaml.compose_all(text, Loader=yaml.SafeLoader):
            nodes += expanded_nodes(doc, MAX_YAML_NODES - nodes)
    except UnicodeDecodeError:
        raise ConfigError(f"{shown} is not UTF-8 text", setting=setting) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{shown}{where}: malformed YAML: {exc.problem or exc.context}", setting=setting) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{shown}: malformed YAML: {str(exc).splitlines()[0]}", setting=setting) from None
    except RecursionError:
        raise ConfigError(f"{shown}: YAML nested too deeply", setting=setting) from None
    if nodes > MAX_YAML_NODES:
        raise ConfigError(f"{shown}: its aliases expand to more than {MAX_YAML_NODES:,} nodes (a spava config has a few "
                          "hundred); refused before Hydra expands them", setting=setting)


def expanded_nodes(root: object, limit: int) -> int:
    """Nodes of a composed YAML document once every alias is copied (as OmegaConf does), counted
    without expanding anything: each node's expanded size is computed once, bottom-up; stops
    counting past ``limit``."""
    import yaml

    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # nodes whose children are being counted: meeting one again is a cycle
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if not done and id(node) in visiting:  # a recursive alias (&a [*a]): infinite once copied
            return limit + 1
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [x for pair in node.value for x in pair]
        else:
            kids = []
        if done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(k)] for k in kids))
            visiting.discard(id(node))
            continue
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]
