"""Typed, validated stage configs that serialize to YAML/JSON next to every output.

Each stage owns one dataclass deriving from :class:`Config`. ``from_dict`` checks field names
and types (so a typo in a YAML file is an error naming the field, never a silent default),
``validate`` checks ranges, and ``save``/``load`` use safe YAML only.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from raysrec.errors import ConfigError

C = TypeVar("C", bound="Config")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type annotation, converting where lossless."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return annotation.from_dict(value, where=where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (datetime.date, datetime.datetime)):   # YAML reads an unquoted 2024-01-31 as a date
            return value.isoformat()
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


@dataclasses.dataclass
class Config:
    """Base of every stage config: strict construction from dicts, YAML round-trips."""

    def validate(self) -> None:
        """Check value ranges; subclasses raise :class:`ConfigError` naming the field."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
        where = where or cls.__name__
        label = where.rstrip(":")
        if not isinstance(data, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{label}: unknown field(s) {unknown}; known fields: {sorted(names)}")
        # A file's fields read "FILE: train.lr"; a class's "TrainConfig.lr".
        prefix = f"{where[:-1]}: " if where.endswith(":") else f"{where}."
        kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
        try:
            obj = cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{label}: {exc}") from None
        obj.validate()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_dict(merged)

    def save(self, path: str | Path) -> None:
        """Write the config (credentials inside URIs redacted: saved configs travel with the outputs)."""
        path = Path(path)
        data = _redact_tree(self.to_dict())
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_yaml(path, "config file") or {}, where=f"{path}:")


_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(?:key|secret|token|password|passwd|credential|signature|sig)[^=&#]*=)[^&#]*")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]+@")


def redact(text: str) -> str:
    """``text`` with credentials inside URIs replaced by ``***``: user:password@ and secret-looking
    query parameters (``s3://bucket?access_key=..&secret_key=..``). Everything raysrec prints or
    writes about a storage location goes through this."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def redact_tree(value: Any) -> Any:
    """``value`` (dicts, lists, strings) with :func:`redact` applied to every URI in it."""
    return _redact_tree(value)


def _redact_tree(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: _redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_tree(v) for v in value]
    return value


def read_yaml(path: str | Path, what: str) -> Any:
    """Safe-load a YAML (or JSON) file; :class:`ConfigError` naming the file if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())  # JSON is a subset of YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from None


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def option(default: Any, help: str) -> Any:
    """A config field with its help text: the one declaration the CLI builds its option from."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_of(cls: type[Config], path: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field and type annotation at a dotted ``path`` of a config class (``model.max_length``)."""
    *parents, leaf = path.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
        options = [a for a in get_args(cls) if a is not type(None)]   # Optional[EmbedConfig] -> EmbedConfig
        cls = options[0] if options else cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if leaf not in fields:
        raise KeyError(f"{cls.__name__} has no field {leaf!r}")
    return fields[leaf], typing.get_type_hints(cls)[leaf]
