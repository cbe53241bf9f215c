"""Import a training framework for a test, or skip it where the framework is not installed.

``scripts/test.sh`` installs the frameworks (the ``integrations`` extra) and sets
``ADAMS_DIST_FRAMEWORKS=required``: there a missing framework fails instead of skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def needs(module: str) -> ModuleType:
    if os.environ.get("ADAMS_DIST_FRAMEWORKS") == "required":
        return importlib.import_module(module)
    return pytest.importorskip(module)
