"""Text to speech through an omni checkpoint's own talker and codec (``/v1/audio/speech``).

The request path reads from the file names: ``detect`` (does the served folder speak? read from its
config, no torch), ``qwen2_5_omni`` / ``qwen3_omni`` (one module a model family: load it, list its voices,
text to waveform), ``synthesizer`` (the server's component: one synthesis at a time off the event loop,
bounded waiting, a deadline, cancellation), ``tempo`` (``speed``) and ``encode`` (waveform to
mp3/opus/aac/flac/wav/pcm).

The component is independent of the engine that serves text: it loads the checkpoint itself (thinker,
talker, codec), so a speaking checkpoint costs its weights once more in memory. Importing this package
stays cheap: torch and transformers are imported when a checkpoint is loaded.
"""

from omniserve.speech.detect import speech_family

__all__ = ["speech_family"]
