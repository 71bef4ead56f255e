"""Our ``transformers.Trainer``: stock training loop, atomic checkpoints, honest token counts.

Two behaviours change, nothing else:

- checkpoints are written to a staging folder and renamed into place (``checkpoints.py``), so a
  ``checkpoint-N`` folder is always complete;
- the tokens-per-second figure counts real tokens: the stock "non_padding" count needs an attention
  mask, which packed batches deliberately leave out, or a tokenizer handed to the trainer, which
  then rewrites the model's eos/pad ids to the tokenizer's (changing the saved config).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omniserve.train.checkpoints import STAGING_PREFIX, publish, rotate


def trainer_class() -> type:
    """Built lazily: importing ``transformers.Trainer`` pulls in torch and accelerate."""
    from transformers import Trainer

    class OmniTrainer(Trainer):
        def __init__(self, *args: Any, pad_token_id: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pad_token_id = pad_token_id
            self._staging_root: Path | None = None

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            import torch

            ids = inputs["input_ids"]
            real = (
                int((ids != self._pad_token_id).sum())
                if "attention_mask" not in inputs
                else int(inputs["attention_mask"].sum())
            )
            self.state.num_input_tokens_seen += int(self.accelerator.gather(torch.tensor(real)).sum())

        def _get_output_dir(self, trial: Any) -> str:
            # While a checkpoint is being saved, the trainer's "run dir" is the staging folder.
            if self._staging_root is not None:
                return str(self._staging_root)
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(self.args.output_dir)
            step = self.state.global_step
            staging = root / f"{STAGING_PREFIX}{step}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self._staging_root = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            publish(staging / f"checkpoint-{step}", root / f"checkpoint-{step}")
            shutil.rmtree(staging, ignore_errors=True)
            if self.args.save_total_limit:
                rotate(root, keep=self.args.save_total_limit)

    return OmniTrainer
