"""Job parameters (JSON) -> InterpolationRequest, checked field by field.

Anything unexpected gets an ``InputError`` naming the field, which the app turns into a 400."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ...core.errors import InputError
from ...core.grid import DEFAULT_SPACING_MM
from ..nrrd_bytes import geometry_from_dict
from ...api import DEFAULT_METHOD, InterpolationRequest, available_methods

ALLOWED_FIELDS = ("method", "spacing", "target", "model", "steps", "sampler", "samples", "consistency", "seed")
MAX_PARAMS_BYTES = 16 * 1024
MAX_STEPS = 1000
MAX_SAMPLES = 16
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")


def parse_params(text: str | bytes | None) -> dict:
    if text is None or (isinstance(text, (bytes, str)) and not text.strip()):
        return {}
    if len(text) > MAX_PARAMS_BYTES:
        raise InputError(f"the job parameters are longer than {MAX_PARAMS_BYTES // 1024} KiB")
    try:
        params = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InputError(f"the job parameters are not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise InputError("the job parameters must be a JSON object")
    return params


def _integer(params: dict, key: str, low: int, high: int):
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _identifier(params: dict, key: str):
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise InputError(f"{key} must be a name of letters, digits and _.+- (at most 128), got {str(value)[:40]!r}")
    return value


def request_from_params(params: dict[str, Any], device: str = "auto", default_method: str = DEFAULT_METHOD) -> InterpolationRequest:
    """``default_method``: used when the job names none (the server's default model, or B-spline
    on a server that serves no model)."""
    unknown = sorted(set(params) - set(ALLOWED_FIELDS))
    if unknown:
        raise InputError(f"unknown job parameter(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED_FIELDS)}")
    method = params.get("method") or default_method
    if method not in available_methods():
        raise InputError(f"unknown method {str(method)[:40]!r}; choose one of {', '.join(available_methods())}")
    spacing = params.get("spacing", DEFAULT_SPACING_MM)
    if spacing is None:
        spacing = DEFAULT_SPACING_MM
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not math.isfinite(spacing) or spacing <= 0:
        raise InputError(f"spacing must be a positive number of mm, got {spacing!r}")
    target = params.get("target")
    consistency = params.get("consistency", True)
    if not isinstance(consistency, bool):
        raise InputError(f"consistency must be true or false, got {consistency!r}")
    return InterpolationRequest(
        method=method,
        spacing=float(spacing),
        target=None if target is None else geometry_from_dict(target),
        model=_identifier(params, "model"),
        steps=_integer(params, "steps", 1, MAX_STEPS),
        sampler=_identifier(params, "sampler"),
        samples=_integer(params, "samples", 1, MAX_SAMPLES) or 1,
        consistency=consistency,
        seed=_integer(params, "seed", 0, 2**63 - 1),
        device=device,
    )
