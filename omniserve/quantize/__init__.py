"""``omniserve quantize``: GPTQ, AWQ and FP8 checkpoints for every engine, multimodal towers kept intact.

Modules, one job each (read in this order):

- ``recipes``      the per-method YAML recipes in the top-level ``quantize/`` folder
- ``checkpoint``   facts about a folder from its files: checkpoint? quantized? size, content hash
- ``calibration``  OpenAI-style JSONL -> model inputs through the serving template layer
- ``layout``       where the decoder, towers and head live in a loaded model
- ``capture``      decoder inputs recorded from full multimodal forwards (towers included)
- ``hardware``     can this machine run a scheme? (a probe, not a table)
- ``patches``      the one scoped workaround for llm-compressor (AWQ without an accelerator)
- ``run``          one run: checks, llm-compressor ``oneshot``, save, verify, report
- ``ignore``       the saved ignore list, in every naming the checkpoint's readers use
- ``publish``      output complete or absent: staging folder, atomic rename, --overwrite
- ``verify``       reload checks (load report, kept weights) and fidelity vs the original
- ``report``       the JSON + table written inside the checkpoint
- ``cache``        ``ensure_quantized``: quantize once per (content, method, recipe; the quantizer versions as a suffix)
- ``cli``          the ``omniserve quantize`` command

Nothing heavy is imported here: torch, transformers and llm-compressor load inside the functions
that need them, so ``omniserve --help`` stays instant.
"""
