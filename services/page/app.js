// The purecc page: one token (sessionStorage), the concepts it may compose, its batches with live
// progress and loss curves, and a composer calling POST /v1/generate. Plain DOM, no libraries; every
// value from the API goes in through textContent or attributes, never as HTML.
"use strict";

const TOKEN_KEY = "purecc-token";
const POLL_MS = 2000;
const MAX_POINTS = 2000;              // loss points kept per job and stage (the page's own bound)
const losses = new Map();             // "batch/job/stage" -> [[step, loss], ...] seen while polling
let pollTimer = null;

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function detail(body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return body && body.detail ? String(body.detail) : "unexpected answer";
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
    tbody.appendChild(row);
  }
  if (!concepts.length) {
    const row = document.createElement("tr");
    cell(row, "no concepts are servable yet").colSpan = 7;
    tbody.appendChild(row);
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

function recordLoss(batch, job) {
  if (job.loss === null || job.step === null || job.stage === null) return;
  const key = `${batch}/${job.id}/${job.stage}`;
  const points = losses.get(key) || [];
  const last = points[points.length - 1];
  if (!last || last[0] !== job.step) {
    points.push([job.step, job.loss]);
    if (points.length > MAX_POINTS) points.shift();
  }
  losses.set(key, points);
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
    recordLoss(status.batch, job);
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
    const series = [1, 2].map((stage) => ({ stage, points: losses.get(`${status.batch}/${job.id}/${stage}`) || [] }))
      .filter((s) => s.points.length);
    drawLoss(canvas, series);
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
