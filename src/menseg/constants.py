"""Conventions of the field, defined once (see DESIGN.md).

Labels follow BraTS-MEN: 0 background, 1 NETC, 2 SNFH, 3 ET.
Regions are evaluated and trained as nested binary masks.
"""

from __future__ import annotations

#: MRI sequences in the one fixed channel order used everywhere.
MODALITIES: tuple[str, ...] = ("t1c", "t1n", "t2f", "t2w")
#: File suffix of the label map in the BraTS layout.
SEG_SUFFIX = "seg"
#: Valid label values.
LABELS: tuple[int, ...] = (0, 1, 2, 3)
LABEL_NAMES: dict[int, str] = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}
#: Region name -> labels it contains. The order is the network's output channel order.
REGIONS: dict[str, tuple[int, ...]] = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
REGION_NAMES: tuple[str, ...] = tuple(REGIONS)
