"""Property-based: random invalid values at every config key (issue 11, "Done when").

Every key of :class:`ExperimentConfig` (walked recursively through the sections, so a field
added later is fuzzed too) gets values that its type or constraints rule out: booleans where a
number is wanted, words, lists, dicts, ``nan``/``inf``, numbers out of range, choices not
offered, unknown keys. Each must give a :class:`ConfigError` naming the dotted key, through a
YAML file and through a ``key=value`` override; through the CLI, exit code 2 with one line, no
traceback and no run directory.

What is invalid is derived from the annotation and the ``Field`` constraints alone; checks made
by custom validators (e.g. canary repeats >= 1) are covered in ``test_config.py``.
"""

from __future__ import annotations

import itertools
import math
import re
import string
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedmem import config
from fedmem.config import ConfigError, ExperimentConfig
from fedmem.simulate import main
from tests.conftest import simulate_cli


# ---------------------------------------------------------------------------------------------
# the keys
# ---------------------------------------------------------------------------------------------
def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def walk(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo | type]]:
    """(dotted key, FieldInfo) for every leaf and (dotted key, model) for every section."""
    out: list[tuple[str, FieldInfo | type]] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if _is_section(field.annotation):
            out.append((key, field.annotation))
            out += walk(field.annotation, key + ".")
        else:
            out.append((key, field))
    return out


KEYS = [("", ExperimentConfig), *walk(ExperimentConfig)]  # "": unknown top-level keys
LEAVES = {k: f for k, f in KEYS if isinstance(f, FieldInfo)}
SECTIONS = {k: m for k, m in KEYS if not isinstance(m, FieldInfo)}


# ---------------------------------------------------------------------------------------------
# invalid values, by type
# ---------------------------------------------------------------------------------------------
BOOL_WORDS = {"0", "1", "off", "on", "f", "t", "false", "true", "n", "no", "y", "yes"}
WORDS = st.text(string.ascii_letters, min_size=1, max_size=8).filter(
    lambda w: w.lower() not in BOOL_WORDS
)
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])
FRACTIONS = st.floats(-1e6, 1e6).filter(lambda x: x != int(x))
NUMBERS = st.integers(-1000, 1000) | st.floats(-1e6, 1e6)
LISTS = st.lists(st.integers(0, 9), max_size=3)
WORD_DICTS = st.dictionaries(WORDS, st.integers(0, 9), min_size=1, max_size=2)


def _members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _out_of_range(kind: type, metadata: list[Any]) -> list[st.SearchStrategy]:
    """Numbers just outside each ``ge``/``gt``/``le``/``lt`` bound of a field."""
    out = []
    for m in metadata:
        if kind is int:
            if isinstance(m, at.Ge):
                out.append(st.integers(m.ge - 1000, math.ceil(m.ge) - 1))
            elif isinstance(m, at.Gt):
                out.append(st.integers(m.gt - 1000, math.floor(m.gt)))
            elif isinstance(m, at.Le):
                out.append(st.integers(math.floor(m.le) + 1, m.le + 1000))
            elif isinstance(m, at.Lt):
                out.append(st.integers(math.ceil(m.lt), m.lt + 1000))
        elif isinstance(m, at.Ge):
            out.append(st.floats(m.ge - 1e3, m.ge).filter(lambda x, b=m.ge: x < b))
        elif isinstance(m, at.Gt):
            out.append(st.floats(m.gt - 1e3, m.gt))
        elif isinstance(m, at.Le):
            out.append(st.floats(m.le, m.le + 1e3).filter(lambda x, b=m.le: x > b))
        elif isinstance(m, at.Lt):
            out.append(st.floats(m.lt, m.lt + 1e3))
    return out


def invalid_scalar(annotation: Any, metadata: list[Any]) -> st.SearchStrategy:
    """Values invalid for a single (non-container) type: int, float, bool, str, Path, Literal."""
    if annotation is int:
        kinds = [st.booleans(), WORDS, LISTS, WORD_DICTS, NON_FINITE, FRACTIONS]
        return st.one_of(*kinds, *_out_of_range(int, metadata))
    if annotation is float:
        return st.one_of(
            st.booleans(), WORDS, LISTS, WORD_DICTS, NON_FINITE, *_out_of_range(float, metadata)
        )
    if annotation is bool:
        odd = NUMBERS.filter(lambda x: x not in (0, 1))
        return st.one_of(WORDS, LISTS, WORD_DICTS, NON_FINITE, odd)
    if get_origin(annotation) is Literal:
        allowed = set(get_args(annotation))
        flags = st.booleans() if not {"yes", "no"} <= allowed else st.nothing()
        return st.one_of(WORDS.filter(lambda w: w not in allowed), NUMBERS, flags, LISTS)
    if annotation is str or annotation is Path:
        pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
        bad_text = (
            st.text(string.printable.strip() + " ", max_size=8).filter(
                lambda s: not re.fullmatch(pattern, s)
            )
            if pattern
            else st.nothing()
        )
        return st.one_of(st.booleans(), NUMBERS, LISTS, WORD_DICTS, bad_text)
    raise NotImplementedError(f"no invalid values for {annotation}: teach this test the type")


def invalid_values(field: FieldInfo) -> st.SearchStrategy:
    """Values ``field`` must refuse, built from its annotation (unions, lists, dicts included)."""
    members = [m for m in _members(field.annotation) if m is not type(None)]
    optional = type(None) in _members(field.annotation)
    none = st.nothing() if optional else st.just(None)
    origins = {get_origin(m) for m in members}
    if dict in origins:
        (dict_type,) = [m for m in members if get_origin(m) is dict]
        key_type, value_type = get_args(dict_type)
        bad_value = invalid_scalar(_members(value_type)[0], [])
        if len(_members(value_type)) > 1:  # float | int | bool: only non-numbers, non-flags
            bad_value = st.one_of(WORDS, LISTS, NON_FINITE)
        good_key = st.integers(0, 3) if key_type is int else WORDS
        entries = [st.dictionaries(good_key, bad_value, min_size=1, max_size=2)]
        if key_type is int:
            entries.append(st.dictionaries(WORDS, st.just(0.1), min_size=1, max_size=2))
        return st.one_of(WORDS, NUMBERS, st.booleans(), LISTS, none, *entries)
    if list in origins:
        (list_type,) = [m for m in members if get_origin(m) is list]
        (item_type,) = get_args(list_type)
        if item_type is int:
            bad_item = st.one_of(st.booleans(), WORDS, NON_FINITE, FRACTIONS)
        else:  # list[str]
            bad_item = st.one_of(NUMBERS, st.booleans(), LISTS)
        bad_list = st.lists(bad_item, min_size=1, max_size=3)
        scalars = [m for m in members if get_origin(m) is not list]
        if scalars:  # int | list[int]: what neither member takes
            return st.one_of(
                st.booleans(), WORDS, NON_FINITE, FRACTIONS, WORD_DICTS, bad_list, none
            )
        return st.one_of(WORDS, NUMBERS, st.booleans(), WORD_DICTS, bad_list, none)
    if Literal in origins and Annotated in origins:  # a bounded int or a word (threads: auto)
        words = {a for m in members if get_origin(m) is Literal for a in get_args(m)}
        (number,) = [m for m in members if get_origin(m) is Annotated]
        bounds = [b for m in get_args(number)[1:] for b in getattr(m, "metadata", [m])]
        return st.one_of(
            st.booleans(),
            WORDS.filter(lambda w: w not in words),
            NON_FINITE,
            FRACTIONS,
            LISTS,
            WORD_DICTS,
            *_out_of_range(int, bounds),
            none,
        )
    (scalar,) = members
    return st.one_of(invalid_scalar(scalar, field.metadata), none)


def unknown_keys(section: type[BaseModel]) -> st.SearchStrategy:
    return WORDS.filter(lambda w: w not in section.model_fields)


def bad_cases(key: str) -> st.SearchStrategy:
    """(dotted key to set, value, dotted key the error must name) for one config key."""
    if key in SECTIONS:
        prefix = f"{key}." if key else ""
        unknown = unknown_keys(SECTIONS[key]).map(lambda w: (prefix + w, 1, prefix + w))
        if not key:
            return unknown
        not_a_mapping = st.one_of(WORDS, NUMBERS, st.booleans(), LISTS)
        return not_a_mapping.map(lambda v: (key, v, key)) | unknown
    return invalid_values(LEAVES[key]).map(lambda v: (key, v, key))


def flow(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    text = text.removesuffix("...").strip()
    back = yaml.safe_load(text)
    assert repr(back) == repr(value), (value, text)
    return text


def nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# ---------------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------------
def test_the_walk_covers_the_whole_schema():
    """Every leaf has a strategy (a new type makes this fail, not silently skip the key)."""
    assert {"seed", "train.rounds", "federation.client_resources.num_gpus"} <= set(LEAVES)
    assert {"data.noise", "audit.attack"} <= set(SECTIONS)
    for key, _ in KEYS:
        bad_cases(key)  # builds every strategy: an unknown type raises here


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("key", [k for k, _ in KEYS])
@settings(
    max_examples=16,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_every_key_refuses_invalid_values(key, yaml_dir, data):
    target, value, named = data.draw(bad_cases(key), label="case")
    if data.draw(st.booleans(), label="through a file"):
        path = yaml_dir / "c.yaml"
        path.write_text(yaml.safe_dump(nested(target, value)))
        args: tuple = (path, [])
    else:
        args = (None, [f"{target}={flow(value)}"])
    with pytest.raises(ConfigError) as exc:
        config.load(*args)
    msg = str(exc.value)
    assert named in msg and "\n" not in msg, (target, value, msg)


RUN_COUNTER = itertools.count()
CLI_KEYS = [k for k, _ in KEYS if k not in ("output", "output.dir")]  # --out sets output.dir


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_cli_exits_2_on_one_line_and_writes_nothing(yaml_dir, capsys, data):
    key = data.draw(st.sampled_from(CLI_KEYS), label="key")
    target, value, named = data.draw(bad_cases(key), label="case")
    out = yaml_dir / f"out{next(RUN_COUNTER)}"
    capsys.readouterr()
    code = main(["--out", str(out), f"{target}={flow(value)}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert not out.exists()


@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_real_cli_in_a_subprocess(tmp_path_factory, data):
    """Two runs of ``python -m fedmem.simulate``: the same, from a fresh interpreter."""
    key = data.draw(st.sampled_from(CLI_KEYS), label="key")
    target, value, named = data.draw(bad_cases(key), label="case")
    out = tmp_path_factory.mktemp("cli") / "runs"
    proc = simulate_cli("--out", str(out), f"{target}={flow(value)}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
