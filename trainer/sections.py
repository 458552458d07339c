"""The base of every recipe section and the one error a recipe problem raises (docs/recipes.md).

Methods define their typed configs beside their maths (trainer/methods/) on this base; trainer/config.py assembles
the recipe from all sections; trainer/validate.py holds every rule that spans sections.
"""
from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict


class RecipeError(Exception):
    """A recipe problem found before any work: formatted as one line `file: key: problem (hint: ...)`."""

    def __init__(self, source: str, key: str, problem: str, hint: str = ""):
        self.source, self.key, self.problem, self.hint = source, key, problem, hint
        line = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__(line + (f" (hint: {hint})" if hint else ""))


def _numeric_only(annotation) -> bool:
    """Whether a field takes numbers and not booleans (int, float, Optional of them)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a in (int, float) for a in args)


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _section_classes(annotation, value) -> list:
    """The Section classes a field's annotation admits for `value` (a tagged union: the one its `name` picks)."""
    args = typing.get_args(annotation) or (annotation,)
    out = []
    for a in args:
        if typing.get_origin(a) is typing.Union or typing.get_args(a):
            out += _section_classes(a, value)
        elif isinstance(a, type) and issubclass(a, Section):
            out.append(a)
    named = [c for c in out if isinstance(value, dict) and c.model_fields.get("name") is not None
             and c.model_fields["name"].default == value.get("name")]
    return named or out[:1]


def boolean_for_number(model: type, data, prefix: str = "") -> str | None:
    """The dotted key of the first `true`/`false` given for a number field, or None. pydantic's lax mode reads `true`
    as 1 for an int field (`distill.train.steps=true` ran one step); its strict mode would also refuse YAML's
    `1e-4`, which PyYAML reads as a string, so booleans alone are refused here."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, bool) and _numeric_only(field.annotation):
            return dotted
        children = value.items() if isinstance(value, dict) and typing.get_origin(field.annotation) is dict else \
            [(None, value)]
        for child_key, child in children:
            for cls in _section_classes(field.annotation, child):
                found = boolean_for_number(cls, child, f"{dotted}.{child_key}." if child_key else f"{dotted}.")
                if found:
                    return found
    return None
