#!/usr/bin/env python
"""Thin wrapper of ``python -m megatron_sail.generate`` (same flags; see docs/inference.md)."""

from __future__ import annotations

from megatron_sail import cli
from megatron_sail.generate import main

if __name__ == "__main__":
    cli.run(main)
