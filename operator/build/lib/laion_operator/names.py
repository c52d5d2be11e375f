"""Spec and config keys (camelCase) and their Python names (snake_case), one way each."""

import re


def snake(name: str) -> str:
    """A spec or config key (camelCase) as a Python name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def camel(name: str) -> str:
    """A Python name as its spec or config key."""
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)
