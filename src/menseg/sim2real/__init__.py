"""Sim2Real: bring synthetic cases closer to real scans.

``translator``: a 3D cycle-consistent image translator (synthetic <-> real) with a
lesion-keeping semantic term; ``gap``: how far a set of images is from real ones
(domain classifier accuracy and per-tissue intensity distances); ``align``: feature
alignment losses for segmentation training.
"""
