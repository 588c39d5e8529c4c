"""The shipped YAML as the schema of every key a command line sets.

Hydra lets ``+key=value`` add any key, which the code then never reads:
``+checkpoint.every_n_step=5`` would silently keep periodic checkpoints off. A key is known when
the config composed from the same groups (``backbone=``, ``objective=[...]``, ``experiment=``...)
without the key overrides holds it, or when it lies in one of the :data:`OPEN_MAPPINGS`, whose
keys are checked against what reads them instead. An unknown key, with or without ``+``, is one
:class:`ConfigError` that names the closest known key (:func:`unknown_keys`), the same message
:func:`~m3i_lightning.config.factory.call_checked` gives for an option no constructor takes.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from omegaconf import DictConfig, OmegaConf

from m3i_lightning.conf import CONF_DIR
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives import Objective


def accepted_options(factory) -> set[str]:
    """Keyword parameters of a class over its constructors' chain (each passes ``**kwargs``
    on): the classes of this library, and every objective class wherever it is defined."""
    chain = [k for k in factory.__mro__ if "__init__" in vars(k)
             and (k.__module__.startswith("m3i_lightning") or issubclass(k, Objective))]
    names = set().union(*(inspect.signature(k.__init__).parameters for k in chain))
    return names - {"self", "kwargs"}


# Trainer arguments the commands pass themselves, so a config cannot set them.
COMMAND_TRAINER_ARGUMENTS = {"self", "callbacks", "logger", "strategy", "plugins",
                             "default_root_dir"}


def trainer_options(schema: DictConfig) -> set[str]:
    """``lightning.Trainer``'s keyword arguments (the ``trainer:`` group passes them on)."""
    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - COMMAND_TRAINER_ARGUMENTS


def backbone_options(schema: DictConfig) -> set[str]:
    """The options of the backbone family of ``backbone.arch`` (``mask_token``, ``init``...)
    and those of its timm class (``depth``, ``qkv_bias``...)."""
    from m3i_lightning.backbone import family_of

    try:
        family = family_of(schema.backbone.arch)
    except ValueError:
        return set(schema.backbone)  # the factory names the unknown architecture
    timm_options = set(inspect.signature(family.timm_class.__init__).parameters)
    return {"arch", *accepted_options(family), *timm_options} - {"self", "args", "kwargs"}


# Mappings whose keys are not all shipped: the keys a reader accepts (None: any key). Their
# documented members are in the YAML, so ``key=value`` works; others need ``+key=value``.
OPEN_MAPPINGS: dict[str, Callable[[DictConfig], set[str]] | None] = {
    "heads": None, "teacher.model_args": None,
    "trainer": trainer_options, "backbone": backbone_options}


def paths(node, prefix: str = "") -> Iterator[str]:
    """Every key path of ``node``, containers and leaves, depth first."""
    if isinstance(node, DictConfig | dict):
        for key in node:
            path = f"{prefix}{key}"
            yield path
            child = node[key] if isinstance(node, dict) else node._get_node(key)
            yield from paths(child, path + ".")


def unknown_keys(unknown: Iterable[str], known: Iterable[str], parent: str = "") -> ConfigError:
    """The error for ``unknown`` key paths: each with the closest of ``known`` (key paths), and
    the keys under ``parent`` (the mapping they were set in)."""
    known = sorted(set(known))
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    level = parent.count(".") + 1 if parent else 0
    siblings = [k for k in known
                if k.count(".") == level and (not parent or k.startswith(parent + "."))]
    under = f"under {parent}" if parent else "at the top level"
    shown = ", ".join(islice(siblings, 40)) + (", ..." if len(siblings) > 40 else "")
    return ConfigError(f"unknown key {', '.join(parts)}; the keys {under}: {shown}")


def data_options(schema: DictConfig) -> set[str]:
    """The options of every data module: the eval command applies ``+data.<key>=`` to the data
    a checkpoint was trained on, whatever its kind (its own default is the digits)."""
    from m3i_lightning.data import DATA_MODULES

    return set().union(*map(accepted_options, DATA_MODULES.values())) - {
        "tokenizer", "fields", "train_view"}


# A command's own open mappings, beside :data:`OPEN_MAPPINGS`.
COMMAND_OPEN_MAPPINGS = {"eval": {"data": data_options}}


class Schema:
    """The keys of one composed config (of the command ``config_name``), with its open
    mappings."""

    def __init__(self, composed: DictConfig, config_name: str = "config") -> None:
        self.composed = composed
        self.known = set(paths(composed))
        self.mappings = {**OPEN_MAPPINGS, **COMMAND_OPEN_MAPPINGS.get(config_name, {})}
        self._open: dict[str, set[str] | None] = {}

    def open_mapping(self, key: str) -> str | None:
        return next((m for m in self.mappings if key == m or key.startswith(m + ".")), None)

    def open_keys(self, mapping: str) -> set[str] | None:
        if mapping not in self._open:
            reader = self.mappings[mapping]
            self._open[mapping] = None if reader is None else reader(self.composed)
        return self._open[mapping]

    def is_known(self, key: str) -> bool:
        mapping = self.open_mapping(key)
        if key in self.known or key == mapping:
            return True
        if mapping is None:
            return False
        accepted = self.open_keys(mapping)
        return accepted is None or key[len(mapping) + 1:].split(".")[0] in accepted

    def candidates(self, key: str) -> set[str]:
        mapping = self.open_mapping(key)
        accepted = self.open_keys(mapping) if mapping else None
        return self.known | {f"{mapping}.{option}" for option in accepted or ()}

    def check(self, key: str, value, given: str, how: str = "") -> None:
        """The override ``given`` sets ``key`` to ``value``, with ``how`` in front (``+``,
        ``++`` or nothing); a mapping value's keys are checked too."""
        keys = [key, *(f"{key}.{sub}" for sub in paths(value))] if isinstance(value, dict) else [
            key]
        unknown = [k for k in keys if not self.is_known(k)]
        if unknown:
            parent = unknown[0]
            while parent and parent not in self.known:
                parent = parent.rpartition(".")[0]
            raise unknown_keys(unknown, self.candidates(unknown[0]), parent)
        if how == "" and key not in self.known:
            raise ConfigError(f"{given}: {key} is not in the shipped config; add it with "
                              f"+{given}")
        if how == "+" and key in self.known:
            raise ConfigError(f"+{given}: {key} is already in the config; set it without "
                              "the +")


def is_group(key: str) -> bool:
    """Whether an override's key chooses a config group (``backbone``, ``hydra/launcher``)."""
    return "/" in key or ("." not in key and (CONF_DIR / key).is_dir())


def parse_overrides(args: list[str]) -> list:
    """The command line's overrides as Hydra parses them; flags and malformed ones are left to
    Hydra, which reports them itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    overrides = []
    for arg in args:
        try:
            overrides.append(parser.parse_override(arg))
        except HydraException:
            continue
    return overrides


def check_command_line(config_name: str, args: Iterable[str]) -> None:
    """Refuse, in one :class:`ConfigError`, an override of a key that the config composed from
    the command line's group choices does not hold (see the module docstring). A swept group
    (``-m backbone=vit_cpu,swin_cpu``) gives one schema per choice; a key known to any is kept."""
    overrides = parse_overrides(args)
    check_repeated_choices(overrides)
    check_extras(overrides)
    keys = [o for o in overrides if not is_group(o.key_or_group) and not o.is_delete()
            and o.key_or_group.split(".")[0] != "hydra"]
    if not keys:
        return
    fixed = [o.input_line for o in overrides if o.key_or_group == "hydra.searchpath"
             or (is_group(o.key_or_group) and not o.is_sweep_override())]
    swept = [[f"{how(o)}{o.key_or_group}={value}" for value in o.sweep_string_iterator()]
             for o in overrides if is_group(o.key_or_group) and o.is_sweep_override()]
    schemas = [Schema(composed(config_name, [*fixed, *choice]), config_name)
               for choice in ([[value] for values in swept for value in values] or [[]])]
    for override in keys:
        values = (list(override.sweep_iterator()) if override.is_sweep_override()
                  else [override.value()])
        given = override.input_line.lstrip("+")
        for value in values:
            value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
            errors = []
            for schema in schemas:
                try:
                    schema.check(override.key_or_group, value, given, how(override))
                    break
                except ConfigError as err:
                    errors.append(err)
            else:
                raise errors[0]


# Group choices that need an optional extra: (group, choice) -> (module it imports, extra).
NEEDS_EXTRA = {("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "cluster")}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_extras(overrides) -> None:
    """A group choice whose plugin is not installed is one line with the install command,
    not the plugin system's own error."""
    for override in overrides:
        values = (list(override.sweep_iterator()) if override.is_sweep_override()
                  else [override.value()])
        for value in values:
            module, extra = NEEDS_EXTRA.get((override.key_or_group, str(value)), (None, None))
            if module and not installed(module):
                raise ConfigError(f"{override.key_or_group}={value} needs the [{extra}] extra: "
                                  f"pip install 'm3i_lightning[{extra}]'")


def check_repeated_choices(overrides) -> None:
    """Refuse a group list naming a choice twice (``objective=[cls,cls]``): Hydra would merge
    the two into one silently."""
    for override in overrides:
        if not is_group(override.key_or_group) or override.is_delete():
            continue
        values = (list(override.sweep_iterator()) if override.is_sweep_override()
                  else [override.value()])
        for value in values:
            if isinstance(value, list) and len(set(map(str, value))) < len(value):
                twice = sorted({str(v) for v in value if value.count(v) > 1})
                raise ConfigError(f"{override.input_line} names {twice} more than once: each "
                                  "choice counts once")


def composed(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``config_name`` with ``overrides``, as Hydra composes it for the command."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # a command run before in this process left it set
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides)


def how(override) -> str:
    """``+``, ``++`` or nothing: how an override sets its key."""
    return "+" if override.is_add() else "++" if override.is_force_add() else ""
