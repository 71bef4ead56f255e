"""The playground page in headless Chromium against real servers: it loads without a key, streams replies
as they arrive (text, a picked image, a dropped audio clip), shows HTML in a reply as text, moves its
metrics plots, copies the exact request as Python and curl (both run), plays audio replies, asks for the
API key and keeps it in the tab only; and the rule for when it is served (loopback, ``--ui``).

Where a reply must be known in advance (the HTML one, the slow stream), the engine's ``stream`` hook is
scripted as tests/test_tools.py does; everything else (HTTP, SSE, metrics, the browser) is real.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from omniserve.config import DeployOptions, EngineConfig, ServerConfig
from omniserve.engines.base import ChoiceDelta, GenerationRequest
from omniserve.flags import parse_argv
from omniserve.k8s_values import extra_args
from omniserve.server.app import build_app
from omniserve.server.playground import CONTENT_SECURITY_POLICY, ui_enabled
from tests.browser import chromium, console, errors, screenshot
from tests.conftest import RunningServer, start_server
from tests.media_factory import audio_bytes, png_bytes, video_bytes

MODEL = "tiny-omni"


# ---------------------------------------------------------------- helpers


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def set_field(driver: Any, element_id: str, value: object) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(str(value))


def send(driver: Any, text: str) -> None:
    by_id(driver, "prompt").send_keys(text)
    by_id(driver, "send").click()


_LAST_REPLY = """
const bubble = [...document.querySelectorAll('.message.assistant')].pop();
if (!bubble) return null;
const meta = [...bubble.querySelectorAll('.meta')].map((p) => p.textContent).join(' | ');
return {classes: [...bubble.classList], text: bubble.querySelector('.text').textContent, meta: meta,
        chunks: Number(bubble.dataset.chunks || 0)};
"""


def last_reply(driver: Any) -> dict[str, Any] | None:
    return driver.execute_script(_LAST_REPLY)


def finished_reply(driver: Any, timeout: float = 60.0) -> dict[str, Any]:
    """The last reply once it has finished; a failed one fails the test with the page's error line."""

    def finished(d: Any) -> dict[str, Any] | None:
        reply = last_reply(d)
        return reply if reply and {"done", "failed", "stopped"} & set(reply["classes"]) else None

    reply = wait(driver, finished, timeout)
    assert "done" in reply["classes"], reply["meta"]
    return reply


def plot(driver: Any, name: str) -> dict[str, str]:
    """What a metrics plot shows: its data (``data-*``) and its pixels."""
    return driver.execute_script(
        "const c = document.getElementById('plot-' + arguments[0]);"
        "return {last: c.dataset.last || '', max: c.dataset.max || '', pixels: c.toDataURL()};",
        name,
    )


def drop(driver: Any, name: str, data: bytes, mime: str) -> None:
    """Drag-and-drop of one file onto the chat column, as a browser dispatches it."""
    driver.execute_script(
        """
        const [name, b64, type] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type}));
        const chat = document.getElementById('chat');
        chat.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        chat.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """,
        name,
        base64.b64encode(data).decode(),
        mime,
    )


def no_console_errors(driver: Any) -> list[dict[str, Any]]:
    messages = console(driver)
    assert errors(messages) == [], errors(messages)
    return messages


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def page(browser: Any, omni_server: RunningServer) -> Any:
    """The playground on the tiny omni server, freshly loaded, its model list filled."""
    console(browser)  # what earlier tests left
    browser.get(f"{omni_server.base_url}/")
    wait(browser, lambda d: by_id(d, "model").get_attribute("value") == MODEL)
    return browser


@pytest.fixture
def scripted(omni_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make the engine "write" ``reply`` in ``pieces`` deltas, ``pause`` seconds apart."""

    def script(reply: str, *, pieces: int, pause: float) -> None:
        size = -(-len(reply) // pieces)

        async def stream(request: GenerationRequest, native: Any) -> AsyncIterator[ChoiceDelta]:
            for index in range(request.sampling.n):
                for start in range(0, len(reply), size):
                    await asyncio.sleep(pause)
                    yield ChoiceDelta(index=index, text=reply[start : start + size], token_ids=[1])
                yield ChoiceDelta(index=index, finish_reason="stop")

        monkeypatch.setattr(omni_server.engine, "stream", stream)

    return script


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen2: Path) -> Iterator[RunningServer]:
    srv = start_server(tiny_qwen2, name="keyed", server={"api_keys": ("s3cret-key",)})
    yield srv
    srv.stop()


# ---------------------------------------------------------------- serving the page


def test_the_page_needs_no_key_loads_only_its_own_files_and_is_not_in_the_api(
    omni_server: RunningServer, keyed_server: RunningServer
) -> None:
    for base in (omni_server.base_url, keyed_server.base_url):
        for path in ("/", "/playground"):
            answer = httpx.get(base + path)
            assert answer.status_code == 200, path
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            page = answer.text
        for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
            answer = httpx.get(f"{base}/playground/{asset}")
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    # everything it loads is its own (relative URLs) or inline data; no CDN, so it works offline
    assert re.findall(r"(?:src|href)=\"([^\"]*)\"", page) == [
        "data:,",
        "playground/playground.css",
        "playground/playground.js",
    ]
    script = httpx.get(f"{omni_server.base_url}/playground/playground.js").text
    for unsafe in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "localStorage.", "sessionStorage.", ".cookie"):
        assert unsafe not in script, unsafe  # model text is never parsed as HTML; the key is never stored
    assert not {"/", "/playground"} & set(httpx.get(f"{omni_server.base_url}/openapi.json").json()["paths"])


@pytest.mark.parametrize(
    ("host", "ui", "served"),
    [
        ("127.0.0.1", None, True),
        ("127.0.0.2", None, True),
        ("::1", None, True),
        ("localhost", None, True),
        ("0.0.0.0", None, False),
        ("::", None, False),
        ("10.0.0.7", None, False),
        ("my-host.example", None, False),
        ("0.0.0.0", True, True),
        ("127.0.0.1", False, False),
    ],
)
def test_on_for_a_loopback_server_off_elsewhere_unless_asked(host: str, ui: bool | None, served: bool) -> None:
    assert ui_enabled(ServerConfig(host=host, ui=ui)) is served


def test_a_server_bound_elsewhere_answers_404_at_the_page_unless_ui(
    omni_server: RunningServer, tiny_omni: Path
) -> None:
    from starlette.testclient import TestClient

    engine_config = EngineConfig(model=tiny_omni, served_model_name=MODEL)
    for server, status in ((ServerConfig(host="0.0.0.0"), 404), (ServerConfig(host="0.0.0.0", ui=True), 200)):
        # without `with`, the lifespan does not run: the routes are checked, the running engine is not restarted
        client = TestClient(build_app(omni_server.engine, engine_config, server))
        for path in ("/", "/playground", "/playground/playground.js"):
            answer = client.get(path)
            assert answer.status_code == status, (server.ui, path)
        if status == 404:
            assert answer.json()["error"]["code"] == "not_found"


def test_ui_flags_reach_the_pod_only_when_given() -> None:
    assert parse_argv(DeployOptions, [], what="deploy").server.ui is None
    assert parse_argv(DeployOptions, ["--ui"], what="deploy").server.ui is True
    assert parse_argv(DeployOptions, ["--no-ui"], what="deploy").server.ui is False
    # the chart's pod binds 0.0.0.0: the automatic default stays automatic there (off), a choice travels
    assert not [arg for arg in extra_args(DeployOptions()) if "ui" in arg]
    for ui, flag in ((True, "--ui"), (False, "--no-ui")):
        args = extra_args(DeployOptions(server=ServerConfig(ui=ui)))
        assert flag in args
        assert parse_argv(DeployOptions, args, what="deploy").server.ui is ui


# ---------------------------------------------------------------- the page in Chromium


def test_a_reply_streams_in_piece_by_piece_and_the_metrics_plots_move(page: Any, scripted: Any) -> None:
    reply = "The quick brown fox jumps over the lazy dog. " * 3
    scripted(reply, pieces=12, pause=0.25)  # three seconds: several metrics samples see it running
    wait(page, lambda d: plot(d, "running")["last"] != "")  # the first sample is drawn
    before = {name: plot(page, name) for name in ("running", "tokens", "ttft")}
    send(page, "hello")

    def partial(d: Any) -> str | None:
        now = last_reply(d)
        return now["text"] if now and "streaming" in now["classes"] and now["text"] else None

    shown = wait(page, partial, 15)
    assert reply.startswith(shown) and len(shown) < len(reply)  # on screen before the reply was complete
    done = finished_reply(page)
    assert done["text"] == reply and done["chunks"] == 12
    assert re.search(r"finish: stop · \d+ prompt \+ 12 completion tokens", done["meta"]), done["meta"]

    def moved(d: Any) -> bool:
        running, tokens, ttft = plot(d, "running"), plot(d, "tokens"), plot(d, "ttft")
        return float(running["max"] or 0) >= 1 and float(tokens["max"] or 0) > 0 and ttft["last"] != ""

    wait(page, moved, 10)
    for name in ("running", "tokens", "ttft"):
        assert plot(page, name)["pixels"] != before[name]["pixels"], name  # redrawn, not only new data
    assert float(plot(page, "ttft")["last"]) >= 250  # the first piece came after a 0.25 s pause
    no_console_errors(page)


def test_html_in_a_reply_is_shown_as_text(page: Any, scripted: Any) -> None:
    reply = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b> & <i>done</i>'
    scripted(reply, pieces=7, pause=0.01)  # the tags arrive cut in pieces, as tokens would cut them
    send(page, "write some HTML")
    assert finished_reply(page)["text"] == reply
    found = page.execute_script(
        "const b = [...document.querySelectorAll('.message.assistant')].pop();"
        "return [b.querySelectorAll('script, img, b, i').length, typeof window.pwned];"
    )
    assert found == [0, "undefined"]
    no_console_errors(page)


def test_a_picked_image_and_dropped_clips_reach_the_model(page: Any, client: Any, tmp_path: Path) -> None:
    image, audio, video = png_bytes(64, 64), audio_bytes("wav", 1.0), video_bytes("mp4", seconds=1, fps=4)
    (tmp_path / "square.png").write_bytes(image)
    by_id(page, "files").send_keys(str(tmp_path / "square.png"))
    drop(page, "tone.wav", audio, "audio/wav")
    drop(page, "square.mp4", video, "")  # no type: known by its extension
    wait(page, lambda d: len(d.find_elements("css selector", "#attachments li")) == 3)
    chips = by_id(page, "attachments").text
    assert "image: square.png" in chips and "audio: tone.wav" in chips and "video: square.mp4" in chips
    set_field(page, "max_tokens", 8)
    question = "What do you see and hear?"
    send(page, question)
    reply = finished_reply(page)
    prompt_tokens = int(re.search(r"(\d+) prompt", reply["meta"]).group(1))
    # the same parts sent by the official client give the same prompt: the page sent all three, decodable
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}},
        {"type": "text", "text": question},
    ]
    same = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=1)
    alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=1)
    assert prompt_tokens == same.usage.prompt_tokens > alone.usage.prompt_tokens + 30
    shown = page.execute_script(
        "const b = [...document.querySelectorAll('.message.user')].pop();"
        "return [b.querySelectorAll('img, audio, video').length, b.textContent];"
    )
    assert shown == [3, f"user{question}"]
    assert by_id(page, "attachments").text == ""  # sent, so no longer pending
    wait(page, lambda d: float(plot(d, "tokens")["max"] or 0) > 0, 10)  # the screenshot shows the plots moved
    path = screenshot(page, "playground.png")
    assert path.stat().st_size > 10_000
    no_console_errors(page)


def test_copy_as_python_and_curl_is_the_exact_request_and_both_run(page: Any, tmp_path: Path) -> None:
    image = tmp_path / "tiny.png"
    image.write_bytes(png_bytes(32, 32))
    by_id(page, "files").send_keys(str(image))
    set_field(page, "temperature", 0.5)
    set_field(page, "seed", 7)
    set_field(page, "max_tokens", 4)
    set_field(page, "system", "Be brief.")
    by_id(page, "prompt").send_keys("Describe it.")
    wait(page, lambda d: len(d.find_elements("css selector", "#attachments li")) == 1)
    by_id(page, "show-code").click()
    wait(page, lambda d: by_id(d, "code-full").get_attribute("value"))
    python = by_id(page, "code-full").get_attribute("value")
    assert "base64 characters]" in by_id(page, "code-view").text  # the long data URL is shortened on screen only
    request = ast.literal_eval(python.split("create(**", 1)[1].split(")\nfor chunk", 1)[0])
    assert request == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(image)}},
                    {"type": "text", "text": "Describe it."},
                ],
            },
        ],
        "temperature": 0.5,  # top_p, left empty, is left out: the server's default applies
        "max_tokens": 4,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    by_id(page, "tab-curl").click()
    wait(page, lambda d: by_id(d, "code-full").get_attribute("value").startswith("curl"))
    curl = by_id(page, "code-full").get_attribute("value")
    assert json.loads(curl.split("<<'JSON'\n", 1)[1].rsplit("\nJSON\n", 1)[0]) == request
    by_id(page, "code-copy").click()
    wait(page, lambda d: by_id(d, "code-copied").text)
    screenshot(page, "playground-copy-as-curl.png")
    by_id(page, "code-close").click()

    ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    if shutil.which("curl"):
        ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0 and ran.stdout.rstrip().endswith("data: [DONE]"), ran.stdout[-500:]
    no_console_errors(page)


def test_audio_replies_play_streamed_or_whole(page: Any) -> None:
    """No omniserve model speaks yet, so the two answer shapes OpenAI uses for audio (``delta.audio``
    pieces of pcm16 at 24 kHz, and a whole ``message.audio`` clip) are answered by the page's own fetch."""
    samples = (np.sin(np.arange(12_000) * 2 * np.pi * 440 / 24_000) * 8000).astype("<i2").tobytes()  # 0.5 s
    pieces = [base64.b64encode(samples[i : i + 6000]).decode() for i in range(0, len(samples), 6000)]
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Listen:"}}]}]
    events += [{"choices": [{"index": 0, "delta": {"audio": {"id": "a1", "data": piece}}}]} for piece in pieces]
    events += [{"choices": [{"index": 0, "delta": {"audio": {"transcript": "a tone"}}, "finish_reason": "stop"}]}]
    wav = base64.b64encode(audio_bytes("wav", 0.25, sample_rate=16_000)).decode()
    whole = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Here.", "audio": {"id": "a2", "data": wav}},
            }
        ]
    }
    page.execute_script(
        """
        const [events, whole] = arguments;
        const real = window.fetch;
        window.fetch = async (url, init) => {
          if (!String(url).endsWith('chat/completions')) return real(url, init);
          if (JSON.parse(init.body).stream) {
            const text = events.map((e) => 'data: ' + JSON.stringify(e) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
            return new Response(text, {headers: {'Content-Type': 'text/event-stream'}});
          }
          return new Response(JSON.stringify(whole), {headers: {'Content-Type': 'application/json'}});
        };
        """,
        events,
        whole,
    )
    durations = []
    for stream in (True, False):
        if by_id(page, "stream").is_selected() != stream:
            by_id(page, "stream").click()
        send(page, "say something")
        reply = finished_reply(page, 15)
        assert reply["text"] == ("Listen:" if stream else "Here.")
        duration = wait(
            page,
            lambda d: d.execute_script(
                "const a = [...document.querySelectorAll('.message.assistant')].pop().querySelector('audio');"
                "return a && a.readyState >= 1 && isFinite(a.duration) ? a.duration : null;"
            ),
            10,
        )
        durations.append(duration)
    assert durations == [pytest.approx(0.5, abs=0.01), pytest.approx(0.25, abs=0.01)]
    assert "transcript: a tone" in by_id(page, "messages").text
    no_console_errors(page)


def test_a_server_with_a_key_asks_for_it_and_keeps_it_in_the_tab_only(
    browser: Any, keyed_server: RunningServer
) -> None:
    console(browser)
    browser.get(f"{keyed_server.base_url}/playground")
    dialog_open = "return document.getElementById('key-dialog').open"
    wait(browser, lambda d: d.execute_script(dialog_open))
    assert "missing API key" in by_id(browser, "key-reason").text
    screenshot(browser, "playground-api-key.png")
    by_id(browser, "key-input").send_keys("wrong-key")
    by_id(browser, "key-ok").click()
    wait(browser, lambda d: d.execute_script(dialog_open) and "invalid API key" in by_id(d, "key-reason").text)
    by_id(browser, "key-input").send_keys("s3cret-key")
    by_id(browser, "key-ok").click()
    wait(browser, lambda d: by_id(d, "model").get_attribute("value") == "keyed")
    set_field(browser, "max_tokens", 4)
    send(browser, "hello")
    finished_reply(browser)
    # the key lives in the page's memory: no storage, no cookie, not in the copied snippet (read from the environment)
    assert browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    by_id(browser, "show-code").click()
    python = wait(browser, lambda d: by_id(d, "code-full").get_attribute("value"))
    assert "s3cret-key" not in python and 'os.environ["OMNISERVE_API_KEY"]' in python
    env = {**os.environ, "OMNISERVE_API_KEY": "s3cret-key"}
    ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    # the only errors are the two refusals the prompt answered, which Chromium logs as failed loads
    refused = errors(console(browser))
    assert len(refused) == 2 and all("401 (Unauthorized)" in line for line in refused), refused


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
