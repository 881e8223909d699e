"""The job parameters' JSON text (a header or a multipart part) -> a dict for
``InterpolationRequest.from_params``, which checks them field by field. Anything unexpected is
an ``InputError`` naming the problem, which the app turns into a 400."""

from __future__ import annotations

import json

from ...core.errors import InputError

MAX_PARAMS_BYTES = 16 * 1024


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
