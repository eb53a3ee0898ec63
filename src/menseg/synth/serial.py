"""Plain-dict (JSON/YAML) round trip of the synth's frozen dataclasses.

``dataclasses.asdict`` turns configs and sampled parameters into plain dicts
(tuples become lists in JSON); :func:`from_dict` rebuilds the dataclass from
its type hints, recursively (nested dataclasses, ``tuple[...]``, ``list[...]``,
``dict[str, ...]``, ``X | None``), so a case replays from its JSON sidecar.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from menseg.errors import MensegError

T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """JSON-friendly copy: dataclasses -> dict, tuples -> lists, tensors/numpy -> lists/scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except (TypeError, ValueError, MensegError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} fits none of {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} not one of {args}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple,):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
        if not args:
            return tuple(value)
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin in (list,):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        a = args[0] if args else Any
        return [_convert(a, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict,):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
        ka, va = args if args else (Any, Any)
        return {_convert(ka, k, where): _convert(va, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, float) and value.is_integer()
        ):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Rebuild dataclass ``cls`` from a plain dict (missing keys keep defaults; unknown keys error)."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise MensegError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MensegError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _convert(hints.get(k, Any), v, f"{where}.{k}")
        except (TypeError, ValueError) as e:
            raise MensegError(str(e)) from None
    return cls(**kwargs)


__all__ = ["from_dict", "to_plain"]
