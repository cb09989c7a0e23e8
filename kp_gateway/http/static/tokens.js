// The token page: list, create and revoke a project's tokens through the JSON API, with the
// session cookie. The API itself allows this to the admin token only. Plain browser JavaScript.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  async function api(method, url, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 204) return null;
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    return data;
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "err" : "muted";
    $("status").hidden = !text;
  }

  function when(seconds) {
    return new Date(seconds * 1000).toLocaleString();
  }

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  }

  function project() {
    return encodeURIComponent($("project").value);
  }

  async function loadTokens() {
    const { items } = await api("GET", `/api/projects/${project()}/tokens`);
    $("tokens").replaceChildren(...items.map((t) => {
      const row = document.createElement("tr");
      row.dataset.id = t.id;
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "secondary";
      revoke.textContent = "Revoke";
      revoke.addEventListener("click", () => guarded(async () => {
        if (!confirm(`Revoke the token "${t.label || t.id}"? It stops working at once.`)) return;
        await api("DELETE", `/api/projects/${project()}/tokens/${encodeURIComponent(t.id)}`);
        await loadTokens();
        setStatus("Token revoked.");
      }));
      const actions = document.createElement("td");
      actions.append(revoke);
      row.append(cell(t.label || "—"), cell(t.scope), cell(when(t.created_at)),
        cell(when(t.expires_at)), actions);
      return row;
    }));
    $("empty").hidden = items.length > 0;
  }

  async function guarded(fn) {
    try { await fn(); } catch (error) { setStatus(`Failed: ${error.message}`, true); }
  }

  $("project").addEventListener("change", () => guarded(async () => {
    $("secret-block").hidden = true;
    await loadTokens();
  }));

  $("create").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      const created = await api("POST", `/api/projects/${project()}/tokens`, {
        scope: $("scope").value,
        label: $("label").value.trim(),
        expires_in_days: Number($("days").value),
      });
      $("secret").textContent = created.token;
      $("secret-block").hidden = false;
      $("label").value = "";
      await loadTokens();
      setStatus(`Token created for project ${created.project}.`);
    });
  });

  guarded(async () => {
    const me = await api("GET", "/api/whoami");
    if (!me.admin) {
      $("my-scope").textContent = me.scope;
      $("my-project").textContent = me.project;
      $("not-admin").hidden = false;
      setStatus("");
      return;
    }
    const { items } = await api("GET", "/api/projects");
    const names = items.map((p) => p.name).filter((n) => n !== "admin");
    if (!names.length) {
      setStatus("Create a project first: tokens open one project each.");
      return;
    }
    const wanted = new URLSearchParams(location.search).get("project");
    $("project").replaceChildren(...names.map((n) => new Option(n, n, false, n === wanted)));
    $("manage").hidden = false;
    $("create-card").hidden = false;
    await loadTokens();
    setStatus("");
    document.body.dataset.loaded = "1"; // lets tests wait for a finished render
  });
})();
