"""Loading configs: YAML files, ``base:`` merging, ``key=value`` overrides, did-you-mean errors,
upgrades of renamed values in saved configs, and saving (YAML file, plain containers)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mmdiff.config.guard import check_no_secrets, check_resolvers
from mmdiff.config.pipeline import apply_pipeline, read_pipeline_info
from mmdiff.config.resolvers import register_resolvers
from mmdiff.config.schema import check_values, schema
from mmdiff.io.atomic import write_text_atomic
from mmdiff.errors import ConfigError


register_resolvers()  # before any config resolves: `${slurm_job:}` is part of the config language

# Keys whose YAML value may be a single string that means a one-element list.
_STRING_OR_LIST = ("data.train_shards", "data.val_shards", "sampling.prompts", "base")


def _closest_key(cfg: DictConfig, full_key: str) -> Optional[str]:
    parent_path, _, leaf = str(full_key).rpartition(".")
    node = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(node, DictConfig):
        return None
    matches = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.5)
    return matches[0] if matches else None


def _wrap_merge_error(err: OmegaConfBaseException, cfg: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        hint = _closest_key(cfg, key)
        more = f" — did you mean '{hint}'?" if hint else ""
        return ConfigError(f"unknown key '{key}' in {source}{more}")
    if isinstance(err, ValidationError):
        first = str(getattr(err, "msg", err)).splitlines()[0]
        return ConfigError(f"bad value for '{key}' in {source}: {first}")
    return ConfigError(f"cannot read '{key}' in {source}: {str(err).splitlines()[0]}")


def _check_shapes(schema_node: Any, raw: Any, prefix: str, source: str) -> None:
    """Sections must be mappings and list keys lists (OmegaConf's own errors for these are
    unreadable or a bare TypeError)."""
    if not isinstance(raw, DictConfig) or not isinstance(schema_node, DictConfig):
        return
    for key in raw.keys():
        if key not in schema_node:
            continue  # unknown keys are reported by the merge, with the closest valid key
        dotted = f"{prefix}{key}"
        want = schema_node._get_node(key)
        got = raw._get_node(key)
        if got is None or got._is_missing() or got._is_interpolation():
            continue
        choices = _choices(schema_node, key)
        if choices and not isinstance(got, (DictConfig, ListConfig)) and got._value() not in choices:
            raise ConfigError(
                f"unknown {dotted} {_shown(got)} in {source}; choose one of: {', '.join(choices)}."
            )
        if isinstance(want, DictConfig) and not isinstance(got, DictConfig):
            raise ConfigError(
                f"'{dotted}' in {source} is a section and must hold keys, got {_shown(got)}."
            )
        if isinstance(want, ListConfig) and not isinstance(got, ListConfig) and got._value() is not None:
            raise ConfigError(f"'{dotted}' in {source} must be a list, got {_shown(got)}.")
        if isinstance(want, ListConfig) and isinstance(got, ListConfig) and any(
            isinstance(item, DictConfig)
            or (isinstance(item, ListConfig) and not (_holds_lists(want) or _holds_anything(want)))
            for item in got._iter_ex(resolve=False)
        ):  # schema lists hold plain values (or lists of them); OmegaConf would let a mapping in
            raise ConfigError(f"'{dotted}' in {source} must be a list of plain values, got {_shown(got)}.")
        if isinstance(want, ListConfig) and isinstance(got, ListConfig) and _holds_lists(want) and not all(
            isinstance(item, ListConfig) for item in got._iter_ex(resolve=False)
        ):
            raise ConfigError(f"'{dotted}' in {source} must be a list of lists, got {_shown(got)}.")
        if isinstance(want, DictConfig):
            _check_shapes(want, got, f"{dotted}.", source)


def _holds_lists(node: ListConfig) -> bool:
    """Whether a schema list's items are lists themselves (``List[List[int]]``)."""
    return typing.get_origin(node._metadata.element_type) is list


def _holds_anything(node: ListConfig) -> bool:
    """Whether a schema list's items may be plain values or lists (``List[Any]``: the size lists,
    whose entries their section's check parses)."""
    return node._metadata.element_type is typing.Any


def _choices(section: DictConfig, key: Any) -> Tuple[str, ...]:
    """The values a choice field of a typed section accepts (none for other keys)."""
    kind = OmegaConf.get_type(section)
    fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
    return tuple(fields[key].metadata.get("choices") or ()) if key in fields else ()


def _shown(node: Any) -> str:
    value = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _normalise_lists(raw: DictConfig) -> None:
    for dotted in _STRING_OR_LIST:
        try:
            value = OmegaConf.select(raw, dotted, default=None)
        except (OmegaConfBaseException, TypeError):  # a parent that is not a mapping: _check_shapes says so
            continue
        if isinstance(value, str):
            OmegaConf.update(raw, dotted, [value], merge=False)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file.")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report the first line only
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}")
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level.")
    check_resolvers(raw, str(_display(path)))
    _normalise_lists(raw)
    return raw


def _merge_file(cfg: DictConfig, path: Path, seen: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'.")
    raw = _read_yaml(path)
    bases = raw.get("base", None) or []
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'base' in {_display(path)} must be a list of YAML file paths.")
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        cfg = _merge_file(cfg, base_path, seen + (path,))
    _check_shapes(cfg, raw, "", str(_display(path)))
    try:
        return OmegaConf.merge(cfg, raw)
    except OmegaConfBaseException as err:
        raise _wrap_merge_error(err, cfg, str(_display(path))) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot merge {_display(path)}: {str(err).splitlines()[0]}") from None


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` command-line overrides into a typed config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value.")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as err:  # OmegaConf grammar and YAML parser errors alike: first line only
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot parse override '{item}': {first}") from None
        check_resolvers(update, "the command line")
        _normalise_lists(update)
        _check_shapes(cfg, update, "", "the command line")
        try:
            cfg = OmegaConf.merge(cfg, update)
        except OmegaConfBaseException as err:
            raise _wrap_merge_error(err, cfg, "the command line") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot apply override '{item}': {str(err).splitlines()[0]}") from None
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, merge, override, resolve and check an experiment config.

    Raises :class:`ConfigError` (exit code 2) naming the key and file on any problem; reads no
    data and builds no model.
    """
    cfg = _merge_file(schema(), Path(path), ())
    cfg = apply_overrides(cfg, overrides)
    cfg = _with_pipeline(cfg, Path(path), overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(
            f"cannot resolve '{key}' in {_display(Path(path))}: {str(err).splitlines()[0]}"
        ) from None
    cfg.base = []
    _check_complete(cfg, Path(path))
    check_values(cfg)
    check_no_secrets(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _user_layers(path: Path, overrides: Sequence[str], seen: tuple[Path, ...] = ()) -> DictConfig:
    """The keys the user's files (with their ``base:`` files) and overrides set, untyped.

    Read only with ``model.pretrained``, after the typed merge has accepted every file."""
    path = path.resolve()
    raw = _read_yaml(path)
    merged = OmegaConf.create({})
    for base in raw.get("base", None) or []:
        merged = OmegaConf.merge(merged, _user_layers(Path(base) if Path(base).is_absolute() else path.parent / base,
                                                      (), seen + (path,)))
    merged = OmegaConf.merge(merged, raw)
    for item in overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    return merged


def _with_pipeline(cfg: DictConfig, path: Path, overrides: Sequence[str]) -> DictConfig:
    """With ``model.pretrained`` (a Stable Diffusion pipeline folder): its values merged under the
    keys the user set (:func:`mmdiff.config.pipeline.apply_pipeline`)."""
    try:
        folder = OmegaConf.select(cfg, "model.pretrained")
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve 'model.pretrained' in {_display(path)}: {str(err).splitlines()[0]}") from None
    if folder is None or cfg.system != "text_to_image":  # another system: check_values refuses the key
        return cfg
    user = OmegaConf.to_container(_user_layers(path, overrides), resolve=False)

    def is_set(key: str) -> bool:
        """The user gave ``key`` a value (null counts as not set)."""
        node: Any = user
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return node is not None

    return apply_pipeline(cfg, read_pipeline_info(folder), is_set)


def _check_complete(cfg: DictConfig, path: Path) -> None:
    """No ``???`` (missing) values and no NaN/Inf numbers anywhere in the config."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"'{missing[0]}' has no value (???) in {_display(path)}; set it in the file or with "
            f"{missing[0]}=VALUE."
        )

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            dotted = f"{prefix}.{key}" if isinstance(node, dict) else f"{prefix}[{key}]"
            if isinstance(value, (dict, list)):
                walk(value, dotted.lstrip("."))
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"'{dotted.lstrip('.')}' must be a finite number, got {value}.")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (enums as their names)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``RUN_DIR/config.yaml`` and return the path.

    Refuses (:class:`ConfigError`, nothing written) a config that calls a resolver outside the
    allow-list or holds a secret's value (:mod:`mmdiff.config.guard`).
    """
    check_resolvers(cfg)
    check_no_secrets(cfg)
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of every node writes the same file (a shared run dir): the atomic writer's temp
    # names are per process, so one rank's rename never takes another's temp file away.
    write_text_atomic(out, to_yaml(cfg))
    return out


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """A plain dict of the resolved config (for loggers and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


#: Values older checkpoints hold that the schema has since renamed: (section path, key) → {old: new}.
_RENAMED_VALUES: Dict[Tuple[Tuple[str, ...], str], Dict[Any, Any]] = {
    (("model", "unet"), "compile"): {"off": "none", False: "none"},
}


def _upgrade(data: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's saved config with renamed values replaced by their current names."""
    data = copy.deepcopy(data)
    for (path, key), renames in _RENAMED_VALUES.items():
        section: Any = data
        for name in path:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section:
            value = section[key]
            if isinstance(value, (str, bool)) and value in renames:
                section[key] = renames[value]
    return data


def from_container(data: Dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from :func:`to_container` output (e.g. from a checkpoint)."""
    check_resolvers(data, "the saved config")
    cfg = OmegaConf.merge(schema(), OmegaConf.create(_upgrade(data)))
    assert isinstance(cfg, DictConfig)
    return cfg


