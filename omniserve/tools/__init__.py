"""Tool calling: parsers that find the calls a model wrote in its reply, one file per format behind a registry.

Tools reach the prompt through the checkpoint's own chat template (``templates/render.py``); what
comes back is text in that model family's call format, which a parser here turns into OpenAI
``tool_calls``. Nothing constrains what the model writes yet: a call it writes badly stays text.
"""
