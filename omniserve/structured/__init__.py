"""Constrained decoding: a request's structured-output constraint, checked, compiled and applied as token masks.

``spec`` is the engine-neutral constraint (what ``SamplingParams.structured`` carries: a JSON schema, a
regex, a choice list, a grammar or a structural tag); ``check`` refuses an invalid or unsupported one with
a 400 in the gateway, whatever the engine; ``grammar`` compiles it for one tokenizer (a bounded cache) and
applies the compiled grammars' masks to a batch of logits, for the transformers engine's sampler. Engines
with structured outputs of their own (vLLM) map ``spec`` to their parameters instead.

Nothing here imports xgrammar (or torch) at import time: only requests that ask for a constraint pay it.
"""
