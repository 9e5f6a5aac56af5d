"""Reading config input without surprises: the YAML and type checks behind :mod:`fedmem.config`.

- :func:`read_config_file`: a config file as a mapping, or one :class:`ConfigError` line for a
  missing file, a directory, an unreadable or non-UTF-8 file, a YAML syntax error (with its
  line), a duplicate key (dotted, with both lines) or a top level that is not a mapping.
- :func:`load_yaml`: YAML text (a file, or the value of a ``key=value`` override) read with
  :class:`UniqueKeyLoader`, which refuses duplicate keys instead of keeping the last one.
- :func:`misplaced_bool`: pydantic's lax mode reads ``true`` as 1 for a number; the config's
  sections call this to refuse booleans wherever a number is wanted (``train.rounds=true``).
- :func:`yes_no_word`: ``yes``/``no`` kept as words where a choice spells them so.
- :func:`dotted_key`: the dotted key of a pydantic error location, without the union-member
  tags pydantic inserts (``data.canaries.repeats``, not ``data.canaries.repeats.list[int]``).

A leaf module: it imports nothing from :mod:`fedmem.config`, which imports it.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from fedmem.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose documents are checked for duplicate mapping keys
    (:func:`load_yaml` composes, checks, then constructs)."""


class DuplicateKeyError(ValueError):
    """A mapping that sets the same key twice: dotted key, and the 1-based lines of both."""

    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"duplicate key {key}")
        self.key, self.line, self.first_line = key, line, first_line


def _key_of(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """A mapping key as YAML reads it (so ``1`` and ``0x1`` clash); unhashable: its text."""
    try:
        key = loader.construct_object(node, deep=True)
        hash(key)
        return key
    except (yaml.YAMLError, TypeError):
        return ("node", node.tag, str(node.value))


def _check_unique(loader: yaml.SafeLoader, node: yaml.Node | None, prefix: str) -> None:
    """Raise :class:`DuplicateKeyError` for the first mapping under ``node`` that repeats a key
    (merge keys ``<<`` excepted: overriding merged keys is what they are for)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = _key_of(loader, key_node)
            name = f"{prefix}{key_node.value if isinstance(key_node, yaml.ScalarNode) else key}"
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(name, line, seen[key])
            seen[key] = line
            _check_unique(loader, value_node, name + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique(loader, item, f"{prefix}{i}.")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's own text spans lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(e).split())


def load_yaml(text: str, key_prefix: str = "") -> Any:
    """YAML text as Python data; :class:`DuplicateKeyError` for a repeated key (dotted, after
    ``key_prefix``), ``yaml.YAMLError`` for bad syntax."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique(loader, node, key_prefix)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_override_value(key: str, raw: str) -> Any:
    """The value of a ``key=value`` override, read as YAML (empty: None)."""
    if not raw.strip():
        return None
    try:
        return load_yaml(raw, key + ".")
    except DuplicateKeyError as e:
        raise ConfigError(f"{key}: the value sets {e.key} twice; keep one of them") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({_yaml_problem(e)})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping (an empty file: no keys), or one ConfigError line."""
    where = f"--config: {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory; pass a YAML file (e.g. configs/default.yaml)")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; pass a YAML file from configs/")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    try:
        loaded = load_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(
            f"{where} line {e.line}: duplicate key {e.key} (first set on line {e.first_line}); "
            "keep one of them"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML ({_yaml_problem(e)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{where} must hold a mapping of sections (e.g. 'train: {{rounds: 5}}'), "
            f"not a {type(loaded).__name__}"
        )
    return loaded


# ---------------------------------------------------------------------------------------------
# types: booleans where numbers are wanted, dotted keys of pydantic errors
# ---------------------------------------------------------------------------------------------
def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type: ``int | list[int] | None`` -> [int, list[int], NoneType]."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(annotation) for m in _members(a)]
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    return [annotation]


def misplaced_bool(value: Any, annotation: Any) -> str | None:
    """Where ``value`` holds a boolean that ``annotation`` would read as a number: ``""`` for
    the value itself, ``"[i]"`` / ``"[key]"`` inside lists and dicts; None when there is none.

    Pydantic's lax mode turns ``true`` into 1 (or 1.0); a config never means that. A type that
    admits ``bool`` itself (``dict[str, float | int | bool]``) keeps its booleans.
    """
    members = _members(annotation)
    if isinstance(value, bool):
        wants_number = any(m in (int, float) for m in members)
        return "" if wants_number and bool not in members else None
    if isinstance(value, dict):
        for m in members:
            if get_origin(m) is dict and get_args(m):
                key_type, value_type = get_args(m)
                for k, v in value.items():
                    if misplaced_bool(k, key_type) is not None:
                        return f"[{k!r}] (the key)"
                    inner = misplaced_bool(v, value_type)
                    if inner is not None:
                        return f"[{k!r}]{inner}"
    if isinstance(value, list | tuple):
        for m in members:
            if get_origin(m) in (list, tuple) and get_args(m):
                for i, item in enumerate(value):
                    inner = misplaced_bool(item, get_args(m)[0])
                    if inner is not None:
                        return f"[{i}]{inner}"
    return None


def yes_no_word(value: Any, annotation: Any) -> Any:
    """``"yes"``/``"no"`` for a boolean given to a choice that spells them as words.

    YAML reads an unquoted ``yes`` as true, so ``audit.attack.fixed_variance=yes`` would reach
    pydantic as ``True`` and miss ``Literal["auto", "yes", "no"]``. Anything else is returned
    unchanged.
    """
    if not isinstance(value, bool):
        return value
    for m in _members(annotation):
        if get_origin(m) is Literal and {"yes", "no"} <= set(get_args(m)):
            return "yes" if value else "no"
    return value


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def dotted_key(loc: Sequence[Any], root: type[BaseModel]) -> str:
    """The dotted config key of a pydantic error location, walking ``root``'s fields.

    Inside a field's value, list indices and dict keys are kept; the tags pydantic adds for
    union members (``'int'``, ``'list[int]'``) and for dict keys (``'[key]'``) are dropped.
    """
    parts: list[str] = []
    model: type[BaseModel] | None = root
    annotation: Any = None
    for part in loc:
        if model is not None:
            parts.append(str(part))
            field = model.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
            model = annotation if _is_model(annotation) else None
            continue
        members = [m for m in _members(annotation) if m is not type(None)]
        if len(members) > 1:  # a union: this part names the member pydantic tried
            annotation = next((m for m in members if _tag(m) == part), None)
            continue
        container = members[0] if members else None
        if part == "[key]":
            break
        parts.append(str(part))
        args = get_args(container)
        annotation = args[-1] if get_origin(container) in (dict, list, tuple) and args else None
    return ".".join(parts) or "config"


def _tag(annotation: Any) -> str:
    """Pydantic's location tag for a union member (``int``, ``list[int]``, ``dict[str,int]``)."""
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace(" ", "")
