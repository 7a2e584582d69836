// The chat page: sends the whole conversation to /v1/chat/completions (the server keeps
// the KV cache of the shared prefix), streams the answer, colours the text that came
// from accepted draft tokens, and shows live and final stats in the footer.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { messages: [], method: "", controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value;
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function footer(text, state) {
  $("stats").textContent = text;
  $("stats").dataset.state = state;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-label").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  const model = (await response.json()).data[0];
  const info = model.ggspec;
  $("model").textContent = model.id + (info.draft ? " + draft " + info.draft.split("/").pop() : "");
  $("temperature").value = info.temperature;
  $("method").replaceChildren(...info.methods.map((name) => new Option(name, name, false, name === info.method)));
  chat.method = info.method;
}

// Server-Sent Events from a fetch body: yields each event's parsed `data`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ") && event !== "data: [DONE]") yield JSON.parse(event.slice(6));
    }
  }
}

const count = (n) => `${n} token${n === 1 ? "" : "s"}`;

function liveStats(tokens, drafted, started, method) {
  const seconds = (performance.now() - started) / 1000;
  const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "-";
  const share = tokens ? Math.round((100 * drafted) / tokens) : 0;
  return `${count(tokens)} · ${rate} tok/s · ${share}% from drafts · ${method}`;
}

function finalStats(chunk) {
  const t = chunk.timings, g = chunk.ggspec;
  const parts = [count(t.predicted_n), `${t.predicted_per_second.toFixed(1)} tok/s`];
  if (t.draft_n) {
    parts.push(`${Math.round((100 * t.draft_n_accepted) / t.draft_n)}% accepted ` +
               `(${t.draft_n_accepted}/${t.draft_n} drafted, ${g.mean_accepted_length.toFixed(2)}/round)`);
  } else {
    parts.push("no drafts");
  }
  parts.push(g.method, `prompt ${t.prompt_n} new + ${t.cache_n} cached`);
  if (g.first_token_seconds !== null) parts.push(`first token ${Math.round(1000 * g.first_token_seconds)} ms`);
  return parts.join(" · ");
}

async function send(text) {
  const messages = chat.messages;  // "New chat" starts another list; this answer stays with its own
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  const method = $("method").value || chat.method;
  const body = { messages, stream: true, temperature: Number($("temperature").value), method };
  chat.controller = new AbortController();
  busy(true);
  let content = "", tokens = 0, drafted = 0;  // the answer's tokens so far, and those from drafts
  const started = performance.now();
  footer(liveStats(0, 0, started, method), "live");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: chat.controller.signal,
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(problem.error.message);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        const span = document.createElement("span");
        span.textContent = choice.delta.content;
        if (chunk.ggspec.from_draft) {
          span.className = "draft";
          drafted += chunk.ggspec.tokens - tokens;
        }
        tokens = chunk.ggspec.tokens;
        answer.append(span);
        content += choice.delta.content;
        answer.scrollIntoView({ block: "end" });
        footer(liveStats(tokens, drafted, started, method), "live");
      }
      if (choice && choice.finish_reason) footer(finalStats(chunk), "done");
    }
    messages.push({ role: "assistant", content });
  } catch (error) {
    if (error.name === "AbortError") {  // stopped: keep what was written, as the terminal chat does
      if (content) messages.push({ role: "assistant", content });
      else messages.pop();
      footer(liveStats(tokens, drafted, started, method) + " · stopped", "done");
    } else {
      if (!content) messages.pop();  // the question was not answered: ask it again
      answer.classList.add("error");
      answer.textContent = error.message;
      footer("error", "error");
    }
  } finally {
    chat.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || chat.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  $("log").replaceChildren($("log").firstElementChild);
  footer("no answer yet", "idle");
});
$("api-key").addEventListener("change", loadModel);
loadModel().catch((error) => { $("model").textContent = "cannot reach the server: " + error.message; });
