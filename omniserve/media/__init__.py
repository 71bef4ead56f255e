"""Fetch and decode client media (images, videos, audio) within the server's ``MediaLimits``."""

from omniserve.media.audio import SUPPORTED_AUDIO_FORMATS, DecodedAudio, decode_audio
from omniserve.media.fetch import fetch_media_bytes
from omniserve.media.image import decode_image
from omniserve.media.video import DecodedVideo, decode_video

__all__ = [
    "SUPPORTED_AUDIO_FORMATS",
    "DecodedAudio",
    "DecodedVideo",
    "decode_audio",
    "decode_image",
    "decode_video",
    "fetch_media_bytes",
]
