"""The built-in demo model: the tiny Qwen2.5-Omni, trained on the synthetic omni tasks.

It answers the questions of ``omniserve synth`` correctly (dominant colour of an image, direction a
bar moves in a clip, high or low tone, the larger of two digits, colour + tone together), so a
newcomer's first request about their image, clip or sound gets a right answer rather than noise.
Same architecture, tokenizer, chat template and processor as ``build_tiny_omni``; only the weights
differ (stored as bfloat16, 3 MB). ``docs/training.md`` has the command that reproduces them.

``omniserve deploy --model builtin:NAME`` picks a built-in model by name (``BUILTIN_MODELS``): ``omni``
(this demo, also the default without ``--model``) and ``omni-speech`` (this demo plus a tiny talker and
codec, so it answers in speech too: ``speaking.py``).
"""

from __future__ import annotations

from pathlib import Path

from omniserve.errors import ModelLoadError

DEMO_MODEL_NAME = "tiny-omni-demo"
#: ``--model builtin:NAME``: the prefix, and each name with what it serves (for --help and errors).
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {
    "omni": "the trained tiny Qwen2.5-Omni demo (the default without --model)",
    "omni-speech": "the same demo thinker plus a tiny random talker and codec (audio output; built at first use)",
}


def demo_model_path() -> Path:
    """The folder of the shipped demo checkpoint (package data)."""
    path = Path(__file__).resolve().parent / DEMO_MODEL_NAME
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in demo model is missing from {path}; reinstall omniserve with its package data"
        )
    return path


def builtin_name(model: Path | str | None) -> str | None:
    """The built-in model that ``--model`` names: ``omni`` when none is given, NAME for ``builtin:NAME``,
    None for a checkpoint folder. An unknown NAME is a ``ModelLoadError`` that lists the valid ones."""
    if model is None:
        return "omni"
    text = str(model)
    if not text.startswith(BUILTIN_PREFIX):
        return None
    name = text[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        valid = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
        raise ModelLoadError(f"unknown built-in model {text!r}; the built-in models are: {valid}")
    return name


def builtin_model(name: str, cache_dir: Path) -> Path:
    """The folder of built-in model ``name``: shipped, or built under ``cache_dir`` (``Folders.models``) once."""
    if builtin_name(BUILTIN_PREFIX + name) == "omni-speech":
        from omniserve.models.demo.speaking import speaking_demo_path

        return speaking_demo_path(demo_model_path(), cache_dir)
    return demo_model_path()


def builtin_served_name(name: str) -> str:
    """The name clients use for built-in model ``name`` (not its cache folder's name)."""
    from omniserve.models.demo.speaking import SPEAKING_MODEL_NAME

    return SPEAKING_MODEL_NAME if builtin_name(BUILTIN_PREFIX + name) == "omni-speech" else DEMO_MODEL_NAME
