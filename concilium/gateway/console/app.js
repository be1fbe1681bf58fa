// The Concilium console: five tabs over the gateway's JSON API (docs/console.md). Plain DOM, no build
// step; every value from the server goes in as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

function adminKey() {
  const m = document.cookie.match(/(?:^|;\s*)concilium_admin=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

function authHeaders(key) {
  const k = key || adminKey();
  return k ? {authorization: "Bearer " + k} : {};
}

async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {...authHeaders(opts.key), ...(opts.headers || {})}});
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.error && body.error.message) || ("HTTP " + r.status));
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

const usd = (v) => (v == null ? "–" : "$" + (v >= 1 ? v.toFixed(2) : Number(v.toPrecision(3)).toString()));
const pct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
const secs = (v) => (v == null ? "–" : v < 1 ? (1000 * v).toFixed(0) + " ms" : v.toFixed(2) + " s");
const num = (v) => (v == null ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(2));

function bar(label, fraction, text, cls = "") {
  const f = Math.max(0, Math.min(1, fraction || 0));
  return el("div", {class: (label ? "bar-row " : "bar-cell ") + cls},
    label ? el("span", {}, label) : "",
    el("div", {class: "bar" + (fraction > 1 ? " over" : "")}, el("span", {style: `width:${(100 * f).toFixed(1)}%`})),
    el("span", {class: "muted"}, text));
}

function fill(id, ...nodes) { $(id).replaceChildren(...nodes); }

function dl(id, pairs) {
  fill(id, ...pairs.filter(([, v]) => v != null && v !== "").flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function table(id, head, rows) {
  fill(id, el("tr", {}, ...head.map((h) => el("th", {}, h))),
    ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c)
      : el("td", {class: typeof c === "number" ? "num" : ""}, c))))));
}

// ------------------------------------------------------------------------------------------- tabs

const refreshers = {};
let pollTimer = null;

function show(tab) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll("section.tab")) s.classList.toggle("active", s.id === tab);
  clearInterval(pollTimer);
  const refresh = refreshers[tab];
  if (refresh) {
    refresh();
    if (refresh.live) pollTimer = setInterval(refresh, POLL_MS);
  }
}

// ------------------------------------------------------------------------------------- playground

function requestBody() {
  const body = {model: $("pg-model").value || "concilium/auto",
                messages: [{role: "user", content: $("pg-prompt").value}]};
  const effort = $("pg-effort").value;
  if (effort) body.reasoning_effort = effort;
  const meta = $("pg-metadata").value.trim();
  if (meta) body.metadata = JSON.parse(meta);
  return body;
}

function renderStrategy(plan) {
  const box = $("plan-strategy");
  if (plan.steps && plan.steps.length) {  // fusion / chain: columns by depth, each step after those it reads
    const depth = {};
    const of = (s) => depth[s.id] ?? (depth[s.id] = 1 + Math.max(-1, ...s.after.map((a) => of(byId[a] || {id: a, after: []}))));
    const byId = Object.fromEntries(plan.steps.map((s) => [s.id, s]));
    plan.steps.forEach(of);
    const cols = [];
    for (const s of plan.steps) (cols[depth[s.id]] = cols[depth[s.id]] || []).push(s);
    const node = (s) => el("div", {class: "dag-node step"}, `${s.id} · ${s.role}`, el("small", {}, s.model),
      s.after.length ? el("small", {}, "after " + s.after.join(", ")) : "");
    const columns = cols.filter(Boolean).map((col) => el("div", {class: "dag-col"}, ...col.map(node)));
    box.replaceChildren(el("div", {class: "dag"}, ...columns));
  } else if (plan.cascade && plan.cascade.length) {
    box.replaceChildren(el("ol", {}, ...plan.cascade.map((c) => el("li", {class: "step"},
      `${c.model}: ${c.action}` + (c.threshold != null ? ` (accept at ≥ ${c.threshold})` : "")
      + (c.reason ? ` — ${c.reason}` : "")))));
  } else {
    box.replaceChildren(el("p", {class: "muted"}, `${plan.strategy}: the first candidate that answers`));
  }
  if (plan.decision) {
    const d = plan.decision;
    box.append(el("p", {}, `online router (${d.live}) chose ${d.chosen}, p = ${d.propensity.toFixed(2)}`
      + (d.explored ? " (exploring)" : "")));
  }
}

function renderPlan(plan) {
  dl("plan-summary", [["route", plan.route], ["strategy", plan.strategy], ["mode", plan.mode],
    ["rule", plan.rule], ["objective", plan.objective], ["reasons", (plan.reasons || []).join("; ")]]);
  const maxCost = Math.max(0, ...plan.candidates.map((c) => c.est_cost_usd || 0));
  fill("plan-candidates", ...plan.candidates.map((c) => {
    const row = bar(c.model, c.predicted_quality ?? (maxCost ? (c.est_cost_usd || 0) / maxCost : 0),
      `q ${c.predicted_quality == null ? "–" : c.predicted_quality.toFixed(2)} · ${usd(c.est_cost_usd)}`,
      "candidate");
    row.title = c.reason || "";
    return row;
  }));
  const p = plan.prediction;
  const probs = p ? Object.entries(p.category_probs || {}).sort((a, b) => b[1] - a[1]) : [];
  fill("plan-prediction", ...(p ? [
    ...probs.map(([cat, v]) => bar(cat, v, pct(v), "category")),
    p.difficulty != null ? bar("difficulty", p.difficulty, `${p.difficulty.toFixed(2)} ${p.difficulty_label || ""}`) : "",
  ] : [el("p", {class: "muted"}, "no prediction (rules only)")]));
  fill("plan-skipped", ...(plan.skipped.length ? plan.skipped.map((s) => el("li", {}, `${s.model}: ${s.reason}`))
    : [el("li", {class: "muted"}, "none")]));
  renderStrategy(plan);
}

async function planPrompt() {
  $("pg-error").textContent = "";
  const body = requestBody();
  const plan = await api("/v1/route", {method: "POST", key: $("pg-key").value.trim(),
    headers: {"content-type": "application/json"}, body: JSON.stringify(body)});
  renderPlan(plan);
  return body;
}

async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", usage = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        if (obj.usage) usage = obj.usage;
        for (const ch of obj.choices || []) if (ch.delta && ch.delta.content) onDelta(ch.delta.content);
      }
    }
  }
  return usage;
}

async function requestCost(rid) {
  for (let i = 0; i < 10; i++) {  // the gateway logs the request once its last byte is sent
    const got = await api("/v1/admin/requests?id=" + encodeURIComponent(rid)).catch(() => null);
    if (got && got.data.length) return got.data[0];
    await new Promise((r) => setTimeout(r, 200));
  }
  return null;
}

async function send() {
  const status = $("pg-status");
  try {
    const body = await planPrompt();
    $("answer").textContent = "";
    fill("answer-meta");
    status.textContent = "streaming…";
    const t0 = performance.now();
    const r = await fetch("/v1/chat/completions", {method: "POST",
      headers: {...authHeaders($("pg-key").value.trim()), "content-type": "application/json"},
      body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}})});
    const rid = r.headers.get("x-request-id");
    const meta = [["model", decodeURIComponent(r.headers.get("x-concilium-model") || "")],
      ["route", decodeURIComponent(r.headers.get("x-concilium-route") || "")], ["request id", rid]];
    dl("answer-meta", meta);
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
    }
    let first = null;
    const usage = await readStream(r, (text) => {
      first = first ?? performance.now() - t0;
      $("answer").textContent += text;
    });
    const logged = rid ? await requestCost(rid) : null;
    dl("answer-meta", [...meta, ["time to first token", secs(first / 1000)],
      ["tokens", usage ? `${usage.prompt_tokens} in, ${usage.completion_tokens} out` : ""],
      ["cost", logged ? usd(logged.cost_usd || 0) : ""]]);
    status.textContent = "done";
  } catch (e) {
    $("pg-error").textContent = e.message;
    status.textContent = "";
  }
}

async function loadModels() {
  const models = await api("/v1/models").catch(() => ({data: []}));
  const select = $("pg-model");
  select.replaceChildren(...models.data.filter((m) => m.kind !== "embedding").map((m) => el("option", {}, m.id)));
  const auto = models.data.find((m) => m.owned_by === "concilium");
  if (auto) select.value = auto.id;
}

// ---------------------------------------------------------------------------------------- traffic

async function refreshTraffic() {
  const [t, last] = await Promise.all([api("/v1/admin/traffic"), api("/v1/admin/requests?limit=25")]);
  const errors = Object.values(t.models).reduce((n, m) => n + m.errors, 0);
  const fallbacks = Object.values(t.fallbacks).reduce((n, v) => n + v, 0);
  fill("traffic-stats", ...[["requests/s", num(t.requests_per_s)], ["requests", num(t.requests_total)],
    ["in flight", num(t.in_flight)], ["errors", num(errors)], ["fallbacks", num(fallbacks)]]
    .map(([k, v]) => el("div", {class: "stat"}, el("b", {}, v), k)));
  table("traffic-models", ["model", "requests", "share", "latency p50", "p99", "TTFT p50", "p99", "errors"],
    Object.entries(t.models).sort((a, b) => b[1].requests - a[1].requests).map(([m, r]) =>
      [m, r.requests, bar("", r.share, pct(r.share)), secs(r.latency_s.p50), secs(r.latency_s.p99),
        secs(r.ttft_s.p50), secs(r.ttft_s.p99), r.errors]));
  fill("traffic-routes", ...Object.entries(t.routes).map(([r, v]) => bar(r, v.share, `${v.requests} · ${pct(v.share)}`)));
  table("traffic-cascade", ["route", "escalation rate", "drafts"], t.cascade.map((c) =>
    [c.route, pct(c.escalation_rate), Object.entries(c.drafts).map(([k, v]) => `${k} ${v}`).join(", ")]));
  table("traffic-circuits", ["model", "circuit", "failures in a row", "unavailable"],
    Object.entries(t.circuits).map(([m, c]) => [m, el("span", {class: c.open ? "error" : "ok"},
      c.open ? `open (${c.open_for_s} s)` : "closed"), c.failures, c.unavailable || ""]));
  table("traffic-errors", ["what", "code", "count"], [
    ...t.upstream_errors.map((e) => [`upstream ${e.model}`, e.code, e.count]),
    ...t.rejected.map((e) => [`refused ${e.status}`, e.code, e.count]),
    ...Object.entries(t.fallbacks).map(([r, n]) => [`fallback on ${r}`, "", n])]);
  table("traffic-requests", ["time", "id", "path", "status", "key", "model", "route", "latency", "cost"],
    last.data.map((e) => [new Date(e.time * 1000).toLocaleTimeString(), e.id.slice(0, 12), e.path,
      e.status, e.key || "", e.model || "", e.route || "", secs(e.latency_s), usd(e.cost_usd || 0)]));
}
refreshTraffic.live = true;

// ------------------------------------------------------------------------------------------ spend

function budgetCells(scope) {
  const day = scope.spent_usd.day, month = scope.spent_usd.month, b = scope.budget_usd || {};
  const cell = (spent, cap) => (cap == null ? usd(spent) : bar("", spent / cap, `${usd(spent)} of ${usd(cap)}`));
  return [cell(day, b.day), cell(month, b.month)];
}

async function refreshSpend() {
  const s = await api("/v1/admin/spend");
  $("spend-window").textContent = `today ${s.window.day} (UTC), this month ${s.window.month}. ${s.note}.`
    + (s.degraded ? " " + s.degraded : "");
  table("spend-keys", ["key", "team", "today", "this month", "since start", ""], s.keys.map((k) => {
    const scope = k.scopes[0];
    const [day, month] = scope ? budgetCells(scope) : ["no limits", ""];
    return [k.key, k.team || "", day, month, usd(k.spent_since_start_usd),
      (k.admin ? "admin " : "") + (k.disabled ? "disabled" : "")];
  }));
  table("spend-teams", ["team", "today", "this month"], s.teams.map((t) => [t.id, ...budgetCells(t)]));
  table("spend-models", ["model", "since start", "today (budget)", "this month (budget)"], s.models.map((m) => {
    const cap = s.model_budgets.find((b) => b.id === m.model);
    return [m.model, usd(m.spent_since_start_usd), ...(cap ? budgetCells(cap) : ["", ""])];
  }));
}
refreshSpend.live = true;

// ----------------------------------------------------------------------------------------- policy

async function refreshPolicy() {
  const p = await api("/v1/admin/policy");
  dl("policy-summary", [["file", p.path], ["version in force", p.version],
    ["file modified", p.file_modified_at ? new Date(p.file_modified_at * 1000).toLocaleString() : ""],
    ["reloads", Object.entries(p.reloads).map(([k, v]) => `${k} ${v}`).join(", ") || "none"],
    ["models", p.models.join(", ")], ["routes", p.routes.join(", ")], ["keys", p.keys]]);
  $("policy-error").textContent = p.load_error ? "Last reload refused (the version above still serves):\n" + p.load_error : "";
  const a = p.router.artifact;
  dl("policy-router", [["learned", String(p.router.learned)], ...(a ? [["source", a.source],
    ["format", a.format && `${a.format} v${a.version}`], ["created", a.created],
    ["categories", (a.categories || []).join(", ")], ["trained models", (a.models || []).join(", ")],
    ["error", a.error]] : [["artifact", "none (rules only)"]])]);
  const curves = await Promise.all(p.router.curves.map(async (url) => {  // fetched: an <img> sends no key
    const r = await fetch(url, {headers: authHeaders()});
    return el("img", {src: URL.createObjectURL(await r.blob()), alt: url.split("/").pop()});
  }));
  fill("policy-curves", ...(curves.length ? curves : [el("p", {class: "muted"}, "no evaluation curves here")]));
}

// ------------------------------------------------------------------------------------------- jobs

async function refreshJobs() {
  const j = await api("/v1/admin/jobs");
  fill("jobs-stats", ...Object.entries(j.queued || {}).map(([q, n]) => el("div", {class: "stat"}, el("b", {}, n),
    `queued in ${q}`)), ...j.submitted.map((s) => el("div", {class: "stat"}, el("b", {}, s.count),
    `submitted ${s.kind} on ${s.route}`)));
  $("jobs-note").textContent = (j.queued ? "" : "queue depths unavailable (broker unreachable). ") + j.listing;
  table("jobs-ended", ["id", "status", "owner", "model", "route", "attempts", "events"], j.ended.map((e) =>
    [e.id, e.status, e.owner || "", e.model || e.bill_model || "", e.route || "", e.attempts ?? "", e.events ?? ""]));
}
refreshJobs.live = true;

async function lookupJob() {
  try {
    const job = await api("/v1/admin/jobs/" + encodeURIComponent($("job-id").value.trim()));
    dl("job-detail", [["status", job.status], ["owner", job.owner], ["model", job.model], ["route", job.route],
      ["attempts", job.attempts], ["worker", job.worker]]);
    fill("job-events", ...job.events_list.map((e) => el("li", {}, `${e.seq} ${e.type}`)));
  } catch (e) {
    dl("job-detail", [["error", e.message]]);
    fill("job-events");
  }
}

// ------------------------------------------------------------------------------------------ start

function guarded(fn) {
  return () => fn().catch((e) => { $("pg-error").textContent = e.message; });
}

Object.assign(refreshers, {traffic: refreshTraffic, spend: refreshSpend, policy: refreshPolicy, jobs: refreshJobs});
for (const [k, fn] of Object.entries(refreshers)) {
  refreshers[k] = Object.assign(() => fn().catch((e) => console.warn(k, e)), {live: fn.live});
}
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
$("pg-plan").addEventListener("click", guarded(planPrompt));
$("pg-send").addEventListener("click", send);
$("job-lookup").addEventListener("click", lookupJob);
$("signout").addEventListener("click", () => {
  document.cookie = "concilium_admin=; Path=/; Max-Age=0; SameSite=Strict";
  location.reload();
});
loadModels();
