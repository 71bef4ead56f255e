"""The EvalScope side of standard benchmarks; runs inside ``omniserve.eval.evalscope_worker`` only.

Two jobs: ``standard-load`` loads the benchmark's data exactly as the evaluation will (EvalScope's
adapter and loader, same ``local_path``), before any server starts, and writes the item count per
subset (or the reason it could not); ``standard-eval`` runs the benchmark against the endpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omniserve.eval.worker import API_KEY_VARIABLE


def _dataset_args(job: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if job.get("local_path"):
        args["local_path"] = job["local_path"]
    return args


def _hub(job: dict[str, Any]) -> str:
    # "local" only when the data is a folder; otherwise EvalScope's default hub (ModelScope)
    return "local" if job.get("local_path") else "modelscope"


def run_load_job(job: dict[str, Any]) -> None:
    """Load each benchmark once; write ``{name: {"totals": {subset: n}} | {"error": "..."}}`` to ``job["result"]``."""
    from evalscope import TaskConfig
    from evalscope.api.registry import get_benchmark

    results: dict[str, Any] = {}
    for name, local_path in job["benchmarks"].items():
        spec = {"local_path": local_path}
        config = TaskConfig(
            model="dry-load",
            eval_type="mock_llm",
            datasets=[name],
            dataset_args={name: _dataset_args(spec)},
            dataset_hub=_hub(spec),
            dataset_dir=job["dataset_dir"],
            limit=job.get("limit"),
        )
        try:
            dataset = get_benchmark(name, config).load_dataset()
            results[name] = {"totals": {subset: len(items) for subset, items in dataset.items()}}
        except Exception as exc:  # every loader failure becomes the one-line reason the parent reports
            text = " ".join(str(exc).split())
            results[name] = {"error": f"{type(exc).__name__}: {text[:400]}"}
    Path(job["result"]).write_text(json.dumps(results), "utf-8")


def run_eval_job(job: dict[str, Any]) -> None:
    """One standard benchmark through ``evalscope.run_task`` against the OpenAI-compatible endpoint."""
    from evalscope import TaskConfig, run_task

    name = job["benchmark"]
    generation: dict[str, Any] = {
        "max_tokens": job["max_tokens"],
        "temperature": job["temperature"],
        "timeout": job["request_timeout"],
        "retries": 1,  # one attempt per item, as the built-in suites (see evalscope_worker)
        "retry_interval": 0,
    }
    if job.get("media"):
        # the serving API's per-request media options, so frames and pixels match what users are served
        generation["extra_body"] = {"mm_processor_kwargs": job["media"]}
    config = TaskConfig(
        model=job["model"],
        api_url=job["api_url"],
        api_key=os.environ[API_KEY_VARIABLE],
        eval_type="openai_api",
        model_args={"max_retries": 0},
        datasets=[name],
        dataset_args={name: _dataset_args(job)},
        dataset_hub=_hub(job),
        dataset_dir=job["dataset_dir"],
        limit=job.get("limit"),
        generation_config=generation,
        eval_batch_size=job["concurrency"],
        work_dir=job["work_dir"],
        no_timestamp=True,
        ignore_errors=True,
    )
    run_task(config)
