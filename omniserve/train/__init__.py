"""Supervised fine-tuning on the serving templates, and the proof that the prompts match.

- ``data``: JSONL conversations validated with the server's request types, errors by file:line;
- ``features``: conversations -> samples via the server's media loader and prompt renderer;
- ``collate``: padded or packed batches (per-sample attention and positions);
- ``sft``: the run (transformers ``Trainer`` + ``trainer``/``checkpoints``/``progress``/``model_io``);
- ``parity``: training vs serving encodings, token by token;
- ``cli``: the ``train``, ``check-parity``, ``synth``, ``synth-eval`` commands.

Importing this package is cheap; torch and transformers load inside the functions that need them.
"""
