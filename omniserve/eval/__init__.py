"""Evaluation and load testing on EvalScope: ``omniserve eval``, ``eval compare``, ``bench`` and the quality gate.

Modules, one job each: ``suites`` (YAML suite files), ``datasets`` (stage data for EvalScope),
``target`` (the server scored: started or given), ``worker``/``evalscope_worker`` (EvalScope in a child
process with redirected caches), ``evalscope_ext`` (omniserve's EvalScope plugins), ``results``/``report``
(scores, JSON and Markdown), ``runner`` (the eval command's flow), ``progress``, ``compare``, ``gate``,
``bench``/``bench_data`` and ``cli``. Importing this package loads nothing heavy.
"""
