"""Tool calling: parsers that find the calls a model wrote in its reply, one file per format behind a registry.

Tools reach the prompt through the checkpoint's own chat template (``templates/render.py``); what
comes back is text in that model family's call format, which a parser here turns into OpenAI
``tool_calls``. Under ``tool_choice`` "auto" a call the model writes badly stays text; "required", a named
function and ``strict`` tools are enforced by the grammar each parser gives of its own format
(``ToolCallParser.call_format``), applied by the engine as any structured-output constraint.
"""
