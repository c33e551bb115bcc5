"""The OCI bundle reader: a bundle's ``config.json`` parsed in one place, for
the runtime, the shim and ``pykata-runtime``.

Rules:

- ``load_spec(bundle)`` returns the spec as a dict, or raises
  ``errors.InvalidArgument`` with one line saying which of these it is: the
  bundle does not exist, it has no config.json, config.json is unreadable, it
  is not JSON, it is not a JSON object. What the spec must contain beyond that
  (process.args, root.path, ...) is checked by its users.
- ``load_spec_or_empty(bundle)`` is the same read for callers that must go on
  without a spec (the shim's ``start``/``delete`` of a bundle already gone): ``{}``.
- ``spec_annotations(spec)`` is the spec's string-valued annotations (``{}`` when
  there are none, or when ``annotations`` is not an object).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pykata import errors

CONFIG = "config.json"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_spec(bundle: str | Path) -> dict[str, Any]:
    """The bundle's config.json as a dict (InvalidArgument, one line, otherwise)."""
    bundle = Path(bundle)
    path = bundle / CONFIG
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not bundle.is_dir():
            raise errors.InvalidArgument(f"bundle {bundle} does not exist") from None
        raise errors.InvalidArgument(f"bundle {bundle} has no {CONFIG}") from None
    except OSError as exc:
        raise errors.InvalidArgument(
            f"cannot read {path}: {_one_line(exc.strerror or exc)}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also undecodable bytes (UnicodeDecodeError)
        raise errors.InvalidArgument(f"{path} is not JSON: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise errors.InvalidArgument(
            f"{path} is not a JSON object (a {type(data).__name__})")
    return data


def load_spec_or_empty(bundle: str | Path) -> dict[str, Any]:
    """``load_spec``, or ``{}`` when the bundle has no readable spec."""
    try:
        return load_spec(bundle)
    except errors.InvalidArgument:
        return {}


def spec_annotations(spec: dict[str, Any]) -> dict[str, str]:
    """The spec's annotations with string values ({} if absent or not an object)."""
    ann = spec.get("annotations")
    if not isinstance(ann, dict):
        return {}
    return {str(k): v for k, v in ann.items() if isinstance(v, str)}
