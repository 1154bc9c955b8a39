"""The one config mechanism of both command lines: dataclasses are the single source of defaults and help.

Each concern has a dataclass whose fields carry a default and a one-line docstring underneath. From those:

* `load` builds a config from defaults <- a YAML file <- dotted overrides (``optim.lr=1e-5``), the way the
  training CLI takes its settings (values parse as YAML scalars and lists; numbers written as strings coerce);
* `add_flags` / `flag_values` generate argparse flags (``--clips-per-shard``) from the same fields, the way
  the preprocessing CLI takes its settings;
* `describe` lists every setting with its type, default and docstring, for ``--help``.

Every value is validated by the dataclasses themselves (``__post_init__`` raising ValueError naming the field).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import os
import sys
import textwrap
import typing
from typing import Any

import yaml

# ----------------------------------------------------------------------------- reading the dataclasses


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (first paragraph, one line)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and _is_docstring(after):
            docs[node.target.id] = " ".join(after.value.value.split("\n\n")[0].split())
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs = {**field_docs(base), **docs}
    return docs


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value, or dataclasses.MISSING when it is required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    options = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "{" + ",".join(str(m.value) for m in hint) + "}"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, docstring) of every setting, sections expanded."""
    rows, docs, types_ = [], field_docs(cls), hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = section_type(types_[f.name])
        if sub is not None:
            rows += describe(sub, f"{prefix}{f.name}.")
            continue
        default = default_of(f)
        shown = "(required)" if default is dataclasses.MISSING else repr(_plain(default))
        rows.append((f"{prefix}{f.name}", type_name(types_[f.name]), shown, docs.get(f.name, "")))
    return rows


def settings_help(cls: type) -> str:
    """Every setting as ``name (type, default): doc``, for an argparse epilog."""
    lines = []
    for name, kind, default, doc in describe(cls):
        lines.append(f"  {name} ({kind}, default {default})")
        lines += textwrap.wrap(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- building from plain data


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """A validated ``cls`` from nested plain data; unknown keys and bad types are ValueErrors naming the key."""
    types_ = hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        sub = section_type(types_[name])
        if sub is not None and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping, got {value!r}")
            value = build(sub, value, f"{prefix}{name}.")
        else:
            value = coerce(value, types_[name], f"{prefix}{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Numbers written as strings (YAML reads ``3e-3`` as a string) become int/float; bad types fail."""
    options = set(typing.get_args(hint) or (hint,))
    if type(None) in options and value in ("None", "none", "null"):
        return None
    numeric = {float, int} & options
    if not numeric or isinstance(value, bool) or value is None:
        return value
    if float in numeric and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if int in numeric and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            if str in options:  # a word the field allows besides numbers (e.g. "auto"): its own check decides
                return value
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    return value


def to_dict(cfg: Any) -> dict:
    """Plain-data (YAML-safe) view of a config dataclass."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    return value


def flatten(values: Any, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; an empty dict is a leaf."""
    if not isinstance(values, dict) or not values:
        return {prefix: values}
    out: dict = {}
    for key, value in values.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


# ----------------------------------------------------------------------------- YAML and dotted overrides


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``a.b=value`` strings -> nested dict; values are parsed as YAML (numbers, bools, lists)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str) -> dict:
    """A YAML mapping, or a ValueError naming the file."""
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path!r}: expected a mapping at the top level")
    return loaded


def load_values(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Plain values: a YAML file (optional) <- dotted overrides."""
    values = read_yaml(path) if path is not None else {}
    return merge(values, parse_overrides(overrides or []))


def dump_yaml(values: dict, path: str, notes: tuple[str, ...] | list[str] = ()) -> None:
    """``values`` as YAML at ``path``; each of ``notes`` leads it as a ``# note:`` comment line."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"# note: {note}\n" for note in notes)
        yaml.safe_dump(values, f, sort_keys=False)


# ----------------------------------------------------------------------------- generated flags


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    dest: str,
    prefix: str = "",
    names: dict[str, str] | None = None,
    only: tuple[str, ...] | None = None,
    optional: bool = False,
    title: str | None = None,
) -> None:
    """One ``--<prefix><field>`` flag per field of ``cls`` (sections are not expanded), help and default from
    the dataclass. ``names`` gives a field another flag name, ``only`` limits the fields; with ``optional``
    the section may be left out entirely, so its required fields are not required flags.

    Values land under ``<dest>.<field>`` in the namespace and are read back by `flag_values`. Flags that are
    not given are absent from the namespace, so the dataclass defaults apply.
    """
    group = parser.add_argument_group((title or (cls.__doc__ or cls.__name__).strip().split("\n")[0]).rstrip("."))
    docs, types_ = field_docs(cls), hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or section_type(types_[f.name]) is not None or (only and f.name not in only):
            continue
        flag = (names or {}).get(f.name, prefix + f.name.replace("_", "-"))
        default = default_of(f)
        required = default is dataclasses.MISSING and not optional
        shown = f"default: {_shown(default)}"
        if default is dataclasses.MISSING:
            shown = "setting it turns this section on" if optional else "required"
        group.add_argument(
            f"--{flag}",
            dest=f"{dest}.{f.name}",
            default=argparse.SUPPRESS,
            required=required,
            help=f"{docs.get(f.name, '')} ({shown})".replace("%", "%%"),
            **_flag_kind(types_[f.name]),
        )


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _flag_kind(hint: Any) -> dict:
    options = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    base = options[0] if len(options) == 1 and typing.get_origin(hint) is not tuple else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return {"choices": [m.value for m in base], "type": str}
    if typing.get_origin(base) is tuple and typing.get_args(base) == (int, int):
        return {"type": _size, "metavar": "WxH"}
    if typing.get_origin(base) is tuple:
        return {"type": _str_tuple, "metavar": "A,B,..."}
    if base in (int, float):
        return {"type": _number(base), "metavar": base.__name__.upper()}
    return {"type": str, "metavar": "VALUE"}


def _number(kind: type):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _size(text: str) -> tuple[int, int]:
    """``224x224`` -> (224, 224)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 224x224, got {text!r}") from None
    return width, height


def _str_tuple(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b")."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def flag_values(args: argparse.Namespace, dest: str) -> dict:
    """The flags given for section ``dest``, as {field: value}."""
    head = f"{dest}."
    return {name[len(head) :]: value for name, value in vars(args).items() if name.startswith(head)}


def prog(module_form: str) -> str:
    """The program name of a usage line: the installed command's (``vidproxy-evaluate``, setup.cfg) when it runs as
    one, else ``module_form`` (``python -m train.evaluate``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("vidproxy-") else module_form


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The ``--help`` layout of every command line: the description as written, and every default shown
    (unless the help already says it, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"
