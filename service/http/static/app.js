// The search page: plain JavaScript, no build step, no network access beyond this server.
"use strict";

const KEY_STORAGE = "llave-api-key";
const $ = (id) => document.getElementById(id);
const state = { media: null, collections: [], hits: [], opener: null };
// A clip is embedded as the LLaVE authors embed one for retrieval: this text after it.
const VIDEO_TEXT = "Represent the given video.";
const VIDEO_SUFFIXES = [".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".ts"];
const DROP_HINT = "Drop an image or a video here, paste one (Ctrl+V) or press Enter to choose a file";

// "image", "video" or null for anything else (by type, else by the name's extension).
function mediaKind(file) {
  if (!file) return null;
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("video/")) return "video";
  const name = (file.name || "").toLowerCase();
  return VIDEO_SUFFIXES.some((s) => name.endsWith(s)) ? "video" : null;
}

function formatSeconds(seconds) {
  const s = Math.round(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// --- messages ---------------------------------------------------------------------------

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text || "";
}

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
  describe() {
    return this.status ? `${this.message} (${this.status} ${this.type})` : this.message;
  }
}

// --- the API key: asked once when a request gets 401, kept for this browser session ------

let keyPrompt = null; // one dialog for all the requests that got 401 at the same time

function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("key-input").value = "";
    dialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        const key = $("key-input").value.trim();
        if (dialog.returnValue === "ok" && key) {
          sessionStorage.setItem(KEY_STORAGE, key);
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    $("key-input").focus();
  });
  return keyPrompt;
}

async function errorFrom(response) {
  let type = "error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const data = await response.json();
    if (data && data.error) {
      type = data.error.type;
      message = data.error.message;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, type, message);
}

async function api(method, path, body) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, "network", "Cannot reach the server: " + err.message);
    }
    if (response.ok) return response.json();
    const error = await errorFrom(response);
    if (response.status === 401 && attempt < 3) {
      if (key) sessionStorage.removeItem(KEY_STORAGE);
      const reason = key
        ? `The server refused this API key (${error.message}). Enter the right one.`
        : "This server needs an API key.";
      if (await askForKey(reason)) continue;
    }
    throw error;
  }
}

// --- collections ------------------------------------------------------------------------

async function loadCollections() {
  const select = $("collection");
  const previous = select.value;
  const data = await api("GET", "/collections");
  state.collections = data.collections || [];
  select.replaceChildren();
  for (const c of state.collections) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = `${c.name} (${c.count})`;
    select.append(option);
  }
  if (!state.collections.length) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "no collections yet";
    select.append(option);
  }
  if (state.collections.some((c) => c.name === previous)) select.value = previous;
  else if (state.collections.some((c) => c.name === "demo")) select.value = "demo";
  describeCollection();
}

function describeCollection() {
  const c = state.collections.find((x) => x.name === $("collection").value);
  $("collection-info").textContent = c ? `${c.count} documents, ${c.dim}-d, ${c.index} index` : "";
  if (c && !$("upload-collection").value) $("upload-collection").value = c.name;
}

// --- the query image: drop, paste or choose --------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function setQueryImage(file) {
  if (!file) return;
  const kind = mediaKind(file);
  if (!kind) {
    showMessage(`${file.name || "That file"} is neither an image nor a video.`);
    return;
  }
  showMessage("");
  state.media = { kind, data: await readAsDataURL(file) };
  const preview = $("query-preview");
  const video = $("query-video-preview");
  preview.hidden = kind !== "image";
  video.hidden = kind !== "video";
  if (kind === "image") {
    preview.src = state.media.data;
    video.removeAttribute("src");
  } else {
    video.src = state.media.data;
    preview.removeAttribute("src");
  }
  $("drop-hint").textContent = file.name ? `${file.name}` : `pasted ${kind}`;
  $("clear-image").hidden = false;
}

function clearQueryImage() {
  state.media = null;
  $("query-preview").hidden = true;
  $("query-preview").removeAttribute("src");
  $("query-video-preview").hidden = true;
  $("query-video-preview").removeAttribute("src");
  $("drop-hint").textContent = DROP_HINT;
  $("clear-image").hidden = true;
  $("query-file").value = "";
}

// --- search -----------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  showMessage("");
  const collection = $("collection").value;
  const text = $("query-text").value.trim();
  const instruction = $("query-instruction").value.trim();
  if (!collection) {
    showMessage("Choose a collection first (or add images to a new one below).");
    return;
  }
  const mode = $("query-mode").value;
  if (mode !== "vector" && !text) {
    showMessage("Keyword and hybrid search match the words of a text: type one.");
    return;
  }
  if (!text && !state.media) {
    showMessage("Type a text or add an image or a video to search.");
    return;
  }
  const query = {};
  if (mode !== "vector") query.mode = mode;
  if (text) query.text = text;
  if (state.media) query[state.media.kind] = state.media.data;
  // A video alone is embedded as the stored clips are, so that the same clip finds itself.
  if (state.media && state.media.kind === "video" && !text && !instruction) query.text = VIDEO_TEXT;
  if (instruction) query.instruction = instruction;
  const k = Math.max(1, Math.min(100, parseInt($("query-k").value, 10) || 12));
  setStatus("Searching…");
  $("search-button").disabled = true;
  try {
    const data = await api("POST", "/search", { collection, query, k, include: ["text", "thumbnail"] });
    renderHits(data.hits || []);
    setStatus(`${state.hits.length} result${state.hits.length === 1 ? "" : "s"} in ${collection}`);
  } catch (err) {
    setStatus("");
    showMessage("Search failed: " + err.describe());
  } finally {
    $("search-button").disabled = false;
  }
}

function renderHits(hits) {
  state.hits = hits;
  const list = $("results");
  list.replaceChildren();
  hits.forEach((hit, i) => {
    const item = document.createElement("li");
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.index = String(i);
    card.dataset.id = hit.id;
    const isVideo = typeof hit.video_seconds === "number";
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = hit.thumbnail;
      img.alt = isVideo ? `first frame of the video ${hit.id}` : `image of ${hit.id}`;
      card.append(img);
      if (isVideo) {
        const badge = document.createElement("span");
        badge.className = "duration";
        badge.textContent = "▶ " + formatSeconds(hit.video_seconds);
        card.append(badge);
      }
    } else {
      const none = document.createElement("div");
      none.className = "thumb none";
      none.textContent = "no image";
      card.append(none);
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    card.append(score, id);
    if (hit.text) {
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = hit.text;
      card.append(text);
    }
    const what = isVideo ? `, video of ${formatSeconds(hit.video_seconds)}` : "";
    card.setAttribute("aria-label", `${i + 1}: ${hit.id}${what}, score ${hit.score.toFixed(3)}`);
    card.addEventListener("click", () => openDetails(i, card));
    item.append(card);
    list.append(item);
  });
}

// --- details ----------------------------------------------------------------------------

async function openDetails(index, opener) {
  const hit = state.hits[index];
  const collection = $("collection").value;
  state.opener = opener;
  $("details-title").textContent = hit.id;
  $("details-score").textContent = `score ${hit.score.toFixed(4)} in ${collection}`;
  const image = $("details-image");
  image.hidden = !hit.thumbnail;
  if (hit.thumbnail) {
    image.src = hit.thumbnail;
    image.alt = `image of ${hit.id}`;
  }
  $("details-text").textContent = hit.text || "";
  $("details-metadata").textContent = JSON.stringify(hit.metadata || {}, null, 2);
  $("details-video").hidden = true;
  $("details").showModal();
  $("details-close").focus();
  try {
    const path = `/collections/${encodeURIComponent(collection)}/documents/${encodeURIComponent(hit.id)}`;
    const doc = await api("GET", path);
    $("details-text").textContent = doc.text || "";
    $("details-metadata").textContent = JSON.stringify(doc.metadata || {}, null, 2);
    if (doc.thumbnails > 1) $("details-score").textContent += ` · ${doc.thumbnails} images and videos`;
    const videos = doc.videos || [];
    if (videos.length) {
      const lengths = videos.map((v) => `${v.seconds.toFixed(1)} s`).join(", ");
      $("details-video").textContent = `Video (${lengths}); the picture is its first frame.`;
      $("details-video").hidden = false;
    }
  } catch (err) {
    $("details-text").textContent = "Could not load the document: " + err.describe();
  }
}

// --- upload -----------------------------------------------------------------------------

async function upload() {
  showMessage("");
  const files = Array.from($("upload-files").files || []);
  const collection = $("upload-collection").value.trim() || $("collection").value;
  if (!collection) {
    showMessage("Name the collection to add the images and videos to.");
    return;
  }
  if (!files.length) {
    showMessage("Choose one or more image or video files to upload.");
    return;
  }
  const progress = $("upload-progress");
  progress.max = files.length;
  progress.value = 0;
  progress.hidden = false;
  $("upload-button").disabled = true;
  const failures = [];
  let done = 0;
  for (const file of files) {
    $("upload-status").textContent = `Uploading ${file.name} (${done + 1} of ${files.length})…`;
    try {
      const data = await readAsDataURL(file);
      const doc =
        mediaKind(file) === "video"
          ? { id: file.name, video: data, text: VIDEO_TEXT, metadata: { filename: file.name } }
          : { id: file.name, image: data, metadata: { filename: file.name } };
      await api("POST", `/collections/${encodeURIComponent(collection)}/documents`, { documents: [doc] });
    } catch (err) {
      failures.push(`${file.name}: ${err.describe ? err.describe() : err.message}`);
    }
    done += 1;
    progress.value = done;
  }
  $("upload-button").disabled = false;
  const added = files.length - failures.length;
  $("upload-status").textContent = `Added ${added} of ${files.length} to ${collection}.`;
  if (failures.length) showMessage("Some uploads failed: " + failures.join("; "));
  try {
    await loadCollections();
    if (added) {
      $("collection").value = collection;
      describeCollection();
    }
  } catch (err) {
    showMessage("Could not reload the collections: " + err.describe());
  }
}

// --- wiring -----------------------------------------------------------------------------

function wire() {
  $("search-form").addEventListener("submit", search);
  $("collection").addEventListener("change", describeCollection);
  $("refresh").addEventListener("click", () =>
    loadCollections().catch((err) => showMessage("Could not list the collections: " + err.describe())),
  );
  $("change-key").addEventListener("click", async () => {
    if (await askForKey("Enter the API key to use for this session.")) {
      showMessage("");
      loadCollections().catch((err) => showMessage("Could not list the collections: " + err.describe()));
    }
  });
  $("upload-button").addEventListener("click", upload);
  $("clear-image").addEventListener("click", clearQueryImage);

  const zone = $("drop-zone");
  const chooser = $("query-file");
  zone.addEventListener("click", () => chooser.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      chooser.click();
    }
  });
  chooser.addEventListener("change", () => setQueryImage(chooser.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    setQueryImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = Array.from(event.clipboardData ? event.clipboardData.files : []).find((f) => mediaKind(f));
    if (file) {
      event.preventDefault();
      setQueryImage(file);
    }
  });

  const details = $("details");
  details.addEventListener("close", () => {
    if (state.opener) state.opener.focus();
  });
  // Escape closes a modal dialog natively; this also covers a dialog opened without focus inside.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && details.open) details.close();
  });
}

window.addEventListener("DOMContentLoaded", () => {
  wire();
  loadCollections()
    .then(() => $("query-text").focus())
    .catch((err) => showMessage("Could not list the collections: " + err.describe()));
});
