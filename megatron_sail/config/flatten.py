"""Nested config dicts as flat dotted keys, the form in which two configs are compared field by
field (a checkpoint's model config against the recipe's, a YAML model block against either)."""
from __future__ import annotations


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'c': 2} -> {'a.b': 1, 'c': 2} (lists and other values are leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
