"""Refuse, in the gateway and before any engine sees it, a constraint that is invalid or cannot be enforced.

Three layers, each a 400 that names where the problem is: the JSON schema against its meta-schema
(``jsonschema``: a misspelt type, a ``required`` that is not a list), keywords the grammar library would
silently ignore (so the output could break the schema while we claimed to enforce it), and the grammar
library's own conversion (an unsupported type, a regex it cannot parse, a ``$ref`` that goes nowhere).
Every engine gets the same answer, since the check does not depend on which one generates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from omniserve.errors import InvalidRequest
from omniserve.structured.spec import StructuredOutput

#: Keywords xgrammar 0.2.8 accepts but does not enforce (found by comparing the grammars it builds with
#: and without each): a schema using one is refused rather than half-honoured.
IGNORED_KEYWORDS = frozenset(
    {"dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "minContains", "maxContains"}
)
#: Subschema-holding keywords, to walk a schema: a dict of subschemas, a list of them, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
#: xgrammar's C++ errors start with a timestamp and a source location: not for clients.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def check(spec: StructuredOutput) -> None:
    """Raise ``InvalidRequest`` (param ``spec.param``) if ``spec`` cannot be compiled or enforced."""
    import xgrammar as xgr

    if spec.kind == "json_schema":
        schema = spec.loaded()
        _check_meta_schema(schema, spec.param)
        _refuse_ignored(schema, spec.param)
        _converted(lambda: xgr.Grammar.from_json_schema(spec.value, any_whitespace=False), spec, "JSON schema")
    elif spec.kind == "regex":
        _converted(lambda: xgr.Grammar.from_regex(spec.value), spec, "regex")
    elif spec.kind == "grammar":
        _converted(lambda: xgr.Grammar.from_ebnf(spec.value), spec, "grammar")
    elif spec.kind == "structural_tag":
        _converted(lambda: xgr.Grammar.from_structural_tag(spec.value), spec, "structural tag")
    elif spec.kind == "choice" and not spec.loaded():
        raise InvalidRequest("a choice constraint needs at least one choice", param=spec.param)


def _check_meta_schema(schema: Any, param: str) -> None:
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("the JSON schema must be an object", param=param)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise InvalidRequest(f"invalid JSON schema at '{where}': {error.message}", param=param)


def _refuse_ignored(schema: Any, param: str) -> None:
    for where, node in _subschemas(schema, ""):
        for keyword in sorted(IGNORED_KEYWORDS & node.keys()):
            raise InvalidRequest(
                f"the JSON schema keyword '{keyword}' (at '{where or '(root)'}') is not supported by constrained "
                "decoding; remove it or check it after generation",
                param=param,
            )
        if node.get("uniqueItems") is True:
            raise InvalidRequest(
                f"the JSON schema keyword 'uniqueItems' (at '{where or '(root)'}') is not supported by constrained "
                "decoding; remove it or check it after generation",
                param=param,
            )


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in ``node`` with its path: keywords are looked for in schemas, not in property names."""
    if not isinstance(node, dict):
        return
    yield where, node
    for key in _SCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            yield from _subschemas(sub, f"{where}/{key}/{name}".lstrip("/"))
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []) if isinstance(node.get(key), list) else ():
            yield from _subschemas(sub, f"{where}/{key}/{i}".lstrip("/"))
    for key in _SCHEMA_ONE:
        yield from _subschemas(node.get(key), f"{where}/{key}".lstrip("/"))


def _converted(convert: Any, spec: StructuredOutput, what: str) -> None:
    try:
        convert()
    except (RuntimeError, ValueError) as exc:  # xgrammar's conversion errors (its C++ errors are RuntimeError)
        raise InvalidRequest(f"the {what} cannot be enforced: {grammar_error_text(exc)}", param=spec.param) from None


def grammar_error_text(exc: BaseException) -> str:
    """xgrammar's message without its C++ timestamp and source location."""
    return _CPP_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
