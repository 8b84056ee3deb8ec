"""Bounded input for the HTTP API: the protocol's name rule, 63-bit integers, finite floats, capped maps and lists.

The pydantic types here are what request bodies and route parameters are declared with, so a bad
value is a 422 naming the field before any service sees it. :func:`json_safe_errors` keeps that 422
a 422: FastAPI echoes the offending input, and a NaN in it cannot be encoded as JSON (that was a 500).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Path
from pydantic import AfterValidator, Field

from hub.errors import Invalid
from protocol.encoding import ProtocolError
from protocol.names import FILE_NAME_MAX, NAME_MAX, check_name
from protocol.schema import INT63_MAX

MAX_LABELS = 64  # labels of a device or an enrolment token, tags of a model
MAX_FACTS = 256  # facts a device reports at enrolment (protocol: the same cap on its reported facts)
MAX_KEY = 64
MAX_VALUE = 1024
MAX_LIST = 64  # label keys to unset, tag keys to remove, models in a module, traffic weights …
MAX_TEXT = 65_536  # free text: descriptions, selectors


def _name(value: str) -> str:
    try:
        return check_name(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _file_name(value: str) -> str:
    try:
        return check_name(value, "file name", FILE_NAME_MAX)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


# A name (protocol.names): modules, deployments, endpoints, models, devices. max_length first: cheap refusal.
Name = Annotated[str, Field(max_length=NAME_MAX * 4), AfterValidator(_name)]
FileName = Annotated[str, Field(max_length=FILE_NAME_MAX * 4), AfterValidator(_file_name)]
# A route parameter holding a name: a bad one is a 422 saying why, never a path or a query with it.
NamePath = Annotated[str, Path(max_length=NAME_MAX * 4), AfterValidator(_name)]
Int63 = Annotated[int, Field(ge=-INT63_MAX - 1, le=INT63_MAX)]
Version = Annotated[int, Path(ge=1, le=INT63_MAX)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY)]
Value = Annotated[str, Field(max_length=MAX_VALUE)]
Labels = Annotated[dict[Key, Value], Field(max_length=MAX_LABELS)]
Facts = Annotated[dict[Key, Value], Field(max_length=MAX_FACTS)]
Keys = Annotated[list[Key], Field(max_length=MAX_LABELS)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


def check_api_name(value: str, what: str) -> str:
    """For services that take a name outside a pydantic body (a form field): Invalid (422) with the rule broken."""
    try:
        return check_name(value, what)
    except ProtocolError as exc:
        raise Invalid(str(exc)) from None


def check_labels(labels: dict[str, str], what: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise Invalid(f"{what}: {len(labels)} entries, at most {MAX_LABELS}")
    for k, v in labels.items():
        if not k or len(k) > MAX_KEY or len(v) > MAX_VALUE:
            raise Invalid(f"{what}: key {k[:80]!r} must be 1-{MAX_KEY} characters and its value at most {MAX_VALUE}")
    return labels


def json_safe_errors(errors: Any, max_input: int = 200) -> Any:
    """pydantic's error list, encodable: non-finite floats spelled out, echoed inputs cut short."""
    if isinstance(errors, float) and not math.isfinite(errors):
        return repr(errors)
    if isinstance(errors, dict):
        return {k: (_short(v, max_input) if k == "input" else json_safe_errors(v, max_input)) for k, v in errors.items()}
    if isinstance(errors, (list, tuple)):
        return [json_safe_errors(v, max_input) for v in errors]
    if isinstance(errors, (str, int, bool)) or errors is None:
        return errors
    return str(errors)


def _short(value: Any, limit: int) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (int, bool)) or value is None or (isinstance(value, float)):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"
