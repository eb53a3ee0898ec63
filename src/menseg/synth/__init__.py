"""Synthetic meningioma engine: anatomy -> lesion -> mass effect -> oedema -> appearance -> artefacts."""
