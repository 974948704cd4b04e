"""Reader plugin for JSON files: numeric arrays become numpy arrays, anything else text.

::

    data2h5 convert --path-images DIR --path-output out.h5 --ext json \\
        --reader plugins/json_reader.py:read

A JSON array of numbers (nested to any depth, rectangular) is stored as a numpy array:
bool if every value is true/false, int64 if every value is an integer, else float64.
Every other document (objects, strings, ragged or mixed arrays, empty arrays) is stored as
canonical UTF-8 text: keys sorted, no extra spaces, non-ASCII kept as is, so two files
holding the same data store the same bytes.
"""
from __future__ import annotations

import json
from typing import Union

import numpy as np


def read(path: str) -> Union[np.ndarray, str]:
    """Parse the JSON file at ``path``; see the module docstring for what comes back."""
    with open(path, "rb") as fh:
        doc = json.loads(fh.read())
    array = _numeric_array(doc)
    if array is not None:
        return array
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _numeric_array(doc) -> Union[np.ndarray, None]:
    """``doc`` as a bool, int64 or float64 array, or None if it is not a rectangular numeric array."""
    if not isinstance(doc, list) or not doc:
        return None
    leaves = _leaves(doc)
    if leaves is None or not leaves:
        return None
    if all(isinstance(v, bool) for v in leaves):
        dtype = np.bool_
    elif any(isinstance(v, bool) for v in leaves):
        return None  # true/false mixed with numbers: keep the text, not a guess
    elif all(isinstance(v, int) for v in leaves):
        dtype = np.int64
    else:
        dtype = np.float64
    try:
        array = np.array(doc, dtype=dtype)
    except (ValueError, OverflowError):  # ragged, or an integer beyond int64
        return None
    return array if array.size == len(leaves) else None


def _leaves(node) -> Union[list, None]:
    """The scalars of a nested list, or None if any is not a number or bool."""
    if isinstance(node, list):
        out = []
        for item in node:
            sub = _leaves(item)
            if sub is None:
                return None
            out.extend(sub)
        return out
    return [node] if isinstance(node, (bool, int, float)) else None
