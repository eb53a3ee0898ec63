"""Data: NIfTI I/O, layouts, validation, preprocessing, datasets."""
