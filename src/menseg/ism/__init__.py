"""ISM: Implicit Spatiotemporal Mixing (DESIGN.md, idea 1).

- :mod:`menseg.ism.fields`: implicit mixing fields ``lambda(p, t; z)`` in [0, 1], functions of
  physical coordinates (mm) and time (days), sampled at any resolution.
- :mod:`menseg.ism.spatial`: spatial mixing of two sources in the U-Net's feature space through a
  field and a learned non-linear fusion (training only), and the matching soft targets.

Layer rank: the same as :mod:`menseg.nets` (may import constants, errors, utils, config, geometry,
data and nets; never infer, train, bench or cli).
"""

from __future__ import annotations

from menseg.ism.fields import FieldConfig, MixField, field_on_grid, grid_points, sample_field
from menseg.ism.spatial import (
    FeatureFusion,
    FieldBatch,
    SpatialMixConfig,
    SpatialMixer,
    mix_targets,
    sample_field_batch,
)

__all__ = [
    "FeatureFusion",
    "FieldBatch",
    "FieldConfig",
    "MixField",
    "SpatialMixConfig",
    "SpatialMixer",
    "field_on_grid",
    "grid_points",
    "mix_targets",
    "sample_field",
    "sample_field_batch",
]
