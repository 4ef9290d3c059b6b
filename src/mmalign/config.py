"""Typed configs: YAML file -> dataclass -> dotted overrides, unknown keys are errors.

Every recipe declares one top-level dataclass composed of small ones. ``load_config`` builds it from a
YAML file (optional) and ``key.sub=value`` overrides (values parsed as YAML scalars, so ``lr=1e-5``,
``lora.enabled=false`` and ``data.splits=[a,b]`` work); ``flags_to_overrides`` turns the command-line
spelling ``--key.sub value`` / ``--key.sub=value`` into the same overrides. ``save_config`` writes the
resolved config and its hash next to an output, so every artefact names the exact settings that made it.

Two conveniences, declared by the dataclasses themselves as class variables:

- ``SHORTHAND = "path"`` on a section: a single value given for the whole section sets that field, so
  ``model=/models/llava`` means ``model.path=/models/llava`` (and ``data=pairs.jsonl`` ``data.train=...``);
- ``ALIASES = {"learning_rate": "optim.lr", ...}`` on a config: other names for its keys (TRL's, where the
  concept is the same); the resolved config always holds the canonical keys.

Per-field documentation (``describe``, ``format_fields``, ``config_template``) lives in ``mmalign.config_docs``.

Loading is strict: a missing or unreadable file, YAML that does not parse (the error names file, line and
column), a key given twice in one mapping, a value of the wrong type and a float that is NaN or infinite are
all ``ConfigError`` (exit code 2 from the command line), never a traceback; ranges are checked by each
dataclass's ``__post_init__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false, so ``mixed_precision: no`` stays the string "no"; a key
    given twice in one mapping is an error (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys and complex keys are left to PyYAML
            if key_node.value in seen and key_node.value != "<<":
                raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error or a disallowed tag is a ConfigError naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(p for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ConfigError(f"{where}{at}: not valid YAML: {problem or err}") from None


def _read_config_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err}") from None
    return _load_yaml(text, str(path))


class ConfigError(ValueError):
    """A config file or override that does not fit the recipe's dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, loudly."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)):  # one item given without brackets: ``report_to=wandb``
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """``X | Y | None``: None where allowed, else the value as the first member type it converts to."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    members = [arg for arg in args if arg is not type(None)]
    if len(members) == 1:  # ``X | None``: X's own error says more than "fits none of"
        return _coerce(value, members[0], where)
    for arg in members:
        with contextlib.suppress(ConfigError):  # not this member: try the next one
            return _coerce(value, arg, where)
    raise ConfigError(f"{where}: {value!r} fits none of {tp}")


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    """A plain class (int, float, str, bool, ...): the exact type, but ints become floats and numbers strings."""
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        # YAML 1.1 reads "2e-5" (no dot) as a string; learning rates are written that way.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
        if not math.isfinite(number):  # no setting means anything at NaN or infinity
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, fields[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(tree, key.strip(), _load_yaml(raw, f"override {item!r}") if raw.strip() else "")
    return tree


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")


def flags_to_overrides(tokens: list[str]) -> list[str]:
    """Command-line tokens -> ``key=value`` overrides, in order: ``--a.b v`` and ``--a.b=v`` become ``a.b=v``;
    a flag with no value (last, or followed by another flag or a ``key=value``) is ``true``; ``key=value``
    and other tokens pass through. Dashes in a flag's name read as underscores (``--max-steps``)."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, sep, value = token[2:].partition("=")
        if not name:
            raise ConfigError(f"option {token!r} has no name")
        name = name.replace("-", "_")
        if not sep:
            takes_next = i < len(tokens) and not tokens[i].startswith("--") and not _OVERRIDE.match(tokens[i])
            value, i = (tokens[i], i + 1) if takes_next else ("true", i)
        out.append(f"{name}={value}")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML at ``path``, then dotted ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = _read_config_file(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = _expand(cls, loaded or {})
    for item in overrides or []:  # one at a time: ``model=/x`` then ``model.dtype=...`` both apply
        data = _merge(data, _expand(cls, parse_overrides([item])))
    # Start from the defaults so nested sections given partially keep their other defaults.
    return _build(cls, _merge(_defaults(cls), data), "")


def _defaults(cls: type) -> dict[str, Any]:
    """The default of every field of ``cls`` that has one (sections as dicts, from the parent's factory)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _aliases(cls: type) -> dict[str, str]:
    return dict(getattr(cls, "ALIASES", {}))


def _expand(cls: type, tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``cls``'s aliases renamed and section shorthands (``model: /x``) spelt out, at every level;
    unknown keys are kept for ``_build`` to report."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        piece: dict[str, Any] = {}
        _set_dotted(piece, _aliases(cls).get(key, key), value)
        out = _merge(out, piece)
    fields = _field_types(cls)
    for key, value in out.items():
        section = fields.get(key)
        if not dataclasses.is_dataclass(section):
            continue
        if isinstance(value, dict):
            out[key] = _expand(section, value)
        elif getattr(section, "SHORTHAND", None) and not isinstance(value, list):
            out[key] = {section.SHORTHAND: value}
    return out


def config_hash(cfg: Any) -> str:
    """Short stable hash of a resolved config, used in provenance records."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (and its hash) into ``out_dir``; returns the file path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    # The hash goes in a comment so the file reloads as the same config with ``--config``.
    header = f"# config_hash: {config_hash(cfg)}\n# recipe: {type(cfg).__module__}.{type(cfg).__name__}\n"
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
