"""Per-field documentation of config dataclasses, for ``--help`` and ``mmalign ... --print-config``.

``describe`` lists every leaf field of a config class (dotted key, type, default, doc); the doc is the comment
at the end of a field's line, or the comment lines right above it, in the dataclass source. ``format_fields``
makes the help text and ``config_template`` a commented YAML file of the defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any

import yaml

from mmalign.config import _aliases, _field_types


def _all_defaulted(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )



@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One leaf field of a config: its dotted ``key``, type as text, default (``REQUIRED`` if none) and doc."""

    key: str
    type: str
    default: Any
    doc: str


REQUIRED = "<required>"


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in ``cls``'s own source: the comment ending the field's line(s), else the
    comment lines right above it (joined into one line)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    code_lines = source.splitlines()
    out = {}
    (node,) = ast.parse(source).body
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        above, n = [], stmt.lineno - 1
        while n in comments and code_lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        out[stmt.target.id] = " ".join(trailing or above)
    return out


def _docs(cls: type) -> dict[str, str]:
    """Comments of every field of ``cls``, inherited fields documented where they are declared."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass.__module__ != "builtins":
            docs |= _comments(klass)
    return docs


def type_name(tp: Any) -> str:
    """``float``, ``str | None``, ``list[float]``, ``'cosine' | 'linear'`` (a Literal's choices)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return "None" if tp is type(None) else "any" if tp is Any else tp.__name__


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[FieldDoc]:
    """Every leaf field of config ``cls`` in declaration order, sections flattened to dotted keys; defaults
    are those of ``cls()`` (a section's defaults come from its parent's factory), ``REQUIRED`` where none."""
    if defaults is None and _all_defaulted(cls):
        defaults = cls()
    docs, hints, out = _docs(cls), _field_types(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = REQUIRED
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe(hints[f.name], f"{key}.", value)
        else:
            out.append(FieldDoc(key, type_name(hints[f.name]), value, docs.get(f.name, "")))
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def format_fields(cls: type, width: int = 110) -> str:
    """Help text: one entry per field, ``--key TYPE`` then its doc and default, plus ``cls``'s aliases."""
    lines = []
    for d in describe(cls):
        head = f"  --{d.key} {d.type}"
        default = "required" if d.default is REQUIRED else f"default: {_yaml_value(d.default)}"
        body = f"{d.doc} ({default})" if d.doc else f"({default})"
        wrapped = textwrap.wrap(body, width - 8) or [""]
        lines.append(head)
        lines += [f"        {text}" for text in wrapped]
    short = _shorthands(cls)
    if short:
        lines += ["", "shorthands (a value for the whole section):"]
        lines += [f"  --{key} VALUE -> --{key}.{name} VALUE" for key, name in short.items()]
    aliases = _aliases(cls)
    if aliases:
        lines += ["", "other names (TRL's, same meaning):"]
        lines += [f"  --{alias} -> --{key}" for alias, key in aliases.items()]
    return "\n".join(lines)


def _shorthands(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted section key -> the field its ``SHORTHAND`` sets, for every section of ``cls``."""
    out = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            if getattr(tp, "SHORTHAND", None):
                out[f"{prefix}{name}"] = tp.SHORTHAND
            out |= _shorthands(tp, f"{prefix}{name}.")
    return out


def config_template(cls: type) -> str:
    """A commented YAML file of ``cls``'s defaults (loadable with ``--config`` when nothing is required)."""
    lines = [f"# {cls.__module__}.{cls.__name__}: every field with its default; edit and pass with --config"]
    section: list[str] = []
    for d in describe(cls):
        *parents, name = d.key.split(".")
        common = 0
        while common < min(len(parents), len(section)) and parents[common] == section[common]:
            common += 1
        for depth in range(common, len(parents)):
            lines.append(f"{'  ' * depth}{parents[depth]}:")
        section = parents
        required = d.default is REQUIRED
        value = "null" if required else _yaml_value(d.default)
        note = "; ".join(part for part in ("required" if required else "", d.type, d.doc) if part)
        lines.append(f"{'  ' * len(parents)}{name}: {value}  # {note}")
    return "\n".join(lines) + "\n"
