"""The engine-neutral constraint on one request's output, as ``SamplingParams.structured`` carries it.

Each kind is one of the constraints vLLM's ``StructuredOutputsParams`` and xgrammar both know, so every
engine maps it without translation: a JSON schema, any JSON object, a regex, one of a list of strings, an
EBNF grammar, or an xgrammar structural tag (tool calls in a parser's format). ``value`` is text (the
schema or tag as JSON), which keeps the spec hashable: it is the compile cache's key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match; ``param`` is the request field it came from (errors name it)."""

    kind: Kind
    value: str = ""  # schema / structural tag as JSON, the regex, the grammar, the choices as a JSON list
    param: str = field(default="response_format", compare=False)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, param: str) -> StructuredOutput:
        # key order kept: it is the order the properties are written in
        return cls("json_schema", json.dumps(length_bounds_as_patterns(schema)), param)

    @classmethod
    def choice(cls, choices: list[str], param: str) -> StructuredOutput:
        return cls("choice", json.dumps(choices), param)

    @classmethod
    def structural_tag(cls, tag: dict[str, Any], param: str) -> StructuredOutput:
        return cls("structural_tag", json.dumps(tag), param)

    def loaded(self) -> Any:
        """``value`` decoded, for the kinds whose value is JSON (schema, choices, structural tag)."""
        return json.loads(self.value)

    def as_structural_tag(self) -> dict[str, Any] | None:
        """A choice or a grammar as an xgrammar structural tag, for engines that take those but not the kind itself."""
        if self.kind == "choice":
            elements = [{"type": "const_string", "value": choice} for choice in self.loaded()]
            return {"type": "structural_tag", "format": {"type": "or", "elements": elements}}
        if self.kind == "grammar":
            return {"type": "structural_tag", "format": {"type": "grammar", "grammar": self.value}}
        if self.kind == "structural_tag":
            return self.loaded()
        return None


#: A JSON string's characters without escapes: what a length-bounded string may hold (see below).
_PLAIN_CHARS = '[^\\x00-\\x1f"\\\\]'
_SUBSCHEMA_KEYS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def length_bounds_as_patterns(schema: Any) -> Any:
    """``schema`` with each ``minLength``/``maxLength``-only string turned into the equivalent ``pattern``.

    xgrammar 0.2.8 compiles a length-bounded string (no pattern, no format) to a character class that
    admits raw control characters, which JSON forbids inside strings: a model writing one produces output
    that does not parse (one sample in six from an untrained model). A pattern of plain characters with
    the same bounds is compiled correctly; it leaves out escaped characters (quotes, backslashes,
    ``\\n``), a narrowing the schema allows. Every engine gets the rewritten schema.
    """
    if isinstance(schema, list):
        return [length_bounds_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {name: length_bounds_as_patterns(sub) for name, sub in out[key].items()}
    for key in (*_SUBSCHEMA_LISTS, *_SUBSCHEMA_ONE):
        if key in out:
            out[key] = length_bounds_as_patterns(out[key])
    low, high = out.get("minLength", 0), out.get("maxLength")
    bounded = "minLength" in out or "maxLength" in out
    plain = out.get("type") == "string" and not ({"pattern", "format", "enum", "const"} & out.keys())
    sane = isinstance(low, int) and low >= 0 and (high is None or (isinstance(high, int) and high >= low))
    if bounded and plain and sane:  # anything else is left as sent, for the checks to judge
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHARS}{{{low},{'' if high is None else high}}}$"
    return out
