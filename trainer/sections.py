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


# A provenance entry "<section>" + STALE: the keys a section held for another kind (method, family) when a later
# source (a child recipe, the command line) changed its `name`.
STALE = "\0stale"


def note_kind_change(provenance: dict, section: str, before, new_name, given_with_it) -> None:
    """Record, when `name` of the section at dotted path `section` changes from before["name"] to new_name, the keys
    that came with the old kind (not those given together with the new name)."""
    if isinstance(before, dict) and "name" in before and before["name"] != new_name:
        provenance[section + STALE] = set(before) - {"name"} - set(given_with_it)


def drop_stale_options(model: type, data: dict, provenance: dict) -> None:
    """Options given for another kind before a section's `name` changed, which the new kind does not have, are
    dropped: `distill.method.name=dmd` over a recipe that tunes ADM's `gradient_penalty` runs DMD, whose config has
    no such key. Keys given with or after the new name are kept and validated, so a misspelt key is still an error."""
    for entry, keys in provenance.items():
        if not entry.endswith(STALE):
            continue
        node, cls = data, model
        for part in entry[:-len(STALE)].split("."):
            field = cls.model_fields.get(part) if isinstance(node, dict) else None
            node = node.get(part) if field is not None else None
            classes = _section_classes(field.annotation, node) if field is not None else []
            if not classes or not isinstance(node, dict):
                break
            cls = classes[0]
        else:
            for key in keys - set(cls.model_fields):
                node.pop(key, None)


def known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for the did-you-mean hint on unknown keys)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)
