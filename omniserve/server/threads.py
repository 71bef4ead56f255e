"""The gateway's threads, kept apart so that one kind of slow work cannot stall another.

Blocking work runs off the event loop. It used to share the loop's one default pool (``min(32, CPUs +
4)`` threads) and the renderer's one lock: a few slow media decodes (or, on asyncio's own loop, DNS
lookups against a dead resolver) left text-only requests waiting for a thread, and a slow media prompt
held the tokenizer lock every text prompt needed, while ``/health`` stayed green. Now each kind has its
own bounded threads, all owned by the app and ended with it:

- text-only prompts (chat without media, completions): ``Rendering``'s text pool
  (``TEXT_RENDER_THREADS``) with a renderer, and so a tokenizer lock, of their own;
- prompts with media: ``Rendering``'s media pool (``MEDIA_RENDER_THREADS``), a second renderer;
- media decoding (``media.budget.MediaGate`` runs it in ``asyncio.to_thread``): the loop's default pool,
  replaced by ``media_pool``: ``--max-concurrent-decodes`` threads, so that flag is what really decodes
  at once, plus ``LOOKUP_THREADS``;
- DNS lookups for media URLs: under uvloop (uvicorn's choice when installed, as with
  ``uvicorn[standard]``) in libuv's own pool (``UV_THREADPOOL_SIZE``, default 4), which nothing else
  here uses; on asyncio's own loop in the default pool above, next to the decodes (hence
  ``LOOKUP_THREADS``), never in the render pools;
- the engine: its own threads (the transformers worker), and ``Engine.stop`` in a thread of its own,
  so a pool full of stuck media work never holds up shutdown.

Text-only requests therefore need no thread that media work can take.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from omniserve.config import MediaLimits
from omniserve.media.loader import MediaItem
from omniserve.templates.conversation import HFMessage
from omniserve.templates.render import PromptRenderer, RenderedPrompt, RenderOptions

#: Text-only renders. The renderer's lock lets one tokenizer call run at a time; the second thread gets
#: the next prompt going (template, checks) meanwhile.
TEXT_RENDER_THREADS = 2
#: Renders with media (the processor resizes images and frames, extracts audio features): same reasoning.
MEDIA_RENDER_THREADS = 2
#: Default-pool threads beyond the decode slots: DNS lookups on asyncio's own loop, and the odd short
#: blocking call of a library (``asyncio.to_thread``), so they do not wait for a decode slot's thread.
LOOKUP_THREADS = 8


def media_pool(limits: MediaLimits) -> ThreadPoolExecutor:
    """The pool the app installs as its loop's default: media decoding, and DNS on asyncio's own loop."""
    return ThreadPoolExecutor(limits.max_concurrent_decodes + LOOKUP_THREADS, thread_name_prefix="omniserve-media")


class Rendering:
    """Prompt rendering off the event loop, text-only prompts apart from prompts with media.

    Two renderers of the same checkpoint: each has its own tokenizer and lock (fast tokenizers are not
    safe from two threads at once), so a text prompt never waits for the processor to finish a video.
    A text-only model needs one: ``media`` is then ``text`` (it never renders media).
    """

    def __init__(self, text: PromptRenderer, media: PromptRenderer) -> None:
        self.text_renderer = text
        self.media_renderer = media
        self._text = ThreadPoolExecutor(TEXT_RENDER_THREADS, thread_name_prefix="omniserve-render-text")
        self._media = ThreadPoolExecutor(MEDIA_RENDER_THREADS, thread_name_prefix="omniserve-render-media")

    async def chat(
        self, messages: list[HFMessage], media: list[MediaItem], *, options: RenderOptions | None = None
    ) -> RenderedPrompt:
        """``PromptRenderer.render_chat`` in the pool for its kind of prompt."""
        renderer, pool = (self.media_renderer, self._media) if media else (self.text_renderer, self._text)
        call = functools.partial(renderer.render_chat, messages, media, options=options)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def text(self, prompt: str | list[int]) -> RenderedPrompt:
        """``PromptRenderer.render_text`` (a raw completions prompt) in the text pool."""
        return await asyncio.get_running_loop().run_in_executor(self._text, self.text_renderer.render_text, prompt)

    def close(self) -> None:
        """Drop renders not started yet; those running finish in their threads."""
        self._text.shutdown(wait=False, cancel_futures=True)
        self._media.shutdown(wait=False, cancel_futures=True)
