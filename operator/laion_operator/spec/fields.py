"""The schema's leaf fields: a type, a description, and the keywords the field adds."""

from __future__ import annotations

from typing import Any


def string(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


def number(description: str, **extra: Any) -> dict:
    return {"type": "number", "description": description, **extra}


def integer(description: str, **extra: Any) -> dict:
    return {"type": "integer", "description": description, **extra}


def boolean(description: str, default: bool) -> dict:
    return {"type": "boolean", "description": description, "default": default}
