// The gallery: series cards from the JSON API, filtered by project, dataset and modality, paged.
// Plain browser JavaScript, no build step. State lives in the URL query, so views can be shared:
// ?project=&dataset=&modality=&limit=&offset=, or ?series=<SeriesInstanceUID> for one series.
"use strict";

(() => {
  const VAL = "00111001 ValidationResults_object";
  const ERRORS = "00111002 ValidationErrors_integer";
  const WARNINGS = "00111003 ValidationWarnings_integer";
  const STATUS = "00111005 ValidationStatus_keyword";

  const $ = (id) => document.getElementById(id);
  const els = {
    project: $("project"), dataset: $("dataset"), modality: $("modality"), limit: $("limit"),
    cards: $("cards"), status: $("status"), pager: $("pager"), prev: $("prev"), next: $("next"),
    range: $("range"), single: $("single"),
  };
  const params = new URLSearchParams(location.search);
  const state = {
    project: params.get("project") || "",
    dataset: params.get("dataset") || "",
    modality: params.get("modality") || "",
    limit: Number(params.get("limit")) || 24,
    offset: Math.max(0, Number(params.get("offset")) || 0),
    series: params.get("series") || "",
    total: 0,
  };
  let generation = 0; // drops answers to requests a newer filter change superseded

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(`${response.status}: ${detail}`);
    }
    return response.json();
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function option(value, label, selected) {
    return el("option", { value, text: label, selected: selected || undefined });
  }

  function syncUrl() {
    const q = new URLSearchParams();
    if (state.series) q.set("series", state.series);
    if (state.project !== "admin") q.set("project", state.project);
    if (state.dataset) q.set("dataset", state.dataset);
    if (state.modality) q.set("modality", state.modality);
    if (state.limit !== 24) q.set("limit", String(state.limit));
    if (state.offset) q.set("offset", String(state.offset));
    const query = q.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : ""));
  }

  function formatDate(value) {
    const text = String(value || "");
    return /^\d{8}$/.test(text) ? `${text.slice(0, 4)}-${text.slice(4, 6)}-${text.slice(6)}` : text || "no date";
  }

  function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

  function badge(item) {
    const v = item.validation;
    if (v && typeof v[ERRORS] === "number") {
      const errors = v[ERRORS], warnings = v[WARNINGS] || 0;
      const level = errors ? "error" : warnings ? "warning" : "ok";
      return el("a", {
        class: `badge badge-${level}`, href: item.report_url, target: "_blank", rel: "noopener",
        title: "Open the validation report", "data-errors": String(errors), "data-warnings": String(warnings),
        text: errors || warnings ? `${plural(errors, "error")} · ${plural(warnings, "warning")}` : "valid",
      });
    }
    const status = v && v[STATUS];
    if (status === "validator unavailable") {
      return el("span", { class: "badge badge-none", title: "dciodvfy is not installed on the gateway", text: "not validated" });
    }
    if (status && String(status).startsWith("failed")) {
      return el("span", { class: "badge badge-error", title: status, text: "validation failed" });
    }
    return el("span", { class: "badge badge-none", text: "validation pending" });
  }

  function datasetsOf(item) {
    return (item.datasets || []).map((d) => (typeof d === "string" ? d : d.dataset)).filter(Boolean);
  }

  // "pending": the series is still arriving, or its thumbnail has not been rendered yet;
  // "failed": rendering gave up (the recorded error is the tooltip); "ready": a picture exists.
  function thumbnailState(item) {
    if (item.has_thumbnail) return "ready";
    return item.thumbnail_error ? "failed" : "pending";
  }

  function settled(item) {
    const status = item.validation && item.validation[STATUS];
    return thumbnailState(item) !== "pending" && Boolean(status);
  }

  function picture(item, title) {
    const thumbState = thumbnailState(item);
    const box = el("div", { class: "thumb" });
    if (thumbState === "pending") {
      box.classList.add("thumb-missing", "thumb-pending");
      box.append(el("span", { text: item.complete ? "Rendering thumbnail…" : "Processing: series still arriving…" }));
      return box;
    }
    if (thumbState === "failed") {
      box.classList.add("thumb-missing");
      box.append(el("span", { title: item.thumbnail_error, text: "Thumbnail unavailable" }));
      return box;
    }
    const img = el("img", {
      // The series UID and instance count in the URL: a re-rendered thumbnail is fetched anew.
      src: `${item.thumbnail_url}?n=${item.instance_count ?? ""}`, alt: `Thumbnail of ${title}`,
      loading: "lazy", decoding: "async", width: "300", height: "300",
    });
    img.addEventListener("error", () => {
      img.remove();
      box.classList.add("thumb-missing");
      box.append(el("span", { text: "Thumbnail unavailable" }));
    });
    box.append(img);
    return box;
  }

  function card(item, highlight) {
    const title = item.description || "Unnamed series";
    const link = `${location.pathname}?series=${encodeURIComponent(item.series_uid)}`;
    const datasets = datasetsOf(item);
    return el("li", {
      class: `card${highlight ? " highlight" : ""}`, "data-series-uid": item.series_uid,
      "data-modality": item.modality, "data-state": settled(item) ? "done" : "processing",
      "data-thumbnail": thumbnailState(item),
    },
      el("a", { class: "thumb-link", href: link, title: "Show only this series" }, picture(item, title)),
      el("div", { class: "card-body" },
        el("div", { class: "card-top" },
          el("span", { class: "modality", text: item.modality || "?" }),
          badge(item)),
        el("h2", { class: "description", title, text: title }),
        el("dl", {},
          el("dt", { text: "Date" }), el("dd", { class: "date", text: formatDate(item.series_date) }),
          el("dt", { text: "Instances" }), el("dd", { class: "count", text: String(item.instance_count ?? "?") }),
          el("dt", { text: datasets.length > 1 ? "Datasets" : "Dataset" }),
          el("dd", { class: "datasets", text: datasets.join(", ") || "none" })),
        el("code", { class: "uid", title: "SeriesInstanceUID", text: item.series_uid })));
  }

  // Cards of series still being processed are refreshed in place until their thumbnail and
  // validation arrive: one request per unfinished card every few seconds, for a bounded time,
  // and only for the page on screen (a newer render stops the loop).
  const POLL_MS = 2000;
  const POLL_LIMIT_MS = 10 * 60 * 1000;

  async function followUnfinished(mine, items, highlightUid) {
    const started = Date.now();
    let waiting = items.filter((item) => !settled(item));
    while (waiting.length && mine === generation && Date.now() - started < POLL_LIMIT_MS) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (mine !== generation) return;
      const next = [];
      for (const item of waiting) {
        let fresh;
        try {
          fresh = await getJSON(`/api/series/${encodeURIComponent(item.series_uid)}`);
        } catch (_) {
          next.push(item); // a transient error: try again on the next round
          continue;
        }
        if (mine !== generation) return;
        const old = els.cards.querySelector(`li[data-series-uid="${CSS.escape(item.series_uid)}"]`);
        if (old) old.replaceWith(card(fresh, fresh.series_uid === highlightUid));
        if (!settled(fresh)) next.push(fresh);
      }
      waiting = next;
    }
  }

  function show(items, highlightUid) {
    els.cards.replaceChildren(...items.map((item) => card(item, item.series_uid === highlightUid)));
    followUnfinished(generation, items, highlightUid);
  }

  function setStatus(text, isError) {
    els.status.textContent = text;
    els.status.classList.toggle("error", Boolean(isError));
    els.status.hidden = !text;
  }

  async function loadProjects() {
    const body = await getJSON("/api/projects");
    const names = body.items.map((p) => p.name);
    // admin (every series) when this session sees it, else the project of its token.
    if (!state.project) state.project = names.includes("admin") ? "admin" : names[0] || "admin";
    if (!names.includes(state.project)) names.unshift(state.project);
    els.project.replaceChildren(...names.map((n) => option(n, n, n === state.project)));
  }

  async function loadFacets() {
    const project = encodeURIComponent(state.project);
    const [datasets, modalities] = await Promise.all([
      getJSON(`/api/projects/${project}/datasets`),
      getJSON(`/gallery/api/modalities?project=${project}` + (state.dataset ? `&dataset=${encodeURIComponent(state.dataset)}` : "")),
    ]);
    const names = datasets.items.map((d) => d.name);
    if (state.dataset && !names.includes(state.dataset)) names.push(state.dataset);
    els.dataset.replaceChildren(option("", "All datasets", !state.dataset),
      ...names.map((n) => option(n, n, n === state.dataset)));
    const present = new Set(modalities.present);
    const items = modalities.items.slice();
    if (state.modality && !items.includes(state.modality)) items.push(state.modality);
    els.modality.replaceChildren(option("", "All modalities", !state.modality),
      ...items.map((m) => option(m, present.has(m) ? m : `${m} (none)`, m === state.modality)));
  }

  async function loadPage() {
    const mine = ++generation;
    syncUrl();
    els.single.hidden = !state.series;
    if (state.series) {
      setStatus("Loading…");
      const item = await getJSON(`/api/series/${encodeURIComponent(state.series)}`);
      if (mine !== generation) return;
      show([item], item.series_uid);
      els.pager.hidden = true;
      setStatus("");
      return;
    }
    const q = new URLSearchParams({ limit: String(state.limit), offset: String(state.offset) });
    if (state.dataset) q.set("dataset", state.dataset);
    if (state.modality) q.set("modality", state.modality);
    setStatus("Loading…");
    const body = await getJSON(`/api/projects/${encodeURIComponent(state.project)}/series?${q}`);
    if (mine !== generation) return;
    state.total = body.total;
    show(body.items);
    const first = body.items.length ? state.offset + 1 : 0;
    els.range.textContent = `${first}–${state.offset + body.items.length} of ${body.total}`;
    els.prev.disabled = state.offset === 0;
    els.next.disabled = state.offset + state.limit >= body.total;
    els.pager.hidden = body.total <= state.limit && state.offset === 0;
    setStatus(body.total ? "" : "No series match these filters.");
    document.body.dataset.loaded = String(mine); // lets tests wait for a finished render
  }

  function guarded(fn) {
    return async (...args) => {
      try { await fn(...args); } catch (error) { setStatus(`Could not load: ${error.message}`, true); }
    };
  }

  const refresh = guarded(async (facets) => {
    if (facets) await loadFacets();
    await loadPage();
  });

  els.project.addEventListener("change", () => {
    Object.assign(state, { project: els.project.value, dataset: "", modality: "", offset: 0, series: "" });
    refresh(true);
  });
  els.dataset.addEventListener("change", () => {
    Object.assign(state, { dataset: els.dataset.value, offset: 0, series: "" });
    refresh(true);
  });
  els.modality.addEventListener("change", () => {
    Object.assign(state, { modality: els.modality.value, offset: 0, series: "" });
    refresh(false);
  });
  els.limit.addEventListener("change", () => {
    Object.assign(state, { limit: Number(els.limit.value), offset: 0 });
    refresh(false);
  });
  els.prev.addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); refresh(false); });
  els.next.addEventListener("click", () => { state.offset += state.limit; refresh(false); });
  $("show-all").addEventListener("click", (event) => {
    event.preventDefault();
    state.series = "";
    refresh(false);
  });

  for (const option of els.limit.options) option.selected = Number(option.value) === state.limit;
  guarded(async () => {
    await loadProjects();
    await loadFacets();
    await loadPage();
    if (state.series) {
      document.body.dataset.loaded = String(generation);
    }
  })();
})();
