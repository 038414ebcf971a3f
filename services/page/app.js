// The purecc page: one token (sessionStorage), the concepts it may compose with their validation images,
// its batches with live progress and loss curves (the curves the training workers push, kept by the
// service), and a composer calling POST /v1/generate. Plain DOM, no libraries; every
// value from the API goes in through textContent or attributes, never as HTML.
"use strict";

const TOKEN_KEY = "purecc-token";
const POLL_MS = 2000;
const MAX_CURVE_FETCHES = 40;         // loss-curve requests per poll (active jobs first)
const MAX_THUMBS = 4;                 // validation images shown per concept
// "batch/job" -> {state, stages: {"1": {points: [[first, last, mean], ...], ...}}} from
// GET /v1/batches/{batch}/concepts/{job}/loss; a finished job's curve is fetched once
const curves = new Map();
const thumbs = [];                    // object URLs of the validation images shown (revoked on reload)
let pollTimer = null;

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function detail(body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return body && body.detail ? String(body.detail) : "unexpected answer";
}

async function apiBlob(path) {
  const resp = await fetch(path.replace(/^\//, ""), { headers: { Authorization: `Bearer ${token()}` } });
  if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
  return resp.blob();
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path.replace(/^\//, ""), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error(`HTTP ${resp.status}: ${detail(data)}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  row.appendChild(td);
  return td;
}

async function loadConcepts() {
  const tbody = $("concepts").querySelector("tbody");
  const { concepts } = await api("GET", "/v1/concepts");
  thumbs.splice(0).forEach((url) => URL.revokeObjectURL(url));
  tbody.replaceChildren();
  for (const c of concepts) {
    const row = document.createElement("tr");
    row.dataset.concept = c.id;
    const use = document.createElement("input");
    use.type = "checkbox";
    use.className = "use";
    use.value = c.id;
    use.setAttribute("aria-label", `use ${c.id}`);
    cell(row, "").appendChild(use);
    cell(row, c.id).className = "concept-id";
    cell(row, c.trigger);
    cell(row, c.stage);
    cell(row, c.steps);
    cell(row, c.rank);
    const weight = document.createElement("input");
    weight.type = "number";
    weight.className = "weight";
    weight.step = "0.05";
    weight.min = "-4";
    weight.max = "4";
    weight.value = "1";
    weight.setAttribute("aria-label", `weight of ${c.id}`);
    cell(row, "").appendChild(weight);
    const gallery = cell(row, "");
    gallery.className = "gallery";
    tbody.appendChild(row);
    showValidation(c.id, gallery);
  }
  if (!concepts.length) {
    const row = document.createElement("tr");
    cell(row, "no concepts are servable yet").colSpan = 8;
    tbody.appendChild(row);
  }
}

async function showValidation(id, gallery) {
  // the images need the token, so they are fetched and shown from blob: URLs
  try {
    const { images } = await api("GET", `/v1/concepts/${encodeURIComponent(id)}/validation`);
    const shown = images.slice(-MAX_THUMBS);
    gallery.textContent = shown.length ? "" : "none";
    for (const image of shown) {
      const url = URL.createObjectURL(await apiBlob(image.url));
      thumbs.push(url);
      const fig = document.createElement("figure");
      fig.className = "validation";
      const el = document.createElement("img");
      el.src = url;
      el.alt = image.prompt || image.name;
      el.title = image.prompt || image.name;
      const cap = document.createElement("figcaption");
      cap.textContent = `stage ${image.stage}: ${image.prompt || image.name}`;
      fig.append(el, cap);
      gallery.appendChild(fig);
    }
  } catch (err) {
    gallery.textContent = `cannot be shown (${err.message})`;
    gallery.classList.add("error");
  }
}

async function compose(event) {
  event.preventDefault();
  const status = $("compose-status");
  const concepts = [...document.querySelectorAll("#concepts tbody tr")]
    .filter((row) => row.querySelector(".use") && row.querySelector(".use").checked)
    .map((row) => ({ id: row.dataset.concept, weight: Number(row.querySelector(".weight").value) }));
  const request = {
    prompt: $("prompt").value, seed: Number($("seed").value), steps: Number($("steps").value),
    num_images: Number($("num-images").value), concepts,
  };
  status.className = "";
  status.textContent = "generating...";
  $("generate").disabled = true;
  try {
    const result = await api("POST", "/v1/generate", request);
    const images = $("images");
    images.replaceChildren();
    for (const img of result.images) {
      const fig = document.createElement("figure");
      const el = document.createElement("img");
      el.alt = `seed ${img.seed}`;
      el.src = `data:image/png;base64,${img.png_base64}`;
      el.className = "generated";
      const cap = document.createElement("figcaption");
      cap.textContent = `seed ${img.seed}`;
      fig.append(el, cap);
      images.appendChild(fig);
    }
    status.textContent = `${result.prompt} (${result.width}x${result.height}, ${result.steps} steps, ` +
      `${Math.round(result.timings.total_ms)} ms)`;
  } catch (err) {
    status.className = "error";
    status.textContent = err.message;
  } finally {
    $("generate").disabled = false;
  }
}

const ACTIVE = new Set(["queued", "stage1", "stage2"]);

async function fetchCurves(statuses) {
  // active jobs every poll; a finished job once more after it finished (its final curve)
  const wanted = [];
  for (const status of statuses) {
    for (const job of status.jobs) {
      const key = `${status.batch}/${job.id}`, known = curves.get(key);
      if (ACTIVE.has(job.state) ? job.stage !== null : !known || known.state !== job.state) {
        wanted.push([ACTIVE.has(job.state) ? 0 : 1, key, status.batch, job.id]);
      }
    }
  }
  wanted.sort((a, b) => a[0] - b[0]);
  await Promise.all(wanted.slice(0, MAX_CURVE_FETCHES).map(async ([, key, batch, id]) => {
    try {
      curves.set(key, await api("GET", `/v1/batches/${encodeURIComponent(batch)}/concepts/` +
                                       `${encodeURIComponent(id)}/loss`));
    } catch (err) { /* shown as "no loss reported yet"; the next poll asks again */ }
  }));
}

function curveSeries(batch, id) {
  // each point of a stored curve is the mean loss of steps first..last: drawn at its last step
  const known = curves.get(`${batch}/${id}`);
  if (!known) return [];
  return Object.entries(known.stages).map(([stage, c]) => ({ stage, points: c.points.map((p) => [p[1], p[2]]) }))
    .filter((s) => s.points.length);
}

function drawLoss(canvas, series) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  ctx.fillStyle = "#666";
  ctx.font = "10px sans-serif";
  if (all.length < 1) { ctx.fillText("no loss reported yet", pad, h / 2); return; }
  const maxStep = Math.max(...all.map((p) => p[0]), 1);
  let lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const x = (s) => pad + (w - 2 * pad) * s / maxStep;
  const y = (v) => h - pad - (h - 2 * pad) * (v - lo) / (hi - lo);
  ctx.strokeStyle = "#999";
  ctx.strokeRect(pad, pad, w - 2 * pad, h - 2 * pad);
  ctx.fillText(hi.toPrecision(3), 2, pad);
  ctx.fillText(lo.toPrecision(3), 2, h - pad);
  ctx.fillText(`step ${maxStep}`, w - pad - 40, h - 6);
  const colours = ["#1f77b4", "#d62728"];
  series.forEach((s, i) => {
    ctx.strokeStyle = colours[i % colours.length];
    ctx.beginPath();
    s.points.forEach(([step, loss], j) => (j ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
    ctx.stroke();
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillText(`stage ${s.stage}`, w - pad - 40, pad + 12 * (i + 1));
  });
}

function renderBatch(status) {
  const box = document.createElement("div");
  box.className = "batch";
  box.dataset.batch = status.batch;
  const title = document.createElement("h3");
  const counts = Object.entries(status.counts).map(([k, v]) => `${v} ${k}`).join(", ");
  title.textContent = `${status.batch}: ${status.done ? "done" : "running"} (${counts})`;
  box.appendChild(title);
  for (const job of status.jobs) {
    const line = document.createElement("div");
    line.className = "job";
    line.dataset.job = job.id;
    const name = document.createElement("span");
    name.textContent = `${job.id}: ${job.state}`;
    const bar = document.createElement("progress");
    bar.max = job.total || 1;
    bar.value = job.state === "published" ? bar.max : (job.step || 0);
    const text = document.createElement("span");
    const eta = job.eta_s !== null && job.eta_s !== undefined ? `, ETA ${Math.round(job.eta_s)} s` : "";
    text.textContent = job.stage ? `stage ${job.stage}: ${job.step || 0}/${job.total || "?"}` +
      (job.loss !== null ? `, loss ${job.loss.toPrecision(3)}` : "") + eta : "";
    if (job.error) { text.textContent += ` error: ${job.error}`; text.className = "error"; }
    const canvas = document.createElement("canvas");
    canvas.width = 320;
    canvas.height = 120;
    canvas.className = "loss";
    drawLoss(canvas, curveSeries(status.batch, job.id));
    line.append(name, bar, text, canvas);
    box.appendChild(line);
  }
  return box;
}

async function pollBatches() {
  const note = $("batches-status");
  try {
    const { batches } = await api("GET", "/v1/batches");
    const shown = await Promise.all(batches.slice(-20).reverse()
      .map((b) => api("GET", `/v1/batches/${encodeURIComponent(b.batch)}`)));
    await fetchCurves(shown);
    $("batches").replaceChildren(...shown.map(renderBatch));
    note.className = "hint";
    note.textContent = batches.length ? `updated ${new Date().toLocaleTimeString()}` : "no batches yet";
  } catch (err) {
    note.className = "error";
    note.textContent = err.status === 403 ? "this token cannot see batches (it lacks the submit scope)"
      : err.message;
    if (err.status === 403 || err.status === 404) return;   // no point polling again
  }
  pollTimer = setTimeout(pollBatches, POLL_MS);
}

async function start() {
  const message = $("message");
  if (!token()) { $("app").hidden = true; $("logout").hidden = true; return; }
  try {
    await loadConcepts();
  } catch (err) {
    message.className = "error";
    message.textContent = err.message;
    if (err.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    return;
  }
  message.className = "";
  message.textContent = "signed in";
  $("app").hidden = false;
  $("logout").hidden = false;
  clearTimeout(pollTimer);
  pollBatches();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  start();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(pollTimer);
  $("message").textContent = "";
  start();
});
$("composer").addEventListener("submit", compose);
start();
