"""Spoken words for the ``spoken`` task, synthesised offline by espeak-ng (the Debian package ``espeak-ng``).

A transcription model needs speech whose words are known exactly. espeak-ng is a formant
synthesiser: small, offline, deterministic for the same text and options (the same version gives
the same bytes), and it has several English voices and variants, so one utterance can be said in
many ways. Each call runs the program once (``--stdout``: a 22.05 kHz WAV whose header gives no
length, since it is written as a stream) and the clip is resampled to 16 kHz mono with
libswresample, as the server's decoder does, then written as the WAV the other audio tasks use.

Which voice, variant, speed, pitch and word gap an utterance gets, and the padding and level of
the clip, are drawn from the example's generator, so one seed gives the same bytes.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from omniserve.synth.media import SAMPLE_RATE

#: The program the task runs unless told otherwise: ``espeak-ng`` on ``PATH``.
ESPEAK_PROGRAM = "espeak-ng"
DEBIAN_PACKAGE = "espeak-ng"
#: English voices of espeak-ng 1.51 (Debian 12) and variants (``voice+variant``: other timbres, female ones too).
VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland")
VARIANTS: tuple[str, ...] = ("", "+f2", "+f4", "+m3")
_SPEED_WPM = (130, 191)  # words per minute, [low, high)
_PITCH = (30, 71)  # espeak's 0-99 scale
_WORD_GAP = (0, 5)  # extra pause between words, in units of 10 ms
_PAD_SECONDS = 0.3  # most silence before and after the speech
_TIMEOUT_SECONDS = 30.0


class SpeechSynthesizerMissing(ValueError):
    """espeak-ng cannot be run: the message names the program looked for and the Debian package to install."""


@dataclass(frozen=True)
class Speaker:
    """How to run espeak-ng: ``program`` is a name looked up on ``PATH`` or a path to the executable."""

    program: str = ESPEAK_PROGRAM

    def resolve(self) -> str:
        """The executable's path; ``SpeechSynthesizerMissing`` (naming the Debian package) when there is none."""
        found = shutil.which(self.program)
        if found is None:
            raise SpeechSynthesizerMissing(
                f"the spoken task needs the speech synthesiser espeak-ng, and {self.program!r} is not an executable "
                f"program here: install the Debian package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}) or "
                "name the program with --espeak-program"
            )
        return found

    def say(self, rng: np.random.Generator, text: str) -> np.ndarray:
        """``text`` spoken in a voice drawn from ``rng``: float32 samples at 16 kHz, padded with silence, levelled."""
        voice = VOICES[int(rng.integers(len(VOICES)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
        speed, pitch = int(rng.integers(*_SPEED_WPM)), int(rng.integers(*_PITCH))
        gap = int(rng.integers(*_WORD_GAP))
        command = [self.resolve(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-g", str(gap), "--stdout", text]
        try:
            done = subprocess.run(command, capture_output=True, timeout=_TIMEOUT_SECONDS, check=False)
        except OSError as exc:  # found but not runnable (no execute permission, a broken file)
            raise SpeechSynthesizerMissing(f"{command[0]} cannot be run ({exc}); reinstall {DEBIAN_PACKAGE}") from None
        if done.returncode != 0 or not done.stdout:
            message = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
            raise RuntimeError(f"espeak-ng failed to say {text!r} with voice {voice}: {message}")
        speech = resample_16k(done.stdout)
        before, after = (int(rng.uniform(0, _PAD_SECONDS) * SAMPLE_RATE) for _ in range(2))
        samples = np.concatenate([np.zeros(before, np.float32), speech, np.zeros(after, np.float32)])
        peak = float(np.abs(samples).max()) or 1.0
        samples = samples * (rng.uniform(0.3, 0.9) / peak) + rng.normal(0, 0.003, size=samples.shape)
        return np.clip(samples, -1, 1).astype(np.float32)


def resample_16k(wav: bytes) -> np.ndarray:
    """Mono float32 samples at 16 kHz of a WAV file (libswresample, as the server decodes uploads)."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(io.BytesIO(wav)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray()[0] for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray()[0] for out in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


#: The speaker of ``omniserve synth`` unless ``--espeak-program`` names another program.
DEFAULT_SPEAKER = Speaker()
