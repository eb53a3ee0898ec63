"""Tissue classes shared by every synthesis stage, and their BraTS-MEN labels.

Anatomy produces the healthy classes; the lesion stage paints the lesion
classes over them. Appearance models give each class an intensity per
sequence. ``TISSUE_TO_LABEL`` turns a tissue map into the BraTS-MEN label map.
"""

from __future__ import annotations

import torch

BACKGROUND = 0
WM = 1  #: white matter
GM = 2  #: grey matter (cortex and deep grey nuclei)
CSF = 3  #: sulcal / cisternal CSF
VENTRICLE = 4  #: ventricular CSF
DURA = 5  #: dura mater, falx and tentorium (where meningiomas attach)
TUMOUR = 6  #: enhancing meningioma tissue (ET)
CYST = 7  #: intratumoural cyst (NETC)
NECROSIS = 8  #: necrosis (NETC)
CALCIFICATION = 9  #: calcification (NETC)
OEDEMA = 10  #: peritumoural vasogenic oedema (SNFH)
DURAL_TAIL = 11  #: enhancing thickened dura next to the tumour (not labelled tumour by default)

TISSUE_NAMES: dict[int, str] = {
    BACKGROUND: "background", WM: "wm", GM: "gm", CSF: "csf", VENTRICLE: "ventricle", DURA: "dura",
    TUMOUR: "tumour", CYST: "cyst", NECROSIS: "necrosis", CALCIFICATION: "calcification",
    OEDEMA: "oedema", DURAL_TAIL: "dural_tail",
}
N_TISSUES = len(TISSUE_NAMES)
HEALTHY = (WM, GM, CSF, VENTRICLE, DURA)
LESION = (TUMOUR, CYST, NECROSIS, CALCIFICATION, OEDEMA, DURAL_TAIL)

#: BraTS-MEN label of each tissue (1 NETC, 2 SNFH, 3 ET).
TISSUE_TO_LABEL: dict[int, int] = {
    BACKGROUND: 0, WM: 0, GM: 0, CSF: 0, VENTRICLE: 0, DURA: 0,
    TUMOUR: 3, CYST: 1, NECROSIS: 1, CALCIFICATION: 1, OEDEMA: 2, DURAL_TAIL: 0,
}


def tissue_to_label(tissue: torch.Tensor) -> torch.Tensor:
    """BraTS-MEN label map (uint8, same shape) of an integer tissue map."""
    lut = torch.tensor([TISSUE_TO_LABEL[t] for t in range(N_TISSUES)], dtype=torch.uint8,
                       device=tissue.device)
    return lut[tissue.long()]
