"""The child process that runs EvalScope: ``python -m omniserve.eval.evalscope_worker JOB.json``.

EvalScope runs in its own process because (1) its cache locations are environment variables read
at import time, and they must point into omniserve's cache without changing the caller's
environment, (2) a run can be stopped at once (the server died) while the parent keeps what was
already written, and (3) its logging and progress bars stay out of the parent's terminal.

The job file is written by ``runner``/``bench``; it holds only plain data.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from omniserve.eval.worker import API_KEY_VARIABLE


def run_eval_job(job: dict[str, Any]) -> None:
    """One suite through ``evalscope.run_task`` against an OpenAI-compatible endpoint."""
    from evalscope import TaskConfig, run_task
    from evalscope.utils.multi_choices import MultipleChoiceTemplate

    from omniserve.eval.evalscope_ext import register

    register()
    args = dict(job["dataset_args"])
    if args.get("prompt_template") == "english-single-answer":  # general_mcq's default prompt is Chinese
        args["prompt_template"] = MultipleChoiceTemplate.SINGLE_ANSWER
    args.update(local_path=job["local_path"], subset_list=job["subsets"])
    generation = {
        "max_tokens": job["max_tokens"],
        "temperature": job["temperature"],
        "timeout": job["request_timeout"],
        # one attempt per item, no retry: a failed item is reported, not hidden by a lucky second try,
        # and when the server dies the remaining items fail at once, so EvalScope still writes its
        # report (with the errored count) for the items answered before
        "retries": 1,
        "retry_interval": 0,
    }
    config = TaskConfig(
        model=job["model"],
        api_url=job["api_url"],
        api_key=os.environ[API_KEY_VARIABLE],
        eval_type="openai_api",
        model_args={"max_retries": 0},  # the openai client's own retries, with back-off
        datasets=[job["benchmark"]],
        dataset_args={job["benchmark"]: args},
        dataset_hub="local",
        generation_config=generation,
        eval_batch_size=job["concurrency"],
        work_dir=job["work_dir"],
        no_timestamp=True,
        ignore_errors=True,  # one bad item is counted and reported, not the end of the suite
    )
    run_task(config)


def run_perf_job(job: dict[str, Any]) -> None:
    """Load levels through ``evalscope.perf`` (one run per concurrency level)."""
    from evalscope.perf.arguments import Arguments
    from evalscope.perf.main import run_perf_benchmark

    from omniserve.eval.evalscope_ext import register

    register()
    run_perf_benchmark(Arguments(**job["arguments"], api_key=os.environ[API_KEY_VARIABLE]))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m omniserve.eval.evalscope_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text("utf-8"))
    if job["kind"].startswith("standard-"):  # EvalScope's own benchmarks (omniserve.eval.standard)
        from omniserve.eval import standard_worker

        {"standard-load": standard_worker.run_load_job, "standard-eval": standard_worker.run_eval_job}[job["kind"]](job)
        return 0
    {"eval": run_eval_job, "perf": run_perf_job}[job["kind"]](job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
