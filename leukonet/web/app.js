// leukonet's page: upload cell images, show each cell's class, confidence, review flag and heat map,
// and the differential count of this page's uploads. No framework, no build step, nothing from the network.
"use strict";

let info = null;
const labels = [];  // predicted class of every cell uploaded since the page was opened
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const mb = (bytes) => Number((bytes / 1e6).toPrecision(3)) + " MB";
const pct = (x) => (100 * x).toFixed(1) + " %";

function status(text, state = "busy") { $("status").textContent = text; $("status").dataset.state = state; }

function showError(file, message) {
  $("errors").append(el("li", { "class": "file-error", "data-file": file, text: message }));
}

function showCell(row) {
  const flagged = Boolean(row.not_a_leukocyte);
  const card = el("div", { "class": "cell" + (row.needs_review ? " review" : "") + (flagged ? " ood" : ""),
                           "data-file": row.file, "data-class": flagged ? "" : row.predicted,
                           "data-confidence": String(row.confidence) });
  const images = el("div", { "class": "images" });
  images.append(el("img", { "class": "thumb", src: row.thumbnail, alt: "cell " + row.file }));
  if (row.heatmap) images.append(el("img", { "class": "heatmap", src: row.heatmap, alt: "heat map " + row.file,
                                             title: "Grad-CAM: where the evidence for " + row.predicted + " lies" }));
  card.append(images);
  const name = row.file + (row.cell === null || row.cell === undefined ? "" : " · cell " + row.cell);
  card.append(el("div", { "class": "name", text: name }));
  const line = el("div", {}, el("span", { "class": "class", text: flagged ? "not a leukocyte" : row.predicted }),
                  el("span", { "class": "confidence", text: " " + pct(row.confidence) }));
  if (flagged) {
    line.append(el("span", { "class": "flag ood", text: row.ood_reason || "flagged",
                             title: "not counted; out-of-distribution score " + (row.ood_score ?? "—") }));
  } else {
    line.append(row.needs_review
      ? el("span", { "class": "flag review", text: "review", title: "confidence below " + pct(info.review_threshold) })
      : el("span", { "class": "flag ok", text: "ok" }));
  }
  card.append(line);
  const probs = Object.entries(row.probabilities).sort((a, b) => b[1] - a[1])
    .map(([c, p]) => c + " " + pct(p)).join(", ");
  card.append(el("div", { "class": "small probs", text: probs }));
  if (row.notes && row.notes.length) card.append(el("div", { "class": "small", text: "note: " + row.notes.join("; ") }));
  $("results").append(card);
}

async function refreshDifferential() {
  const body = $("differential").tBodies[0];
  const total = $("diff-total");
  let data = { cells: 0, differential: (info ? info.classes : []).map((c) => ({ "class": c, cells: 0, percent: null })) };
  if (labels.length) {
    const res = await fetch("/api/differential", { method: "POST", headers: { "Content-Type": "application/json" },
                                                 body: JSON.stringify({ labels }) });
    data = await res.json();
    if (!res.ok) { status("differential count failed: " + data.error, "error"); return; }
  }
  body.replaceChildren(...data.differential.map((r) => el("tr", { "data-class": r["class"] },
    el("td", { text: r["class"] }), el("td", { "class": "count", text: String(r.cells) }),
    el("td", { text: r.percent === null ? "—" : r.percent.toFixed(1) }),
    el("td", { text: r.percent === null ? "—" : r.ci95_low.toFixed(1) + "–" + r.ci95_high.toFixed(1) }))));
  total.dataset.cells = String(data.cells);
  total.textContent = data.cells + (data.cells === 1 ? " cell" : " cells");
}

// Files that pass the page's own checks, grouped so that each request stays under the server's limits.
function batches(files) {
  const groups = [];
  let group = [], size = 0;
  for (const f of files) {
    const ext = (f.name.match(/\.[^.]*$/) || [""])[0].toLowerCase();
    if (!info.extensions.includes(ext)) {
      showError(f.name, f.name + ": not an accepted image type (" + (ext || "no extension") + "); accepted: "
                + info.extensions.join(", "));
      continue;
    }
    if (f.size > info.max_file_bytes) {
      showError(f.name, f.name + ": too large (" + mb(f.size) + "); the limit is " + mb(info.max_file_bytes) + " a file");
      continue;
    }
    const cost = f.size + 1024 + f.name.length;  // multipart headers
    if (group.length && (size + cost > info.max_request_bytes || group.length >= info.max_files)) {
      groups.push(group); group = []; size = 0;
    }
    group.push(f); size += cost;
  }
  if (group.length) groups.push(group);
  return groups;
}

async function upload(fileList) {
  const files = Array.from(fileList);
  if (!files.length || !info) return;
  const groups = batches(files);
  let done = 0;
  for (const group of groups) {
    status("classifying " + (done + 1) + "–" + (done + group.length) + " of " + files.length + " files…");
    const form = new FormData();
    for (const f of group) form.append("files", f, f.name);
    try {
      const res = await fetch("/api/classify", { method: "POST", body: form });
      const data = await res.json();
      if (!res.ok) {
        for (const f of group) showError(f.name, f.name + ": upload refused: " + data.error);
      } else {
        for (const r of data.results) {
          if (r.error) { showError(r.file, r.error); continue; }
          for (const row of r.cells) { showCell(row); if (!row.not_a_leukocyte) labels.push(row.predicted); }
        }
      }
    } catch (err) {
      for (const f of group) showError(f.name, f.name + ": upload failed (" + err.message + ")");
    }
    done += group.length;
  }
  await refreshDifferential();
  const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
  status("done: " + plural(files.length, "file") + "; " + plural(labels.length, "cell") + " counted in this session", "done");
}

function setup() {
  const drop = $("drop"), input = $("file-input");
  input.addEventListener("change", () => { upload(input.files).finally(() => { input.value = ""; }); });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); upload(e.dataTransfer.files); });
  // a file dropped beside the zone must not make the browser navigate away from the results
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("clear").addEventListener("click", () => {
    labels.length = 0; $("results").replaceChildren(); $("errors").replaceChildren(); status("", ""); refreshDifferential();
  });
}

async function start() {
  setup();
  const res = await fetch("/api/info");
  info = await res.json();
  $("model-info").textContent = "model " + info.checkpoint + " · classes: " + info.classes.join(", ")
    + " · review below " + pct(info.review_threshold) + " confidence (" + info.review_threshold_from + ")"
    + " · not-a-leukocyte check: " + info.ood_check;
  $("limits").textContent = "Accepted: " + info.extensions.join(" ") + " · at most " + mb(info.max_file_bytes)
    + " a file. Images are classified in memory on this machine; nothing is stored.";
  document.body.dataset.ready = "true";
  await refreshDifferential();
}

start().catch((err) => status("cannot reach the server: " + err.message, "error"));
