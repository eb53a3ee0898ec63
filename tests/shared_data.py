"""The shared data folder beside the repository (not a test module).

``shared/`` is provisioned next to the checkout (the repository root's parent), for a
developer and for CI alike, so it is found from this file rather than from a fixed path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: ``<repository root>/../shared``.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
#: Real scans without labels (BraTS layout, mixed orientations).
REAL_UNLABELED = SHARED / "data" / "real-unlabeled"

#: Skip a test, naming the missing folder, when the real unlabelled scans are not there.
needs_real_unlabeled = pytest.mark.skipif(
    not REAL_UNLABELED.is_dir(), reason=f"real unlabelled scans not available: {REAL_UNLABELED} is missing"
)
