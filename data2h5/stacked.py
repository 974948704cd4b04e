"""Compatibility: the stacked layout lives in :mod:`data2h5.layouts.stacked`, and a key's
class in :mod:`data2h5.format`."""
from .format import ROOT_CLASS, class_of  # noqa: F401
