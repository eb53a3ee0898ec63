"""Tests of menseg.sim2real."""
