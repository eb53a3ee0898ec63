"""Inference: sliding-window prediction, mirroring, post-processing, writing labels back.

- :func:`menseg.infer.sliding.predict_probs` — preprocessed volume -> region probabilities.
- :mod:`menseg.infer.postprocess` — probabilities -> label map, tiny-component removal.
- :func:`menseg.infer.predict.predict` — ``menseg predict MODEL INPUT OUTPUT``.
"""

from __future__ import annotations

from typing import Any

from menseg.infer.postprocess import regions_to_labels, remove_small_components
from menseg.infer.sliding import predict_probs, resolve_device


def __getattr__(name: str) -> Any:
    # predict pulls in the data I/O stack; import it only when asked for.
    if name == "predict":
        from menseg.infer.predict import predict

        return predict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["predict", "predict_probs", "regions_to_labels", "remove_small_components", "resolve_device"]
