"""``speed``: play the speech faster or slower without changing its pitch (ffmpeg's ``atempo``, via PyAV)."""

from __future__ import annotations

import numpy as np

#: ``atempo`` takes 0.5..2.0 per instance; OpenAI's 0.25..4.0 is two chained.
_ATEMPO_RANGE = (0.5, 2.0)
#: ``atempo`` holds back its last analysis window (tens of ms) even when flushed, and emits nothing for
#: shorter input: the speech gets this much silence appended, and the result is cut to its exact length.
_TAIL_SECONDS = 0.2


def change_tempo(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """``samples`` (mono float32) played at ``speed`` times the original rate, same pitch and sample rate."""
    if speed == 1.0 or samples.size == 0:
        return samples
    import av

    graph = av.filter.Graph()
    source = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}")
    last = source
    for factor in _factors(speed):
        stage = graph.add("atempo", f"{factor:.6f}")
        last.link_to(stage)
        last = stage
    sink = graph.add("abuffersink")
    last.link_to(sink)
    graph.configure()

    padded = np.concatenate([samples.astype(np.float32), np.zeros(int(_TAIL_SECONDS * sample_rate), np.float32)])
    frame = av.AudioFrame.from_ndarray(padded.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = 0
    graph.push(frame)
    graph.push(None)  # end of stream: atempo flushes what it holds
    out: list[np.ndarray] = []
    while True:
        try:
            result = graph.pull()
        except (av.error.BlockingIOError, av.error.EOFError):
            break
        out.append(result.to_ndarray().reshape(-1))
    stretched = np.concatenate(out).astype(np.float32) if out else samples[:0]
    length = max(1, round(samples.size / speed))
    return np.pad(stretched[:length], (0, max(0, length - stretched.size)))


def _factors(speed: float) -> list[float]:
    """``speed`` as a product of factors each within ``atempo``'s range."""
    low, high = _ATEMPO_RANGE
    factors: list[float] = []
    while speed > high:
        factors.append(high)
        speed /= high
    while speed < low:
        factors.append(low)
        speed /= low
    return [*factors, speed]
