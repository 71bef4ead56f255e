"""A training progress bar showing the loss and tokens per second, instead of printed log dicts.

The stock ``ProgressCallback`` prints every log as a dict line under the bar; on a long run that
buries the bar. This one keeps a single line: steps, elapsed/remaining time, loss, learning rate
and throughput (non-padding tokens per second, from the trainer's own token count).
"""

from __future__ import annotations

from typing import Any


def progress_callback_class() -> type:
    """Built lazily: importing transformers' callbacks pulls in torch."""
    from transformers.trainer_callback import ProgressCallback

    class LossAndThroughputBar(ProgressCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            postfix = {}
            if "loss" in logs:
                postfix["loss"] = f"{logs['loss']:.4f}"
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            if "train_tokens_per_second" in logs:
                postfix["tok/s"] = f"{logs['train_tokens_per_second']:.0f}"
            if postfix:
                self.training_bar.set_postfix(postfix, refresh=False)
            if "train_loss" in logs:  # the end-of-training summary
                self.training_bar.write(
                    f"trained {state.global_step} steps in {logs.get('train_runtime', 0.0):.1f} s, "
                    f"mean loss {logs['train_loss']:.4f}"
                )

    return LossAndThroughputBar
