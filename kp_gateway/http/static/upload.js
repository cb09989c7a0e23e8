// The upload page: pickers, drop zone, tus upload with progress, import progress, results,
// and the dcmsend command. Plain browser JavaScript, no build step, no external code.
"use strict";

const CHUNK_BYTES = 8 * 1024 * 1024; // one PATCH; a dropped connection loses at most this much
const MAX_RETRIES = 8;
const AE_MAX = 16;
const $ = (id) => document.getElementById(id);
const state = { config: null, files: [], uploading: false };

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function today() {
  const d = new Date();
  const pad = (n) => String(n).padStart(2, "0");
  return `upload-${d.getFullYear()}${pad(d.getMonth() + 1)}${pad(d.getDate())}`;
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// -- pickers and the dcmsend command -----------------------------------------------------

async function loadProjects() {
  const select = $("project");
  const { items } = await getJSON("/api/projects");
  select.replaceChildren(...items.map((p) => new Option(p.name, p.name)));
  const wanted = new URLSearchParams(location.search).get("project");
  if (wanted && items.some((p) => p.name === wanted)) select.value = wanted;
  await loadDatasets();
}

async function loadDatasets() {
  const project = $("project").value;
  const list = $("datasets");
  list.replaceChildren();
  if (!project) return;
  try {
    const { items } = await getJSON(`/api/projects/${encodeURIComponent(project)}/datasets`);
    list.replaceChildren(...items.map((d) => {
      const option = document.createElement("option");
      option.value = d.name;
      option.label = `${d.series_count ?? 0} series`;
      return option;
    }));
  } catch (err) {
    console.warn("datasets", err);
  }
  updateCommand();
}

function datasetName() {
  return ($("dataset").value.trim() || $("dataset").placeholder).toLowerCase();
}

function validDataset(name) {
  return /^[a-z0-9][a-z0-9._-]{0,63}$/.test(name);
}

function updateCommand() {
  const cfg = state.config || {};
  const host = cfg.public_host || location.hostname;
  const port = cfg.dicom_port || 11112;
  const project = $("project").value || "admin";
  const dataset = datasetName();
  // Until a dataset is typed, the command names a placeholder: the upload default
  // (upload-YYYYMMDD) is too long for an AE title and would warn before anything was chosen.
  const typed = $("dataset").value.trim() !== "";
  const calling = typed ? `kp-${dataset}` : "kp-<dataset>";
  const called = `kp-${project}`;
  // No --scan-pattern: CD/PACS exports name their files IM000001 with no extension, and
  // --no-halt skips their DICOMDIR and any non-DICOM file instead of stopping at it.
  $("dcmsend-command").textContent =
    `dcmsend -v ${host} ${port} --aetitle ${calling} --call ${called} ` +
    `--scan-directories --recurse --no-halt <data-dir-of-DICOM-images>`;
  const long = [typed ? calling : "", called].filter((t) => t.length > AE_MAX);
  const warning = $("ae-warning");
  warning.hidden = long.length === 0;
  warning.textContent = long.length
    ? `${long.map((t) => `"${t}" has ${t.length} characters`).join(" and ")}: AE titles hold ` +
      `at most ${AE_MAX}, so dcmsend cannot use ${long.length > 1 ? "them" : "it"}. ` +
      `Choose a dataset name of at most ${AE_MAX - 3} characters to send with DICOM.`
    : "";
  const bad = !validDataset(dataset);
  $("dataset-error").hidden = !bad;
  $("dataset-error").textContent = bad
    ? "Dataset names use a-z, 0-9, '.', '_' and '-', and start with a letter or digit." : "";
  $("upload-button").disabled = bad || state.files.length === 0 || state.uploading;
}

async function copyCommand() {
  const text = $("dcmsend-command").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Clipboard API needs a secure context; fall back to a selection copy on plain http.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy-status").textContent = "copied";
  setTimeout(() => { $("copy-status").textContent = ""; }, 2000);
}

// -- choosing files ----------------------------------------------------------------------

function setFiles(entries) {
  state.files = entries.filter((e) => !e.path.split("/").some((p) => p.startsWith(".")));
  const total = state.files.reduce((sum, e) => sum + e.file.size, 0);
  $("picked").textContent = state.files.length === 1
    ? `${state.files[0].path} (${formatBytes(total)})`
    : `${state.files.length} files (${formatBytes(total)})`;
  updateCommand();
}

function readAllEntries(reader) {
  return new Promise((resolve, reject) => {
    const out = [];
    const next = () => reader.readEntries((batch) => {
      if (!batch.length) resolve(out);
      else { out.push(...batch); next(); }
    }, reject);
    next();
  });
}

async function walkEntry(entry, prefix, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ file, path: prefix + file.name });
  } else if (entry.isDirectory) {
    for (const child of await readAllEntries(entry.createReader())) {
      await walkEntry(child, `${prefix}${entry.name}/`, out);
    }
  }
}

async function onDrop(event) {
  event.preventDefault();
  $("dropzone").classList.remove("over");
  const items = [...event.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry());
  const out = [];
  if (items.length && items.every(Boolean)) {
    for (const entry of items) await walkEntry(entry, "", out);
  } else {
    for (const file of event.dataTransfer.files) out.push({ file, path: file.name });
  }
  setFiles(out);
}

// -- a stored (uncompressed) zip of several files, built lazily as a Blob ------------------

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

async function crc32(file, onBytes) {
  let crc = 0xffffffff;
  for (let offset = 0; offset < file.size; offset += CHUNK_BYTES) {
    const bytes = new Uint8Array(await file.slice(offset, offset + CHUNK_BYTES).arrayBuffer());
    for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
    onBytes(bytes.length);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

async function buildZip(entries, onProgress) {
  const total = entries.reduce((s, e) => s + e.file.size, 0);
  if (total >= 0xffff0000 || entries.length >= 0xffff) {
    throw new Error("more than 4 GB or 65535 files: zip them yourself and drop the zip");
  }
  const encoder = new TextEncoder();
  const parts = [];
  const central = [];
  let offset = 0;
  let done = 0;
  for (const { file, path } of entries) {
    const name = encoder.encode(path);
    const crc = await crc32(file, (n) => { done += n; onProgress(done / Math.max(total, 1)); });
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true);
    local.setUint16(6, 0x0800, true); // UTF-8 names
    local.setUint32(14, crc, true);
    local.setUint32(18, file.size, true);
    local.setUint32(22, file.size, true);
    local.setUint16(26, name.length, true);
    parts.push(local, name, file);
    const cd = new DataView(new ArrayBuffer(46));
    cd.setUint32(0, 0x02014b50, true);
    cd.setUint16(4, 20, true);
    cd.setUint16(6, 20, true);
    cd.setUint16(8, 0x0800, true);
    cd.setUint32(16, crc, true);
    cd.setUint32(20, file.size, true);
    cd.setUint32(24, file.size, true);
    cd.setUint16(28, name.length, true);
    cd.setUint32(42, offset, true);
    central.push(cd, name);
    offset += 30 + name.length + file.size;
  }
  const cdSize = central.reduce((s, p) => s + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, entries.length, true);
  end.setUint16(10, entries.length, true);
  end.setUint32(12, cdSize, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}

// -- tus upload --------------------------------------------------------------------------

function b64(text) {
  return btoa(String.fromCharCode(...new TextEncoder().encode(text)));
}

function patch(url, blob, offset, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PATCH", url);
    xhr.setRequestHeader("Tus-Resumable", "1.0.0");
    xhr.setRequestHeader("Upload-Offset", String(offset));
    xhr.setRequestHeader("Content-Type", "application/offset+octet-stream");
    xhr.upload.onprogress = (e) => onProgress(offset + e.loaded);
    xhr.onload = () => {
      if (xhr.status === 204) resolve(Number(xhr.getResponseHeader("Upload-Offset")));
      else {
        let detail = xhr.statusText;
        try { detail = JSON.parse(xhr.responseText).detail || detail; } catch { /* not JSON */ }
        const err = new Error(detail);
        err.status = xhr.status;
        reject(err);
      }
    };
    xhr.onerror = () => reject(new Error("connection lost"));
    xhr.send(blob);
  });
}

async function currentOffset(url) {
  const response = await fetch(url, { method: "HEAD", headers: { "Tus-Resumable": "1.0.0" } });
  if (!response.ok) throw new Error(`the upload is gone (${response.status})`);
  return Number(response.headers.get("Upload-Offset"));
}

// Bytes per second sent by this page: a resumed upload's earlier bytes do not count.
function transferRate(sent, resumedFrom, seconds) {
  return seconds > 0.5 ? Math.max(0, sent - resumedFrom) / seconds : null;
}

async function tusUpload(blob, filename, onProgress) {
  const meta = {
    project: $("project").value, dataset: datasetName(), kind: $("kind").value, filename,
  };
  const key = `kp-tus:${meta.project}:${meta.dataset}:${filename}:${blob.size}`;
  let url = localStorage.getItem(key);
  let offset = 0;
  if (url) {
    try { offset = await currentOffset(url); } catch { url = null; }
  }
  if (!url) {
    const response = await fetch(state.config.tus_endpoint, {
      method: "POST",
      headers: {
        "Tus-Resumable": "1.0.0",
        "Upload-Length": String(blob.size),
        "Upload-Metadata": Object.entries(meta).map(([k, v]) => `${k} ${b64(v)}`).join(","),
      },
    });
    if (response.status !== 201) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.detail || `${response.status} ${response.statusText}`);
    }
    url = response.headers.get("Location");
    localStorage.setItem(key, url);
  }
  const id = url.split("/").pop();
  // Bytes a previous page sent before this resume are not part of this session's rate.
  const resumedFrom = offset;
  const report = (sent) => onProgress(sent, resumedFrom);
  let failures = 0;
  while (offset < blob.size) {
    try {
      offset = await patch(url, blob.slice(offset, offset + CHUNK_BYTES), offset, report);
      failures = 0;
    } catch (err) {
      if (err.status && err.status !== 409 && err.status < 500) {
        localStorage.removeItem(key);
        throw err; // refused for good (unsafe zip, not DICOM, ...)
      }
      if (++failures > MAX_RETRIES) throw err;
      $("upload-status").textContent = `connection problem, resuming (${err.message})`;
      await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** failures, 10000)));
      offset = await currentOffset(url);
    }
    report(offset);
  }
  localStorage.removeItem(key);
  return id;
}

// -- import progress and results ---------------------------------------------------------

async function followImport(id) {
  for (;;) {
    const status = await getJSON(`/api/uploads/${encodeURIComponent(id)}`);
    const members = status.members_total || 1;
    const settled = status.instances_imported + status.instances_failed;
    const submitted = Math.max(status.instances_submitted, 1);
    const fraction = status.state === "done" || status.state === "failed" ? 1
      : 0.5 * (status.members_done / members) + 0.5 * (settled / submitted) *
        (status.members_done / members);
    $("import-progress").value = Math.round(fraction * 100);
    $("import-percent").textContent = `${Math.round(fraction * 100)} %`;
    $("upload-status").textContent =
      `importing: ${status.instances_imported} instances, ${status.files_stored} files` +
      niftiCases(status);
    if (status.state === "done" || status.state === "failed") return status;
    await new Promise((r) => setTimeout(r, 500));
  }
}

// NIfTI trees are converted case by case; say how far that got (empty for DICOM uploads).
function niftiCases(status) {
  if (!status.cases_total) return "";
  const failed = status.cases_failed ? `, ${status.cases_failed} failed` : "";
  return ` NIfTI: ${status.cases_done} of ${status.cases_total} cases converted${failed}.`;
}

function link(href, text) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}

function showResults(status) {
  $("results").hidden = false;
  const summary = $("result-summary");
  summary.className = status.state === "done" && !status.errors_total ? "ok"
    : status.state === "done" ? "warn" : "err";
  summary.textContent =
    `${status.state === "done" ? "Done" : "Failed"}: ${status.files_seen} files seen, ` +
    `${status.instances_imported} instances imported into ${status.series_created} series, ` +
    `${status.files_stored} files stored, ${status.errors_total} with problems.` +
    niftiCases(status) +
    (status.state === "failed" && status.detail ? ` ${status.detail}` : "");
  $("series-links").replaceChildren(...status.series.map((s) => {
    const li = document.createElement("li");
    li.append(link(s.gallery_url, s.series_uid));
    return li;
  }));
  describeSeries(status.series).catch(() => { /* the UIDs stay: still correct links */ });
  $("series-block").hidden = status.series.length === 0;
  $("stored-files").replaceChildren(...status.files.map((f) => {
    const li = document.createElement("li");
    li.append(link(f.url, f.name), ` (${formatBytes(f.size)})`);
    return li;
  }));
  $("files-block").hidden = status.files.length === 0;
  $("file-results").replaceChildren(...status.errors.map((e) => {
    const tr = document.createElement("tr");
    const file = document.createElement("td");
    file.textContent = e.file;
    const problem = document.createElement("td");
    problem.textContent = e.detail;
    problem.className = "err";
    tr.append(file, problem);
    return tr;
  }));
  $("errors-block").hidden = status.errors.length === 0;
}

// Each imported series as "CT · description · N instances" (the first 50; the rest keep their
// UID), looked up one at a time so a large import does not fire hundreds of requests at once.
async function describeSeries(series) {
  const links = [...$("series-links").querySelectorAll("a")];
  for (const [i, s] of series.slice(0, 50).entries()) {
    const info = await getJSON(`/api/series/${encodeURIComponent(s.series_uid)}`);
    const a = links[i];
    a.textContent = `${info.modality || "?"} · ${info.description || "Unnamed series"} · ` +
      `${info.instance_count} instance${info.instance_count === 1 ? "" : "s"}`;
    a.title = s.series_uid;
  }
}

function showFailure(message) {
  $("results").hidden = false;
  $("result-summary").className = "err";
  $("result-summary").textContent = `Upload refused: ${message}`;
  for (const id of ["series-block", "files-block", "errors-block"]) $(id).hidden = true;
}

async function startUpload() {
  if (!state.files.length) return;
  state.uploading = true;
  updateCommand();
  $("results").hidden = true;
  $("progress-block").hidden = false;
  for (const id of ["upload-progress", "import-progress"]) $(id).value = 0;
  $("upload-percent").textContent = "0 %";
  $("import-percent").textContent = "0 %";
  try {
    let blob;
    let filename;
    if (state.files.length === 1) {
      blob = state.files[0].file;
      filename = state.files[0].path.split("/").pop();
    } else {
      $("upload-status").textContent = "packing the files into a zip…";
      blob = await buildZip(state.files, (f) => {
        $("upload-status").textContent = `packing the files into a zip… ${Math.round(f * 100)} %`;
      });
      filename = "browser-upload.zip";
    }
    const started = performance.now();
    $("upload-status").textContent = "sending…";
    const id = await tusUpload(blob, filename, (sent, resumedFrom) => {
      const pct = blob.size ? Math.floor((sent / blob.size) * 100) : 100;
      $("upload-progress").value = pct;
      $("upload-percent").textContent = `${pct} %`;
      const seconds = (performance.now() - started) / 1000;
      const rate = transferRate(sent, resumedFrom, seconds);
      if (rate !== null) $("upload-rate").textContent = `${formatBytes(rate)}/s`;
    });
    $("upload-progress").value = 100;
    $("upload-percent").textContent = "100 %";
    showResults(await followImport(id));
    $("upload-status").textContent = "";
    await loadDatasets();
  } catch (err) {
    showFailure(err.message);
    $("upload-status").textContent = "";
  } finally {
    state.uploading = false;
    updateCommand();
  }
}

// -- wiring ------------------------------------------------------------------------------

async function init() {
  $("dataset").placeholder = today();
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { onDrop(e).catch((err) => showFailure(err.message)); });
  $("pick-files").addEventListener("click", () => $("file-input").click());
  $("pick-folder").addEventListener("click", () => $("folder-input").click());
  for (const id of ["file-input", "folder-input"]) {
    $(id).addEventListener("change", (e) => setFiles([...e.target.files].map((file) => ({
      file, path: file.webkitRelativePath || file.name,
    }))));
  }
  $("project").addEventListener("change", () => { loadDatasets(); updateCommand(); });
  $("dataset").addEventListener("input", updateCommand);
  $("upload-button").addEventListener("click", startUpload);
  $("copy-command").addEventListener("click", copyCommand);
  try {
    state.config = await getJSON("/api/config/public");
    await loadProjects();
  } catch (err) {
    showFailure(`cannot reach the gateway API (${err.message})`);
  }
  updateCommand();
  document.body.dataset.ready = "true";
}

init();
