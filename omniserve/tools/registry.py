"""Tool-call parsers by name, and the choice of one for a checkpoint: ``--tool-call-parser`` or its template.

A format is one file with one ``ToolCallParser`` subclass, listed here. The gateway asks only for
"the parser of this server", never which family a model belongs to.
"""

from __future__ import annotations

from omniserve.errors import InvalidRequest
from omniserve.tools.base import ToolCallParser
from omniserve.tools.hermes import HermesParser
from omniserve.tools.llama3_json import Llama3JsonParser
from omniserve.tools.mistral import MistralParser, MistralV11Parser

#: In the order templates are tried: each matches on what only its own format's templates say.
PARSERS: dict[str, type[ToolCallParser]] = {
    parser.NAME: parser for parser in (HermesParser, MistralParser, MistralV11Parser, Llama3JsonParser)
}


def parser_class(name: str | None, chat_template: str | None) -> type[ToolCallParser] | None:
    """The parser named by ``--tool-call-parser``, else the first whose format the template teaches, else None.

    An unknown name is a configuration error (``ServerConfig`` refuses it before the server starts).
    """
    if name is not None:
        return PARSERS[name]
    return next((parser for parser in PARSERS.values() if chat_template and parser.matches(chat_template)), None)


def require_parser(name: str | None, chat_template: str | None, model: str) -> type[ToolCallParser]:
    """``parser_class``, or a 400 saying the server cannot read this model's calls and how to tell it."""
    parser = parser_class(name, chat_template)
    if parser is None:
        raise InvalidRequest(
            f"the model '{model}' takes tools, but no tool-call parser recognises its chat template's call "
            f"format; start the server with --tool-call-parser ({' | '.join(PARSERS)})",
            param="tools",
        )
    return parser
