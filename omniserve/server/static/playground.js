// omniserve playground: chat with the served model through /v1/chat/completions, watch /metrics.
//
// Plain JavaScript, no build step, no library: served by omniserve itself so it works offline.
// Rules this file keeps:
//   - whatever the model (or the server, or a file name) says is put in the page as text
//     (textContent / Text nodes), never parsed as HTML;
//   - the API key lives in `state.key` only (never localStorage, sessionStorage or a cookie):
//     closing or reloading the tab forgets it;
//   - every request the page makes goes through api(), which sends the key and asks for one on a 401.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    key: null, // the API key, in this tab's memory only
    keyPrompt: null, // the pending question for a key, shared by every request that got a 401
    history: [], // the conversation as sent: OpenAI messages
    attachments: [], // {kind, name, size, part, previewUrl}
    lastRequest: null,
    controller: null, // aborts the running request (Stop)
  };

  // ------------------------------------------------------------------ requests

  class ApiError extends Error {}

  async function errorText(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (_) {
      // not JSON: show the text
    }
    return `${response.status}: ${text.slice(0, 300) || response.statusText}`;
  }

  function askForKey(reason) {
    if (!state.keyPrompt) {
      state.keyPrompt = new Promise((resolve) => {
        const dialog = $("key-dialog");
        $("key-reason").textContent = reason;
        $("key-input").value = "";
        const finish = (key) => {
          $("key-form").onsubmit = null;
          $("key-cancel").onclick = null;
          dialog.oncancel = null;
          dialog.close();
          state.keyPrompt = null;
          resolve(key);
        };
        $("key-form").onsubmit = (event) => {
          event.preventDefault();
          finish($("key-input").value.trim()); // "" : no key
        };
        $("key-cancel").onclick = () => finish(null);
        dialog.oncancel = (event) => {
          event.preventDefault();
          finish(null);
        };
        dialog.showModal();
        $("key-input").focus();
      });
    }
    return state.keyPrompt;
  }

  // Every call to the server: with the key when there is one; a 401 asks for a key and tries again.
  async function api(path, init = {}) {
    for (;;) {
      const headers = new Headers(init.headers || {});
      if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      const reason = await errorText(response);
      const key = await askForKey(`The server refused the request (${reason}). Enter an API key:`);
      if (!key) throw new ApiError(`${reason} (no API key given)`);
      state.key = key;
    }
  }

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  async function loadModels() {
    try {
      const response = await api("v1/models");
      if (!response.ok) throw new ApiError(await errorText(response));
      const body = await response.json();
      const select = $("model");
      const previous = select.value;
      select.replaceChildren();
      for (const model of body.data || []) {
        const option = document.createElement("option");
        option.value = model.id;
        option.textContent = model.max_model_len ? `${model.id} (${model.max_model_len} tokens)` : model.id;
        select.append(option);
      }
      if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
      setStatus(select.options.length ? "ready" : "no model served", !select.options.length);
    } catch (error) {
      setStatus(`models: ${error.message}`, true);
    }
  }

  // ------------------------------------------------------------------ attachments

  const EXTENSIONS = {
    image: { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", bmp: "image/bmp" },
    video: { mp4: "video/mp4", webm: "video/webm", mov: "video/quicktime", mkv: "video/x-matroska", avi: "video/x-msvideo" },
    audio: {
      wav: "audio/wav", mp3: "audio/mpeg", flac: "audio/flac", ogg: "audio/ogg", m4a: "audio/mp4",
      aac: "audio/aac", opus: "audio/opus", webm: "audio/webm",
    },
  };
  // input_audio's `format` from a MIME type (the server decodes wav, flac, ogg, mp3, m4a/aac, opus, webm)
  const AUDIO_FORMATS = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav", "audio/mpeg": "mp3",
    "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg", "audio/opus": "opus",
    "audio/webm": "webm", "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac",
  };

  function classify(file) {
    const extension = (file.name.split(".").pop() || "").toLowerCase();
    const type = file.type || "";
    for (const kind of ["image", "video", "audio"]) {
      if (type.startsWith(`${kind}/`)) return { kind, mime: type, extension };
    }
    for (const kind of ["image", "video", "audio"]) {
      if (EXTENSIONS[kind][extension]) return { kind, mime: EXTENSIONS[kind][extension], extension };
    }
    return null;
  }

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      const found = classify(file);
      if (!found) {
        setStatus(`${file.name}: not an image, video or audio file`, true);
        continue;
      }
      const dataUrl = await readDataUrl(file);
      const base64 = dataUrl.slice(dataUrl.indexOf(",") + 1);
      const url = `data:${found.mime};base64,${base64}`; // the picked type, even when the browser had none
      let part;
      if (found.kind === "image") part = { type: "image_url", image_url: { url } };
      else if (found.kind === "video") part = { type: "video_url", video_url: { url } };
      else {
        const format = AUDIO_FORMATS[found.mime] || found.extension || "wav";
        part = { type: "input_audio", input_audio: { data: base64, format } };
      }
      state.attachments.push({ kind: found.kind, name: file.name, size: file.size, part, previewUrl: URL.createObjectURL(file) });
    }
    renderAttachments();
  }

  function sizeText(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  function mediaElement(kind, url) {
    const element = document.createElement(kind === "image" ? "img" : kind);
    element.src = url;
    if (kind !== "image") element.controls = true;
    else element.alt = "attached image";
    return element;
  }

  function renderAttachments() {
    const list = $("attachments");
    list.replaceChildren();
    state.attachments.forEach((item, index) => {
      const li = document.createElement("li");
      if (item.kind === "image") li.append(mediaElement("image", item.previewUrl));
      const label = document.createElement("span");
      label.textContent = `${item.kind}: ${item.name} (${sizeText(item.size)})`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = `remove ${item.name}`;
      remove.onclick = () => {
        URL.revokeObjectURL(item.previewUrl);
        state.attachments.splice(index, 1);
        renderAttachments();
      };
      li.append(label, remove);
      list.append(li);
    });
  }

  // ------------------------------------------------------------------ the conversation

  function addBubble(role) {
    $("empty-hint")?.remove();
    const bubble = document.createElement("article");
    bubble.className = `message ${role}`;
    const who = document.createElement("header");
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    bubble.append(who, body);
    $("messages").append(bubble);
    return bubble;
  }

  function note(bubble, text, className = "meta") {
    const line = document.createElement("p");
    line.className = className;
    line.textContent = text;
    bubble.append(line);
    return line;
  }

  function scrollDown() {
    const messages = $("messages");
    messages.scrollTop = messages.scrollHeight;
  }

  function numberField(id) {
    const input = $(id);
    if (input.value === "" || !input.checkValidity()) return undefined;
    return Number(input.value);
  }

  // The request Send would make now: the history so far, plus the composer's message when `next` is given.
  function buildRequest(next) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    if (next) messages.push(next);
    const request = { model: $("model").value, messages };
    for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
      const value = numberField(name);
      if (value !== undefined) request[name] = value;
    }
    if ($("stream").checked) {
      request.stream = true;
      request.stream_options = { include_usage: true };
    }
    return request;
  }

  function composedMessage() {
    const text = $("prompt").value.trim();
    if (!text && !state.attachments.length) return null;
    if (!state.attachments.length) return { role: "user", content: text };
    const content = state.attachments.map((item) => item.part);
    if (text) content.push({ type: "text", text });
    return { role: "user", content };
  }

  // Audio replies (message.audio / delta.audio, as OpenAI sends them): base64 pieces of one clip.
  class AudioReply {
    constructor(bubble) {
      this.bubble = bubble;
      this.pieces = [];
      this.transcript = "";
      this.format = null;
    }

    add(audio) {
      if (!audio) return;
      if (audio.data) this.pieces.push(audio.data);
      if (audio.transcript) this.transcript += audio.transcript;
      if (audio.format) this.format = audio.format;
    }

    // the clip as a player under the reply (a Text node carries the transcript)
    finish() {
      if (!this.pieces.length) return;
      const bytes = concatBase64(this.pieces);
      const type = containerType(bytes, this.format);
      const blob = type ? new Blob([bytes], { type }) : withWavHeader(bytes);
      const player = document.createElement("audio");
      player.controls = true;
      player.className = "reply-audio";
      player.src = URL.createObjectURL(blob);
      this.bubble.append(player);
      if (this.transcript) note(this.bubble, `transcript: ${this.transcript}`);
    }
  }

  function concatBase64(pieces) {
    const chunks = pieces.map((piece) => Uint8Array.from(atob(piece), (c) => c.charCodeAt(0)));
    const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
    let at = 0;
    for (const chunk of chunks) {
      out.set(chunk, at);
      at += chunk.length;
    }
    return out;
  }

  // A container is recognised by its first bytes; null is raw pcm16 (what OpenAI streams:
  // 24 kHz mono, little-endian), which a browser plays once it has a WAV header.
  function containerType(bytes, format) {
    const head = String.fromCharCode(...bytes.slice(0, 4));
    if (head === "RIFF") return "audio/wav";
    if (head === "OggS") return "audio/ogg";
    if (head === "fLaC") return "audio/flac";
    if (head.startsWith("ID3") || (bytes[0] === 0xff && (bytes[1] & 0xe0) === 0xe0)) return "audio/mpeg";
    if (format && format !== "pcm16" && AUDIO_FORMATS[`audio/${format}`]) return `audio/${format}`;
    return null;
  }

  function withWavHeader(pcm, rate = 24000) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
    text(0, "RIFF");
    header.setUint32(4, 36 + pcm.length, true);
    text(8, "WAVEfmt ");
    header.setUint32(16, 16, true);
    header.setUint16(20, 1, true); // PCM
    header.setUint16(22, 1, true); // mono
    header.setUint32(24, rate, true);
    header.setUint32(28, rate * 2, true);
    header.setUint16(32, 2, true);
    header.setUint16(34, 16, true);
    text(36, "data");
    header.setUint32(40, pcm.length, true);
    return new Blob([header.buffer, pcm], { type: "audio/wav" });
  }

  function usageText(usage) {
    return `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
  }

  // Server-sent events: `data: <json>` blocks separated by a blank line, `data: [DONE]` last.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function readStream(response, bubble, text, audio) {
    let finish = null;
    let usage = null;
    let chunks = 0;
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message || "the stream ended with an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const delta = choice.delta || {};
        if (delta.content) {
          text.appendData(delta.content); // a Text node: the reply is never parsed as HTML
          chunks += 1;
          bubble.dataset.chunks = String(chunks);
          scrollDown();
        }
        for (const call of delta.tool_calls || []) {
          if (call.function) text.appendData(`${call.function.name || ""}${call.function.arguments || ""}`);
        }
        audio.add(delta.audio);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    return { finish, usage };
  }

  async function readWhole(response, text, audio) {
    const body = await response.json();
    const choice = (body.choices || [])[0] || {};
    const message = choice.message || {};
    if (message.content) text.appendData(message.content);
    for (const call of message.tool_calls || []) {
      text.appendData(`${call.function.name}(${call.function.arguments})`);
    }
    audio.add(message.audio);
    return { finish: choice.finish_reason, usage: body.usage };
  }

  async function send() {
    if (state.controller) return;
    const message = composedMessage();
    if (!message) return;
    if (!$("model").value) {
      setStatus("no model to talk to yet", true);
      return;
    }
    const request = buildRequest(message);
    state.lastRequest = request;

    const mine = addBubble("user");
    mine.querySelector(".text").textContent = $("prompt").value.trim();
    for (const item of state.attachments) mine.append(mediaElement(item.kind, item.previewUrl));
    $("prompt").value = "";
    state.attachments = [];
    renderAttachments();

    const bubble = addBubble("assistant");
    bubble.classList.add("streaming");
    const text = document.createTextNode("");
    bubble.querySelector(".text").append(text);
    const audio = new AudioReply(bubble);
    scrollDown();

    state.controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    try {
      const response = await api("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: state.controller.signal,
      });
      if (!response.ok) throw new ApiError(await errorText(response));
      const result = request.stream
        ? await readStream(response, bubble, text, audio)
        : await readWhole(response, text, audio);
      audio.finish();
      state.history.push(message, { role: "assistant", content: text.data });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const parts = [`${seconds} s`, result.finish ? `finish: ${result.finish}` : null];
      if (result.usage) parts.push(usageText(result.usage));
      note(bubble, parts.filter(Boolean).join(" · "));
      bubble.classList.add("done");
    } catch (error) {
      const stopped = error.name === "AbortError";
      note(bubble, stopped ? "stopped" : `error: ${error.message}`, stopped ? "meta" : "meta error");
      bubble.classList.add(stopped ? "stopped" : "failed");
      mine.classList.add("not-kept");
      mine.title = "not part of the conversation sent next (the request did not complete)";
    } finally {
      bubble.classList.remove("streaming");
      state.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      scrollDown();
    }
  }

  // ------------------------------------------------------------------ copy as Python / curl

  function pythonLiteral(value, indent = "") {
    const inner = `${indent}    `;
    if (value === null || value === undefined) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (typeof value === "number") return String(value);
    if (typeof value === "string") return JSON.stringify(value); // JSON string escapes are Python's too
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return `[\n${value.map((v) => inner + pythonLiteral(v, inner)).join(",\n")},\n${indent}]`;
    }
    const keys = Object.keys(value);
    if (!keys.length) return "{}";
    return `{\n${keys.map((k) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(value[k], inner)}`).join(",\n")},\n${indent}}`;
  }

  function snippets(request) {
    const base = new URL("v1", window.location.href).href;
    // the key is never copied: the snippets read it from OMNISERVE_API_KEY
    const python = [
      ...(state.key ? ["import os", ""] : []),
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=${state.key ? 'os.environ["OMNISERVE_API_KEY"]' : '"none"'})`,
      `reply = client.chat.completions.create(**${pythonLiteral(request)})`,
    ];
    if (request.stream) {
      python.push(
        "for chunk in reply:",
        "    if chunk.choices and chunk.choices[0].delta.content:",
        '        print(chunk.choices[0].delta.content, end="", flush=True)',
        "print()",
      );
    } else {
      python.push("print(reply.choices[0].message.content)");
    }
    const curl = [
      `curl ${request.stream ? "-N " : ""}${base}/chat/completions \\`,
      "  -H 'Content-Type: application/json' \\",
      ...(state.key ? ["  -H \"Authorization: Bearer $OMNISERVE_API_KEY\" \\"] : []),
      "  --data-binary @- <<'JSON'",
      JSON.stringify(request, null, 2),
      "JSON",
    ];
    return { python: `${python.join("\n")}\n`, curl: `${curl.join("\n")}\n` };
  }

  // long data: URLs and base64 clips shortened for the eye; Copy takes the full text
  function shortened(text) {
    return text.replace(/(data:[\w/.+-]+;base64,|"data": ")([A-Za-z0-9+/=]{120,})/g, (_, head, body) =>
      `${head}${body.slice(0, 40)}…[${body.length} base64 characters]`);
  }

  function showCode(which) {
    const dialog = $("code-dialog");
    const pending = composedMessage();
    const request = pending ? buildRequest(pending) : state.lastRequest || buildRequest(null);
    $("code-title").textContent = pending
      ? "The request Send would make now"
      : state.lastRequest ? "The last request sent" : "A request (the conversation is empty)";
    const code = snippets(request);
    const shown = code[which];
    $("code-full").value = shown;
    $("code-view").textContent = shortened(shown);
    $("code-note").textContent = shown.length !== shortened(shown).length
      ? "Media shortened on screen; Copy copies the full request."
      : state.key ? "Your key is not copied: the snippet reads it from OMNISERVE_API_KEY." : "";
    $("tab-python").setAttribute("aria-selected", String(which === "python"));
    $("tab-curl").setAttribute("aria-selected", String(which === "curl"));
    dialog.dataset.which = which;
    $("code-copied").textContent = "";
    if (!dialog.open) dialog.showModal();
  }

  async function copyCode() {
    const full = $("code-full");
    try {
      await navigator.clipboard.writeText(full.value);
      $("code-copied").textContent = "copied";
    } catch (_) {
      // no clipboard permission (plain http from another host): select it for Ctrl+C
      full.focus();
      full.select();
      $("code-copied").textContent = "selected: press Ctrl+C";
    }
  }

  // ------------------------------------------------------------------ live metrics

  const WINDOW = 60; // samples kept (one a second)
  const series = { running: [], queued: [], tokens: [], ttft: [] };
  let previous = null;

  function parseMetrics(text) {
    const totals = {};
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = /^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      totals[match[1]] = (totals[match[1]] || 0) + Number(match[3]);
    }
    return totals;
  }

  function push(name, value) {
    const values = series[name];
    values.push(value);
    if (values.length > WINDOW) values.shift();
  }

  function draw(name, unit, digits) {
    const canvas = $(`plot-${name}`);
    const values = series[name];
    const known = values.filter((v) => v !== null);
    const top = Math.max(1e-9, ...known);
    const last = known.length ? known[known.length - 1] : null;
    canvas.dataset.last = last === null ? "" : String(last);
    canvas.dataset.max = known.length ? String(Math.max(...known)) : "";
    canvas.dataset.samples = String(values.length);
    $(`value-${name}`).textContent = last === null ? "–" : `${last.toFixed(digits)}${unit}`;

    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth * ratio;
    const height = canvas.clientHeight * ratio;
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, width, height);
    const styles = getComputedStyle(canvas);
    const pad = 2 * ratio;
    const x = (i) => pad + ((width - 2 * pad) * (i + WINDOW - values.length)) / (WINDOW - 1);
    const y = (v) => height - pad - ((height - 2 * pad) * v) / (top * 1.15);
    context.lineWidth = 1.5 * ratio;
    context.strokeStyle = styles.color;
    context.fillStyle = styles.color;
    context.beginPath();
    values.forEach((v, i) => {
      if (v === null) return;
      const joined = i > 0 && values[i - 1] !== null;
      if (joined) context.lineTo(x(i), y(v));
      else context.moveTo(x(i), y(v));
      const alone = !joined && (i === values.length - 1 || values[i + 1] === null);
      if (alone) context.fillRect(x(i) - ratio * 1.5, y(v) - ratio * 1.5, ratio * 3, ratio * 3); // a lone sample: a dot
    });
    context.stroke();
    context.font = `${10 * ratio}px sans-serif`;
    context.fillText(`max ${Math.max(...known, 0).toFixed(digits)}${unit}`, pad + 2 * ratio, 11 * ratio);
  }

  async function pollMetrics() {
    try {
      const response = await api("metrics");
      if (!response.ok) throw new ApiError(await errorText(response));
      const now = performance.now() / 1000;
      const totals = parseMetrics(await response.text());
      const sample = {
        time: now,
        tokens: totals.omniserve_completion_tokens_total || 0,
        ttftSum: totals.omniserve_time_to_first_token_seconds_sum || 0,
        ttftCount: totals.omniserve_time_to_first_token_seconds_count || 0,
      };
      push("running", totals.omniserve_running_requests || 0);
      push("queued", totals.omniserve_queue_depth || 0);
      if (previous) {
        const seconds = Math.max(1e-3, sample.time - previous.time);
        push("tokens", Math.max(0, sample.tokens - previous.tokens) / seconds);
        const finished = sample.ttftCount - previous.ttftCount;
        // mean TTFT of the requests that started answering since the last sample; a gap when none did
        push("ttft", finished > 0 ? (1000 * (sample.ttftSum - previous.ttftSum)) / finished : null);
      }
      previous = sample;
      draw("running", "", 0);
      draw("queued", "", 0);
      draw("tokens", "", 1);
      draw("ttft", " ms", 0);
      $("metrics-status").textContent = "";
    } catch (error) {
      $("metrics-status").textContent = `unreachable (${error.message})`;
    } finally {
      setTimeout(pollMetrics, 1000);
    }
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      }
    });
    $("prompt").addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.files || [])];
      if (files.length) {
        event.preventDefault();
        addFiles(files);
      }
    });
    $("files").addEventListener("change", async (event) => {
      await addFiles([...event.target.files]);
      event.target.value = "";
    });
    const chat = $("chat");
    chat.addEventListener("dragover", (event) => {
      event.preventDefault();
      chat.classList.add("dropping");
    });
    chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
    chat.addEventListener("drop", (event) => {
      event.preventDefault();
      chat.classList.remove("dropping");
      addFiles([...(event.dataTransfer?.files || [])]);
    });
    $("stop").addEventListener("click", () => state.controller?.abort());
    $("clear").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
      state.history = [];
      state.lastRequest = null;
      $("messages").replaceChildren();
    });
    $("show-code").addEventListener("click", () => showCode("python"));
    $("tab-python").addEventListener("click", () => showCode("python"));
    $("tab-curl").addEventListener("click", () => showCode("curl"));
    $("code-copy").addEventListener("click", copyCode);
    $("code-close").addEventListener("click", () => $("code-dialog").close());
    $("key-button").addEventListener("click", async () => {
      const key = await askForKey("Enter the API key to send with every request (empty: none).");
      if (key === null) return; // cancelled: the key stays as it was
      state.key = key || null;
      loadModels();
    });
  }

  wire();
  loadModels();
  pollMetrics();
})();
