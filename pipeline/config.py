"""Typed dataclass configs and `key=value` overrides.

One way to set a value: the dataclass default, a named preset (a list of
overrides), then the user's `key=value` overrides, applied in that order.
`stage.field=value` reaches a field of a stage config; `field=value` without a
dot reaches the run-wide `RunConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A key that does not exist or a value that does not parse as the field's type."""


@dataclasses.dataclass
class RunConfig:
    """Settings shared by every stage of a run."""

    threads: int = 1  # torch intra-op threads (per rank); 1 is fastest on shared 2-core machines
    seed: int = 1234
    world_size: int = 1  # ranks of the multi-rank stages (pretrain, sft, align); set by --nproc-per-node
    stage_ranks: tuple[str, ...] = ()  # "stage=N": ranks of one multi-rank stage (from the cluster profile, or
    # given, e.g. stage_ranks=pretrain=1 with --nproc-per-node 2: keep the one-rank pretrain, sft/align on 2)

    def ranks_of(self, name: str, multi_rank: bool) -> int:
        """Return the processes stage `name` is planned as: 1 for a one-process stage, else its stage_ranks
        entry, else world_size. Raises ConfigError on a stage_ranks entry that is not `stage=N`."""
        if not multi_rank:
            return 1
        sizes = {}
        for entry in self.stage_ranks:
            stage, sep, size = entry.partition("=")
            if not sep or not size.isdigit() or int(size) < 1:
                raise ConfigError(f"stage_ranks: {entry!r} is not stage=N (N a positive number of ranks)")
            sizes[stage] = int(size)
        return sizes.get(name, self.world_size)


def _parse_value(text: str, typ: Any, key: str) -> Any:
    """Return `text` converted to `typ` (int, float, bool, str, Optional, list/tuple)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, args[0], key)
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1] or (str,)
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: {text!r} is not a JSON list ({exc})") from None
            if not isinstance(items, list):
                raise ConfigError(f"{key}: {text!r} is not a JSON list")
        else:
            items = [t for t in text.split(",") if t != ""]
        parsed = [_parse_value(str(i), item, key) for i in items]
        return tuple(parsed) if origin is tuple else parsed
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {text!r}")
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {text!r}") from None
    return text


def set_field(obj: Any, dotted: str, text: str, full_key: str | None = None) -> None:
    """Set `obj.<dotted>` from the string `text`, parsed by the field's declared type."""
    full_key = full_key or dotted
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise ConfigError(
            f"unknown key {full_key!r}; {type(obj).__name__} has: {', '.join(sorted(fields))}"
        )
    if rest:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{full_key!r}: {head} is not a config section")
        set_field(child, rest, text, full_key)
        return
    hints = typing.get_type_hints(type(obj))
    setattr(obj, head, _parse_value(text, hints[head], full_key))


def apply_overrides(configs: dict[str, Any], overrides: list[str]) -> None:
    """Apply `key=value` strings to a dict of section name -> dataclass, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        section, dot, rest = key.partition(".")
        if not dot:
            section, rest = "run", key
        if section not in configs:
            raise ConfigError(f"unknown section {section!r} in {item!r}; sections: {', '.join(configs)}")
        set_field(configs[section], rest, value, key)


def to_dict(cfg: Any) -> dict:
    """Return a JSON-ready dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type, data: dict) -> Any:
    """Return an instance of dataclass `cls` built from `to_dict` output."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = from_dict(typ, value)
        elif typing.get_origin(typ) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
