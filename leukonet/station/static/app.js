// The review station's page: cases, uploads, the review queue (keys 1-5 a class, X not a leukocyte, Enter confirms,
// U undoes), both differential counts, sign-off and exports. Everything lives on the server; the page only shows
// it. No framework, no build step, nothing from the network.
"use strict";

let info = null;
let caseData = null;  // the open case (GET /api/cases/{id})
let queue = [];  // its cells in review order
let current = null;  // the cell under review
let pending = null;  // the label chosen for it, not confirmed yet
let gridView = false;
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

const pct = (x) => (100 * x).toFixed(1) + " %";
const mb = (n) => (n / 1e6).toPrecision(3).replace(/\.?0+$/, "") + " MB";
const labelText = (label) => (label === "not_a_leukocyte" ? "not a leukocyte" : label);

function status(text, state = "") {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

const postJSON = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });

function reviewer() {
  const name = $("reviewer").value.trim();
  if (!name) { $("reviewer").focus(); throw new Error("enter your name as reviewer first"); }
  return name;
}

// cases ---------------------------------------------------------------------------------------------------------
async function showCases() {
  const cases = await api("/api/cases");
  $("case-list").tBodies[0].replaceChildren(...cases.map((c) => {
    const row = el("tr", { "data-case": String(c.id) }, el("td", { text: "#" + c.id }),
                   el("td", { text: c.created.slice(0, 16).replace("T", " ") }), el("td", { text: c.note }),
                   el("td", { text: String(c.cells) }), el("td", { text: String(c.reviewed) }),
                   el("td", { text: c.signed_off_at ? c.signed_off_by : "" }));
    row.addEventListener("click", () => { location.hash = "case=" + c.id; });
    return row;
  }));
}

async function openCase(id) {
  caseData = await api("/api/cases/" + id);
  queue = await api("/api/cases/" + id + "/cells");
  $("case").hidden = false;
  $("case").dataset.caseId = String(id);
  $("errors").replaceChildren(...caseData.errors.map((e) => el("li", { "data-file": e.file, text: e.error })));
  for (const [a, path] of [["export-csv", "export.csv"], ["export-report", "report.html"], ["export-manifest", "manifest.csv"]]) {
    $(a).href = "/api/cases/" + id + "/" + path;
  }
  current = null;
  render();
}

function renderCase() {
  const c = caseData;
  $("case-id").textContent = "#" + c.id;
  $("case-note").textContent = c.note;
  const models = c.checkpoints.map((k) => k.name + " (sha256 " + k.sha256 + ")").join(", ") || "no cells yet";
  $("case-meta").textContent = "created " + c.created.slice(0, 16).replace("T", " ") + " UTC · classified by " + models;
  const locked = Boolean(c.signed_off_at);
  $("case").classList.toggle("locked", locked);
  $("case").dataset.signed = String(locked);
  $("signed").classList.toggle("locked", locked);
  $("signed").textContent = locked ? "Signed off by " + c.signed_off_by + " on "
    + c.signed_off_at.slice(0, 16).replace("T", " ") + " UTC: read-only" : "";
  const body = $("differential").tBodies[0];
  const cols = (r) => [el("td", { "class": "count", text: String(r.cells) }),
                       el("td", { text: r.percent === null ? "—" : r.percent.toFixed(1) }),
                       el("td", { text: r.percent === null ? "—" : r.ci95_low.toFixed(1) + "–" + r.ci95_high.toFixed(1) })];
  body.replaceChildren(...c.model_count.differential.map((m, i) => {
    const r = c.reviewed_count.differential[i];
    return el("tr", { "data-class": m["class"], "data-model": String(m.cells), "data-reviewed": String(r.cells) },
              el("td", { text: m["class"] }), ...cols(m), ...cols(r));
  }));
  for (const [id, n] of [["model-total", c.model_count.cells], ["reviewed-total", c.reviewed_count.cells]]) {
    $(id).dataset.cells = String(n);
    $(id).textContent = "(" + n + ")";
  }
  $("progress").textContent = c.reviewed + " of " + c.cells + " cells reviewed";
}

// review --------------------------------------------------------------------------------------------------------
function flagOf(cell) {
  if (cell.not_a_leukocyte) return el("span", { "class": "flag ood", text: cell.ood_reason || "not a leukocyte" });
  return cell.needs_review ? el("span", { "class": "flag review", text: "review" }) : el("span", { "class": "flag ok", text: "ok" });
}

function renderCurrent() {
  const box = $("current");
  if (!current) {
    box.replaceChildren(el("p", { text: queue.length ? "All cells reviewed." : "No cells yet: drop images above." }));
    delete box.dataset.cellId;
    return;
  }
  const c = current;
  box.dataset.cellId = String(c.id);
  box.dataset.label = pending || "";
  const images = el("div", { "class": "images" }, el("img", { src: c.image, alt: "cell " + c.file }));
  if (c.heatmap) images.append(el("img", { "class": "heatmap", src: c.heatmap, alt: "heat map",
                                           title: "Grad-CAM: where the evidence for " + c.top_class + " lies" }));
  const probs = Object.entries(c.probabilities).sort((a, b) => b[1] - a[1]).map(([k, p]) => k + " " + pct(p)).join(", ");
  box.replaceChildren(images,
    el("p", {}, el("span", { "class": "class", text: c.predicted || "not a leukocyte" }),
       el("span", { text: " " + pct(c.confidence) }), flagOf(c)),
    el("p", { "class": "pending", text: pending ? "→ " + labelText(pending) + " (Enter confirms)"
      : c.review_label ? "reviewed: " + labelText(c.review_label) + " by " + c.reviewer : "Enter confirms the model's answer" }),
    el("p", { "class": "small", text: c.file + (c.cell === null ? "" : " · cell " + c.cell) + " · " + probs }));
}

function renderGrid() {
  $("grid").hidden = !gridView;
  $("current").hidden = gridView && !current;
  $("view-toggle").textContent = gridView ? "one at a time" : "grid";
  if (!gridView) return;
  $("grid").replaceChildren(...queue.map((c) => {
    const cls = "cell" + (c.not_a_leukocyte ? " ood" : c.needs_review ? " review" : "") + (c.review_label ? " done" : "")
      + (current && current.id === c.id ? " selected" : "");
    const card = el("div", { "class": cls, "data-id": String(c.id), "data-review": c.review_label || "" },
                    el("img", { src: c.image, alt: "cell " + c.file }),
                    el("div", { text: (c.review_label ? labelText(c.review_label) + " ✓" : c.predicted || "not a leukocyte")
                                      + " " + pct(c.confidence) }));
    card.addEventListener("click", () => { current = c; pending = null; render(); });
    return card;
  }));
}

function render() {
  renderCase();
  if (current) current = queue.find((c) => c.id === current.id) || null;
  if (!current) current = queue.find((c) => !c.review_label) || null;
  renderCurrent();
  renderGrid();
}

async function refresh(focusId = null) {
  const id = caseData.id;
  [caseData, queue] = await Promise.all([api("/api/cases/" + id), api("/api/cases/" + id + "/cells"), showCases()]);
  current = focusId === null ? null : queue.find((c) => c.id === focusId) || null;
  render();
}

async function confirmCell() {
  if (!current) return;
  const label = pending || current.predicted || "not_a_leukocyte";
  const done = await postJSON("/api/cells/" + current.id + "/review", { label, reviewer: reviewer() });
  pending = null;
  await refresh();
  status("cell " + done.id + ": " + labelText(label), "reviewed");
}

async function undo() {
  const cell = await postJSON("/api/cases/" + caseData.id + "/undo", {});
  pending = null;
  await refresh(cell.id);
  status("undone: cell " + cell.id, "undone");
}

function onKey(e) {
  if (!caseData || caseData.signed_off_at || e.target.matches("input, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  let action = null;
  const n = Number.parseInt(k, 10);
  if (n >= 1 && n <= info.classes.length && current) { pending = info.classes[n - 1]; renderCurrent(); }
  else if (k === "x" && current) { pending = "not_a_leukocyte"; renderCurrent(); }
  else if (k === "enter") action = confirmCell;
  else if (k === "u") action = undo;
  else return;
  e.preventDefault();
  if (action) action().catch((err) => status(err.message, "error"));
}

// uploads -------------------------------------------------------------------------------------------------------
function showError(file, message, cls = "file-error") {
  $("errors").append(el("li", { "class": cls, "data-file": file, text: message }));
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
  if (!files.length || !caseData) return;
  let done = 0, cells = 0;
  for (const group of batches(files)) {
    status("classifying " + (done + 1) + "–" + (done + group.length) + " of " + files.length + " files…", "busy");
    const form = new FormData();
    for (const f of group) form.append("files", f, f.name);
    try {
      const data = await api("/api/cases/" + caseData.id + "/files", { method: "POST", body: form });
      for (const r of data.results) {
        if (r.error) showError(r.file, r.error);
        else if (r.duplicate_of) showError(r.file, r.file + ": already in this case (as " + r.duplicate_of + "); not counted twice", "duplicate");
        else cells += r.cells.length;
      }
    } catch (err) {
      for (const f of group) showError(f.name, f.name + ": upload failed (" + err.message + ")");
    }
    done += group.length;
  }
  await refresh(current ? current.id : null);
  status("done: " + files.length + " file" + (files.length === 1 ? "" : "s") + ", " + cells + " new cell"
         + (cells === 1 ? "" : "s"), "done");
}

// setup ---------------------------------------------------------------------------------------------------------
function route() {
  const m = location.hash.match(/^#case=(\d+)$/);
  if (m) return Promise.all([showCases(), openCase(m[1])]);
  caseData = null;
  $("case").hidden = true;
  return showCases();
}

function setup() {
  const drop = $("drop"), input = $("file-input");
  $("reviewer").value = localStorage.getItem("leukonet-reviewer") || "";
  $("reviewer").addEventListener("change", () => localStorage.setItem("leukonet-reviewer", $("reviewer").value.trim()));
  $("new-case").addEventListener("submit", (e) => {
    e.preventDefault();
    postJSON("/api/cases", { note: $("note").value }).then((c) => { $("note").value = ""; location.hash = "case=" + c.id; })
      .catch((err) => status(err.message, "error"));
  });
  input.addEventListener("change", () => { upload(input.files).finally(() => { input.value = ""; }); });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); upload(e.dataTransfer.files); });
  // a file dropped beside the zone must not make the browser navigate away
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("keydown", onKey);
  $("view-toggle").addEventListener("click", () => { gridView = !gridView; renderGrid(); });
  $("sign-off").addEventListener("click", () => {
    Promise.resolve().then(() => postJSON("/api/cases/" + caseData.id + "/sign-off", { reviewer: reviewer() }))
      .then(() => refresh()).then(() => status("signed off", "signed"))
      .catch((err) => status(err.message, "error"));
  });
  window.addEventListener("hashchange", () => { route().catch((err) => status(err.message, "error")); });
}

async function start() {
  setup();
  info = await api("/api/info");
  $("model-info").textContent = "model " + info.checkpoint + " (sha256 " + info.checkpoint_sha256.slice(0, 12) + ") · review below "
    + pct(info.review_threshold) + " confidence (" + info.review_threshold_from + ") · not-a-leukocyte check: " + info.ood_check;
  $("limits").textContent = "Accepted: " + info.extensions.join(" ") + " · at most " + mb(info.max_file_bytes)
    + " a file. Every cell is kept in this station's database.";
  $("keys").replaceChildren(...info.classes.flatMap((c, i) => [el("kbd", { text: String(i + 1) }), " " + c + "  "]),
    el("kbd", { text: "X" }), " not a leukocyte  ", el("kbd", { text: "Enter" }), " confirm  ", el("kbd", { text: "U" }), " undo");
  await route();
  document.body.dataset.ready = "true";
}

start().catch((err) => status("cannot reach the server: " + err.message, "error"));
