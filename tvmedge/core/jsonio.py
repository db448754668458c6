"""JSON as every ``--json`` prints it: strict (no bare ``NaN``/``Infinity``, which JSON does not
have), non-finite numbers written as ``null``, numpy scalars as plain numbers."""

from __future__ import annotations

import json
import math
from typing import Any


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return _clean(obj.item())
    return obj


def dumps(obj: Any) -> str:
    """``obj`` as strict JSON (non-finite floats -> null)."""
    return json.dumps(_clean(obj), allow_nan=False, default=float)
