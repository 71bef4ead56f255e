"""One way to phrase a pydantic validation error for a person: the HTTP gateway, data files and option files.

pydantic reports every failed branch of a union and writes locations as tuples full of its own
bookkeeping (union tags such as ``user`` or ``image_url``, member names such as ``list[...]`` or
``str``). Users need the one error that names the real problem, at the path they wrote. This module
picks it and spells it the same way everywhere, so ``messages[0].content[1].image_url.url`` reads
the same in a 400 response, a training-data error and a calibration-file error.

It imports no web framework (the CLIs and the data readers use it without FastAPI) and pydantic
only for type checking.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pydantic

#: Member names pydantic puts in locations for plain-type union branches (``str | list[...]``).
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


@dataclass(frozen=True)
class ValidationProblem:
    """The one error worth showing: a sentence, the path it concerns and pydantic's error type."""

    message: str  # "<location>: <msg>", or "<msg>" when the error concerns the whole value
    location: str | None  # "messages[0].content[1].image_url.url": dotted names, [i] for indices, no union tags
    kind: str  # pydantic's error type: "extra_forbidden", "missing", "value_error", ...


def describe_validation_error(
    error: pydantic.ValidationError | Sequence[Mapping[str, Any]],
    *,
    root: str | None = None,
    strip: tuple[str, ...] = ("body",),
    union_tags: Collection[str] | None = None,
) -> ValidationProblem:
    """The deepest-located error of ``error``, phrased for a user.

    A union yields one error per member it tried; the deepest location is the member that got
    furthest, so it names the real problem (a bad ``image_url.url`` rather than "not a text part").
    ``root`` names what was validated when the location does not (``"messages"`` for a list of
    messages). ``strip`` is a location prefix that is not part of the user's input (FastAPI's
    ``body``; dropped once, so a field really named ``body`` survives). ``union_tags`` are the
    discriminator values to drop from locations (default: those of ``omniserve.protocol``).
    """
    errors = list(error) if isinstance(error, Sequence) else list(error.errors())
    tags = openai_union_tags() if union_tags is None else frozenset(union_tags)
    if not errors:
        return ValidationProblem(message=f"{root}: invalid value" if root else "invalid value", location=root, kind="")
    deepest = max(errors, key=lambda e: len(tuple(e.get("loc", ()))))  # the first of equally deep ones
    loc = tuple(deepest.get("loc", ()))
    if strip and loc[: len(strip)] == strip:
        loc = loc[len(strip) :]
    location = _join(root, _location(loc, tags))
    kind = str(deepest.get("type", ""))
    text = "field required" if kind == "missing" else str(deepest.get("msg", "invalid value"))
    text = text.removeprefix("Value error, ")
    return ValidationProblem(message=f"{location}: {text}" if location else text, location=location, kind=kind)


def _location(loc: tuple[Any, ...], tags: frozenset[str]) -> str | None:
    """``("messages", 0, "user", "content", "list[...]", 1)`` -> ``"messages[0].content[1]"``."""
    parts: list[str] = []
    previous_was_index = False
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            previous_was_index = True
            continue
        text = str(item)
        followed = i + 1 < len(loc)
        if "[" in text or "(" in text or text.lower() in _TYPE_NAMES:
            continue  # a union member's type ("list[...]", "function-after[...]", "str"), not a field
        # a tag comes right after a list index (messages[0].user.content), or first, repeated by its own field
        # (image_url.image_url.url when a single part was validated); a tag never ends a location
        if text in tags and followed and (previous_was_index or (i == 0 and loc[1] == text)):
            previous_was_index = False
            continue
        parts.append(("." if parts else "") + text)
        previous_was_index = False
    return "".join(parts) or None


def _join(root: str | None, location: str | None) -> str | None:
    if not root:
        return location
    if not location:
        return root
    return root + location if location.startswith("[") else f"{root}.{location}"


@functools.cache
def openai_union_tags() -> frozenset[str]:
    """The discriminator values of every tagged union in ``omniserve.protocol`` (message roles, part types).

    Read from the wire types themselves, so a new content part type is dropped from locations
    without anyone remembering to list it here.
    """
    from pydantic.fields import FieldInfo

    from omniserve import protocol

    tags: set[str] = set()
    for value in vars(protocol).values():
        if typing.get_origin(value) is not typing.Annotated:
            continue
        union, *metadata = typing.get_args(value)
        for info in metadata:
            if not isinstance(info, FieldInfo) or not isinstance(info.discriminator, str):
                continue
            for member in typing.get_args(union):
                field = member.model_fields[info.discriminator]
                tags.update(str(tag) for tag in typing.get_args(field.annotation))
    return frozenset(tags)
