"""omniserve's two additions to EvalScope, registered through its own plugin registries.

- ``omniserve_exact_vqa``: EvalScope's ``general_vqa`` (OpenAI messages with image/video/audio parts)
  scored by exact match instead of BLEU/Rouge. A one-word answer ("red", "up", "high") is either
  right or wrong; Rouge recall would give full marks to a reply that lists every colour.
- ``omniserve_messages`` (perf dataset): one JSON object with ``messages`` per line, sent as they are,
  so ``omniserve bench`` can put images and audio in its load. EvalScope's own ``random_vl`` only
  draws images.

Imported only inside the EvalScope worker process (``evalscope_worker``), never by the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_registered = False


def register() -> None:
    """Register both plugins once per process."""
    global _registered
    if _registered:
        return
    _register_exact_vqa()
    _register_messages_dataset()
    _registered = True


def _register_exact_vqa() -> None:
    from evalscope.api.benchmark import BenchmarkMeta, DefaultDataAdapter
    from evalscope.api.registry import register_benchmark
    from evalscope.benchmarks.general_vqa.general_vqa_adapter import GeneralVQAAdapter
    from evalscope.constants import Tags

    from omniserve.eval.datasets import EXACT_BENCHMARK

    @register_benchmark(
        BenchmarkMeta(
            name=EXACT_BENCHMARK,
            pretty_name="omniserve exact-match VQA",
            description="OpenAI-style messages with image/video/audio parts; the reply must equal the answer.",
            tags=[Tags.QA, Tags.CUSTOM, Tags.MULTI_MODAL],
            dataset_id=EXACT_BENCHMARK,
            metric_list=["exact_match"],
            few_shot_num=0,
            train_split=None,
            eval_split="test",
        )
    )
    class ExactVQAAdapter(GeneralVQAAdapter):
        """general_vqa's loading and media handling, the generic registry-metric scoring."""

        def match_score(self, original_prediction: str, filtered_prediction: str, reference: str, task_state: Any):  # type: ignore[no-untyped-def]
            # general_vqa's own match_score only knows BLEU/Rouge and would skip exact_match silently
            return DefaultDataAdapter.match_score(self, original_prediction, filtered_prediction, reference, task_state)


def _register_messages_dataset() -> None:
    from evalscope.perf.plugin.datasets.base import DatasetPluginBase
    from evalscope.perf.plugin.registry import register_dataset

    @register_dataset("omniserve_messages")
    class MessagesDataset(DatasetPluginBase):
        """Each JSONL line: ``{"messages": [...]}`` (OpenAI chat messages, media inline as data URLs)."""

        def build_messages(self) -> Iterator[list[dict[str, Any]]]:
            for line in self.dataset_line_by_line(self.query_parameters.dataset_path):
                if line.strip():
                    yield json.loads(line)["messages"]
