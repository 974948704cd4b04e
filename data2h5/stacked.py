"""Compatibility: the stacked layout lives in :mod:`data2h5.layouts.stacked`."""
from .format import ROOT_CLASS, class_of  # noqa: F401
from .layouts.stacked import StackedWriter  # noqa: F401
