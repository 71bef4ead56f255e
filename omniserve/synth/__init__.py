"""Synthetic omni tasks with known answers (image colour, video motion, audio pitch, text, mixed, spoken words).

``write_synthetic(output, seed=..., train_size=..., test_size=...)`` writes them as training data;
``omniserve synth`` is its command line. Used to train and check the built-in demo model.
"""

from omniserve.synth.tasks import TASKS, Example, MediaFile
from omniserve.synth.writer import SynthSummary, write_synthetic

__all__ = ["TASKS", "Example", "MediaFile", "SynthSummary", "write_synthetic"]
