"""Plain-dict (JSON/YAML) round trip of the synth's frozen dataclasses.

:func:`to_plain` turns configs and sampled parameters into plain dicts (tuples become lists);
:func:`from_dict` rebuilds the dataclass from its type hints, recursively (nested dataclasses,
``tuple[...]``, ``list[...]``, ``dict[str, ...]``, ``X | None``), so a case replays from its JSON
sidecar. The parser is :func:`menseg.config.from_dict`, shared with the run configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from menseg.config import from_dict as config_from_dict

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


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Rebuild dataclass ``cls`` from a plain dict (missing keys keep defaults; unknown keys error).

    :func:`menseg.config.from_dict`, the one parser, with errors naming the value from the class down
    (``key 'LesionParams.lesions[0].radius_mm' must be a number``).
    """
    return config_from_dict(cls, data, where or cls.__name__, kind="key")


__all__ = ["from_dict", "to_plain"]
