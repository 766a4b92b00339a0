// clawnode dashboard: plain JS, no dependencies. Every value from the API is rendered with
// textContent or setAttribute (never as markup); the token lives in sessionStorage only and
// travels in the Authorization header, never in a URL.
"use strict";

const TOKEN_KEY = "clawnode.api-token";
const POLL_MS = 2000;
const last = {}; // section -> the data it was last rendered from
let timer = null;

// ---------- helpers ----------

function $(id) { return document.getElementById(id); }

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

// Integers beyond 2^53 (wei amounts) become BigInt, so no amount is ever rounded.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

function toJson(value) {
  return JSON.stringify(value, (k, v) => (typeof v === "bigint" ? "__bigint__" + v.toString() : v))
    .replace(/"__bigint__(-?\d+)"/g, "$1");
}

function big(value) {
  if (typeof value === "bigint") return value;
  if (value === null || value === undefined || value === "") return 0n;
  return BigInt(value);
}

const WEI_PER_ETH = 10n ** 18n;

// 350000000000 -> "0.000000350 ETH" (nine decimals, as `clawnode ledger` prints); below 10^9: "… wei".
function eth(value) {
  let wei = big(value);
  if (wei === 0n) return "0 ETH";
  const sign = wei < 0n ? "-" : "";
  if (wei < 0n) wei = -wei;
  if (wei < 10n ** 9n) return `${sign}${wei.toLocaleString("en-US")} wei`; // too small for nine decimals
  const whole = wei / WEI_PER_ETH;
  const frac = (wei % WEI_PER_ETH).toString().padStart(18, "0").slice(0, 9);
  return `${sign}${whole.toLocaleString("en-US")}.${frac} ETH`;
}

function amountCell(value) {
  return h("td", { class: "num", "data-wei": big(value).toString(), title: `${big(value).toString()} wei`, text: eth(value) });
}

function short(id) {
  const text = String(id ?? "");
  return text.length > 16 ? `${text.slice(0, 8)}…${text.slice(-6)}` : text;
}

function idCell(id) { return h("td", { class: "id", title: id ?? "", text: short(id) }); }

function when(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const date = new Date(Number(seconds) * 1000);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).tBodies[0];
  const children = rows.length
    ? rows
    : [h("tr", {}, h("td", { class: "empty", colspan: columns, text: emptyText }))];
  body.replaceChildren(...children);
}

// Render a section only when its data changed: polling does not reset what the page shows.
function changed(section, data) {
  const text = toJson(data);
  if (last[section] === text) return false;
  last[section] = text;
  return true;
}

// ---------- the API ----------

class Unauthorized extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: { Authorization: `Bearer ${token()}` }, cache: "no-store" };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = toJson(options.body);
  }
  const reply = await fetch(path, init);
  const text = await reply.text();
  let body = null;
  try { body = text ? parseJson(text) : null; } catch (_) { body = null; }
  if (reply.status === 401) throw new Unauthorized();
  return { status: reply.status, ok: reply.ok, body };
}

function errorText(reply) {
  const error = reply.body && reply.body.error;
  return error ? `${error.message} (${error.code})` : `the node answered ${reply.status}`;
}

// ---------- sections ----------

function renderOverview(status, caps, summary) {
  if (status) {
    $("peer-id").textContent = status.peer_id;
    $("connected-peers").textContent = String(status.connected_peers);
    // How others reach this node, and why: the AutoNAT verdict, UPnP, relays, hole punches.
    const reason = status.reachability_reason ? ` (${status.reachability_reason})` : "";
    $("reached-by").textContent = `${status.reached_by || "not known yet"}${reason}`;
    const parts = [];
    if (status.upnp) {
      const mapped = status.upnp.mappings.map((m) => `${m.proto} ${m.external_port}`).join(", ");
      parts.push(`UPnP ${status.upnp.state}${mapped ? `: ${mapped}` : ""}`);
    }
    parts.push(`${status.relay_reservations.length} relay reservation(s)`);
    if (status.hole_punch && status.hole_punch.enabled) {
      parts.push(`hole punches: ${status.hole_punch.direct} direct, ${status.hole_punch.failed} failed`);
    }
    $("nat-traversal").textContent = parts.join("; ");
  }
  if (caps) {
    const record = caps.record;
    $("reachability").textContent = record ? record.reachability : "not published yet";
    $("offers-count").textContent = String(caps.offers.length);
    $("capabilities-list").textContent = caps.offers.map((offer) => offer.name).join(", ");
  }
  if (summary) {
    for (const key of ["income", "spend", "net"]) {
      const node = $(key);
      node.textContent = eth(summary.total[key]);
      node.setAttribute("data-wei", big(summary.total[key]).toString());
      node.setAttribute("title", `${big(summary.total[key]).toString()} wei`);
    }
    const escrow = summary.escrow;
    $("escrow-state").textContent = `${escrow.mode}, ${escrow.state}`;
    if (changed("chart", summary.by_day)) renderChart(summary.by_day);
  }
}

function renderChart(days) {
  const box = $("chart");
  if (!days.length) {
    box.replaceChildren(h("p", { class: "muted", text: "No money has moved yet: the chart fills in as leases settle." }));
    return;
  }
  const width = 640, height = 180, left = 8, right = 8, top = 16, bottom = 28;
  const values = days.flatMap((d) => [big(d.income), big(d.spend), big(d.net) < 0n ? -big(d.net) : big(d.net)]);
  const max = values.reduce((a, b) => (b > a ? b : a), 1n);
  const scale = (v) => (Number(big(v)) / Number(max)) * (height - top - bottom);
  const slot = (width - left - right) / days.length;
  const bar = Math.max(2, Math.min(28, slot / 3));
  const base = height - bottom;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  chart.append(svg("title", {}, "Income (green) and spend (red) per day, net as a line"));
  chart.append(svg("line", { class: "axis", x1: left, y1: base, x2: width - right, y2: base }));
  const points = [];
  days.forEach((day, i) => {
    const x = left + i * slot + slot / 2;
    const inc = scale(day.income), spd = scale(day.spend);
    const a = svg("rect", { class: "income", x: x - bar, y: base - inc, width: bar, height: inc });
    a.append(svg("title", {}, `${day.key} income ${eth(day.income)}`));
    const b = svg("rect", { class: "spend", x, y: base - spd, width: bar, height: spd });
    b.append(svg("title", {}, `${day.key} spend ${eth(day.spend)}`));
    chart.append(a, b);
    const mid = base - (height - top - bottom) / 2;
    points.push(`${x},${mid - scale(day.net) / 2}`);
    if (days.length <= 10 || i === 0 || i === days.length - 1) {
      chart.append(svg("text", { x, y: height - 10, "text-anchor": "middle" }, day.key));
    }
  });
  if (points.length > 1) chart.append(svg("polyline", { class: "net", points: points.join(" ") }));
  chart.append(svg("text", { x: left, y: 11 }, `max ${eth(max)}`));
  box.replaceChildren(chart);
}

function renderOffers(caps) {
  const table = $("offers-table");
  if (table.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
  if (!changed("offers", caps.offers)) return;
  const rows = caps.offers.map((offer) => {
    const input = h("input", {
      class: "price-input", inputmode: "numeric", "aria-label": `price of ${offer.name}`, value: big(offer.price_per_unit).toString(),
    });
    const save = h("button", { type: "button", class: "save-price", text: "Change price" });
    save.addEventListener("click", () => changePrice(offer, input.value));
    const remove = h("button", { type: "button", class: "unpublish danger", text: "Unpublish" });
    remove.addEventListener("click", () => unpublish(offer.name));
    return h("tr", { "data-offer": offer.name },
      h("td", { class: "id", text: offer.name }),
      h("td", { text: offer.unit }),
      h("td", {}, input, " ", save),
      h("td", { text: offer.summary }),
      h("td", {}, remove));
  });
  fillTable("offers-table", rows, 5, "Nothing offered: publish a capability below.");
}

function offersMessage(text, isError) {
  const node = $("offers-message");
  node.textContent = text;
  node.className = isError ? "error" : "muted";
}

async function putOffer(offer, done) {
  try {
    const reply = await api(`/api/offers/${encodeURIComponent(offer.name)}`, { method: "PUT", body: offer });
    if (!reply.ok) return offersMessage(errorText(reply), true);
    delete last.offers;
    offersMessage(done, false);
    if (document.activeElement) document.activeElement.blur();
    renderOffers(reply.body);
    renderOverview(null, reply.body, null);
  } catch (error) { handle(error); }
}

function changePrice(offer, text) {
  if (!/^\d+$/.test(text.trim())) return offersMessage("A price is a whole number of wei.", true);
  putOffer({ ...offer, price_per_unit: BigInt(text.trim()) }, `The price of ${offer.name} is now ${text.trim()} wei per ${offer.unit}.`);
}

async function unpublish(name) {
  if (!window.confirm(`Stop offering ${name}?`)) return;
  try {
    const reply = await api(`/api/offers/${encodeURIComponent(name)}`, { method: "DELETE" });
    if (!reply.ok) return offersMessage(errorText(reply), true);
    delete last.offers;
    offersMessage(`${name} is no longer offered.`, false);
    renderOffers(reply.body);
    renderOverview(null, reply.body, null);
  } catch (error) { handle(error); }
}

function publish(event) {
  event.preventDefault();
  const price = $("pub-price").value.trim();
  if (!/^\d+$/.test(price)) return offersMessage("A price is a whole number of wei.", true);
  const offer = { name: $("pub-name").value.trim(), unit: $("pub-unit").value, price_per_unit: BigInt(price), summary: $("pub-summary").value };
  putOffer(offer, `${offer.name} is published.`).then(() => $("publish-form").reset());
}

// Which peer holds which layers of a split model this node runs, and the layer leases it serves.
function renderLayers(status) {
  if (!status) return;
  const seats = status.split_models || [];
  const served = status.layer_leases || [];
  if (!changed("layers", [seats, served])) return;
  const rows = [
    ...seats.map((seat) => h("tr", {},
      h("td", { class: "id", text: seat.lease_id }),
      h("td", { text: "consumer" }),
      h("td", { text: seat.model }),
      h("td", { class: "id", text: `…${seat.peer}` }),
      h("td", { text: seat.layers }),
      h("td", { class: "num", text: String(seat.tokens) }),
      h("td", { class: "state", text: seat.state }))),
    ...served.map((lease) => h("tr", {},
      h("td", { class: "id", text: lease.lease_id }),
      h("td", { text: "seller" }),
      h("td", { text: "" }),
      h("td", { class: "id", text: `…${lease.consumer}` }),
      h("td", { text: `${lease.tunnels} tunnel(s)` }),
      h("td", { class: "num", text: String(lease.tokens) }),
      h("td", { class: "state", text: lease.state }))),
  ];
  fillTable("layers-table", rows, 7, "No split model runs here and no layer lease is served.");
}

function renderLeases(live, history) {
  if (live && changed("leases", live.leases)) {
    fillTable("leases-table", live.leases.map((lease) => h("tr", { "data-lease-id": lease.lease_id },
      idCell(lease.lease_id),
      h("td", { text: lease.role }),
      h("td", { class: "id", text: lease.capability }),
      idCell(lease.role === "consumer" ? lease.provider : lease.consumer),
      h("td", { class: "state", text: lease.state }),
      h("td", { class: "num", text: String(lease.units) }),
      amountCell(lease.budget),
      h("td", { text: lease.mode === "postpaid" ? "post-paid (trusted)" : "escrow" }),
      h("td", { text: when(lease.expires_at) }))), 9, "No leases since this node started.");
  }
  if (history && changed("ledger-leases", history.leases)) {
    fillTable("ledger-leases-table", history.leases.map((lease) => h("tr", { "data-lease-id": lease.lease_id },
      idCell(lease.lease_id),
      h("td", { text: lease.role }),
      idCell(lease.role === "provider" ? lease.consumer : lease.provider),
      h("td", { class: "state", text: lease.state }),
      h("td", { class: "num", text: String(lease.metered_units) }),
      amountCell(lease.price_per_unit),
      amountCell(lease.settled_amount),
      amountCell(lease.refunded_amount),
      h("td", { text: when(lease.created_at) }))), 9, "The ledger holds no lease yet.");
  }
}

function renderVerification(checks) {
  if (!checks || !changed("verification", checks.providers)) return;
  fillTable("verification-table", Object.entries(checks.providers).map(([peer, v]) => h("tr", { "data-peer": peer },
    idCell(peer),
    h("td", { class: "num", text: String(v.passed) }),
    h("td", { class: "num", text: String(v.failed) }),
    h("td", { class: "num", text: String(v.unverifiable) }),
    h("td", { class: "state", text: v.failed ? `FAILED (${v.last_reason})` : "" }),
    h("td", { class: "num", text: v.standing.toFixed(2) }))), 6, "This node has checked no provider yet.");
}

function renderLedger(summary, receipts, settlements) {
  if (summary && changed("summary", [summary.leases, summary.receipts, summary.settlement_queue, summary.by_peer])) {
    $("ledger-leases-count").textContent = String(summary.leases);
    $("ledger-receipts-count").textContent = String(summary.receipts);
    const queue = summary.settlement_queue;
    $("settlement-queue").textContent = queue.length
      ? `${queue.length} (the oldest has waited ${queue.oldest_age_s} s)`
      : "none";
    fillTable("by-peer-table", summary.by_peer.map((row) => h("tr", {},
      idCell(row.key), amountCell(row.income), amountCell(row.spend), amountCell(row.net))), 4, "No money has moved yet.");
  }
  if (receipts && changed("receipts", receipts.receipts)) {
    fillTable("receipts-table", receipts.receipts.map((r) => h("tr", {},
      idCell(r.lease_id),
      h("td", { class: "num", text: String(r.seq) }),
      h("td", { class: "num", text: String(r.units) }),
      amountCell(r.amount),
      h("td", { text: r.countersigned ? "yes" : "no" }),
      h("td", { text: r.settled ? "yes" : "no" }),
      h("td", { text: when(r.recorded_at) }))), 7, "No receipts yet.");
  }
  if (settlements && changed("settlements", settlements.settlements)) {
    fillTable("settlements-table", settlements.settlements.map((s) => h("tr", { "data-settlement-state": s.state },
      h("td", { text: s.kind }),
      idCell(s.lease_id || ""),
      amountCell(s.amount),
      h("td", { class: "state", text: s.state }),
      h("td", { class: "num", text: String(s.attempts) }),
      h("td", { text: s.last_error || "" }),
      h("td", { text: when(s.created_at) }))), 7, "No settlements yet.");
  }
}

// A party may dispute once there is something to dispute: a rejected result, or one awaiting review.
function canDispute(task) {
  const party = task.role === "creator" || task.role === "awarded_bidder";
  const delivered = task.result_state === "result_rejected" || task.result_state === "result_submitted";
  return party && delivered && !task.dispute_state;
}

function canAddEvidence(task) {
  return (task.role === "creator" || task.role === "awarded_bidder") && task.dispute_state === "dispute_open";
}

function evidenceRow(task) {
  const evidence = Array.isArray(task.evidence) ? task.evidence : [];
  if (!evidence.length && !canAddEvidence(task)) return null;
  const from = (peer) => (peer === task.creator ? "creator" : peer === task.awarded_bidder ? "bidder" : short(peer));
  const items = evidence.map((e) => h("li", { "data-evidence-id": e.evidence_id },
    h("span", { class: "muted", text: `${from(e.submitted_by)}, ${when(e.submitted_at)}: ` }),
    h("span", { class: "evidence-text", text: e.note }),
    e.size ? " " : null,
    e.size ? h("button", { type: "button", class: "secondary download-evidence", text: `attachment (${e.size} bytes)`,
      onclick: () => downloadEvidence(task.task_id, e.evidence_id) }) : null));
  let form = null;
  if (canAddEvidence(task)) {
    const note = h("textarea", { class: "evidence-note", rows: 2, maxlength: 2000, placeholder: "what the arbiter should know", "aria-label": "evidence note" });
    const file = h("input", { type: "file", class: "evidence-file", "aria-label": "evidence attachment" });
    const button = h("button", { type: "button", class: "add-evidence", text: "Add evidence",
      onclick: () => addEvidence(task.task_id, note.value, file.files && file.files[0]) });
    form = h("div", { class: "evidence-form" }, note, " ", file, " ", button);
  }
  return h("tr", { class: "evidence-row", "data-evidence-for": task.task_id },
    h("td", { colspan: 9 }, h("strong", { text: `Evidence (${evidence.length})` }),
      items.length ? h("ul", { class: "evidence-list" }, ...items) : null, form));
}

// A sandboxed task's kind and limits, and the seller's metered run once it delivered.
function sandboxRun(task) {
  if (!task.kind) return "";
  const limits = task.limits ? ` (fuel ≤ ${task.limits.fuel}, ${Math.round(task.limits.memory_bytes / 1048576)} MiB, ${task.limits.wall_s} s)` : "";
  const run = task.run ? `; ran: fuel ${task.run.fuel_used}, ${task.run.outcome}` : "";
  return ` · ${task.kind}${limits}${run}${panelVotes(task)}`;
}

// A task's arbiter panel: m of k, and each member's vote once the dispute reached it.
function panelVotes(task) {
  if (!task.panel) return "";
  const votes = Object.entries(task.panel_votes || {}).map(([peer, split]) =>
    `${peer.slice(-6)}: ${split === null ? "abstained" : split}`);
  const state = task.panel_state && task.panel_state !== "open" ? ` ${task.panel_state}` : "";
  return `; panel ${task.panel.threshold} of ${task.panel.members.length}${state}${votes.length ? ` (${votes.join(", ")})` : ""}`;
}

function renderTasks(tasks) {
  const table = $("tasks-table");
  const typing = table.contains(document.activeElement) && ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (typing || !changed("tasks", tasks.tasks)) return;
  const message = $("tasks-message");
  if (message.className === "error") message.textContent = "";  // the task moved on: an old error no longer applies
  fillTable("tasks-table", tasks.tasks.flatMap((task) => {
    let action = "";
    if (canDispute(task)) {
      const reason = h("input", { class: "dispute-reason", placeholder: "what went wrong", maxlength: 500, "aria-label": "dispute reason" });
      const button = h("button", { type: "button", class: "open-dispute danger", text: "Open a dispute" });
      button.addEventListener("click", () => dispute(task.task_id, reason.value));
      action = h("div", {}, reason, " ", button);
    }
    const row = h("tr", { "data-task-id": task.task_id },
      idCell(task.task_id),
      h("td", { text: task.role }),
      h("td", { class: "id", text: task.capability || "" }),
      h("td", { text: task.summary }),
      amountCell(task.budget),
      h("td", { class: "state", text: task.state }),
      h("td", { text: (task.result_state || "") + sandboxRun(task) }),
      h("td", { text: (task.dispute_state || "") + (task.run_verdict ? ` · re-run: ${task.run_verdict}` : "") }),
      h("td", {}, action));
    const evidence = evidenceRow(task);
    return evidence ? [row, evidence] : [row];
  }), 9, "No tasks: publish or watch tasks with `clawnode task`.");
}

function tasksMessage(ok, text) {
  const message = $("tasks-message");
  message.className = ok ? "muted" : "error";
  message.textContent = text;
}

async function dispute(taskId, reason) {
  if (!reason.trim()) { tasksMessage(false, "Say what went wrong: the arbiter reads it."); return; }
  try {
    const reply = await api(`/api/tasks/${encodeURIComponent(taskId)}/dispute`, { method: "POST", body: { reason: reason.trim() } });
    tasksMessage(reply.ok, reply.ok ? `Dispute opened on task ${short(taskId)}.` : errorText(reply));
    if (document.activeElement) document.activeElement.blur();
    delete last.tasks;
  } catch (error) { handle(error); }
}

const MAX_ATTACHMENT = 64 * 1024;

function base64Of(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function addEvidence(taskId, note, file) {
  if (!note.trim() && !file) { tasksMessage(false, "Write a note or attach a file: the arbiter reads it."); return; }
  if (file && file.size > MAX_ATTACHMENT) { tasksMessage(false, `Attachments are at most ${MAX_ATTACHMENT} bytes.`); return; }
  try {
    const attachment = file ? base64Of(await file.arrayBuffer()) : "";
    const body = { note: note.trim(), attachment_b64: attachment };
    const reply = await api(`/api/tasks/${encodeURIComponent(taskId)}/evidence`, { method: "POST", body });
    tasksMessage(reply.ok, reply.ok ? `Evidence sent to the arbiter of task ${short(taskId)}.` : errorText(reply));
    if (document.activeElement) document.activeElement.blur();
    delete last.tasks;
  } catch (error) { handle(error); }
}

async function downloadEvidence(taskId, evidenceId) {
  try {
    const reply = await api(`/api/tasks/${encodeURIComponent(taskId)}/evidence/${encodeURIComponent(evidenceId)}`);
    if (!reply.ok) { tasksMessage(false, errorText(reply)); return; }
    const bytes = Uint8Array.from(atob(reply.body.attachment_b64), (c) => c.charCodeAt(0));
    const link = h("a", { href: URL.createObjectURL(new Blob([bytes])), download: `evidence-${evidenceId.slice(0, 12)}.bin` });
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) { handle(error); }
}

function renderAlerts(reply) {
  const note = $("alerts-note");
  const badge = $("alerts-badge");
  if (reply.status === 404) {
    if (changed("alerts", "absent")) {
      $("alerts-list").replaceChildren();
      note.textContent = "This node does not report alerts yet.";
      badge.hidden = true;
    }
    return;
  }
  if (!reply.ok || !reply.body) { note.textContent = `Alerts could not be read: ${errorText(reply)}`; return; }
  const alerts = Array.isArray(reply.body.alerts) ? reply.body.alerts : [];
  if (!changed("alerts", alerts)) return;
  const firing = alerts.filter((a) => String(a.state) === "firing");
  badge.hidden = firing.length === 0;
  badge.textContent = String(firing.length);
  note.textContent = alerts.length ? "" : "All clear: nothing needs your attention.";
  $("alerts-list").replaceChildren(...alerts.map((a) => h("li", { class: `${a.severity || ""} ${a.state || ""}`, "data-alert": a.name },
    h("strong", { text: a.name }), " ",
    h("span", { class: "state", text: `${a.severity || ""} · ${a.state || ""}` }), " ",
    h("span", { text: a.summary || "" }), " ",
    h("span", { class: "muted", text: a.since ? `since ${typeof a.since === "number" ? when(a.since) : a.since}` : "" }))));
}

// ---------- the loop ----------

async function refresh() {
  try {
    const paths = ["/api/status", "/api/capabilities", "/api/ledger/summary", "/api/leases", "/api/ledger/leases",
      "/api/ledger/receipts", "/api/ledger/settlements", "/api/tasks", "/api/alerts", "/api/verification"];
    const [status, caps, summary, leases, history, receipts, settlements, tasks, alerts, checks] =
      await Promise.all(paths.map((path) => api(path)));
    const body = (reply) => (reply.ok ? reply.body : null);
    renderOverview(body(status), body(caps), body(summary));
    if (caps.ok) renderOffers(caps.body);
    renderLeases(body(leases), body(history));
    renderLayers(body(status));
    renderVerification(body(checks));
    renderLedger(body(summary), body(receipts), body(settlements));
    if (tasks.ok) renderTasks(tasks.body);
    renderAlerts(alerts);
    const failed = [status, caps, summary, leases].filter((reply) => !reply.ok);
    $("status-line").textContent = failed.length
      ? `Some figures could not be read: ${errorText(failed[0])}`
      : `Updated ${new Date().toLocaleTimeString()}`;
    document.body.setAttribute("data-refreshed", String(Date.now()));
  } catch (error) {
    if (!handle(error)) $("status-line").textContent = "The node does not answer; retrying…";
  }
  if (token()) timer = setTimeout(refresh, POLL_MS);
}

function handle(error) {
  if (error instanceof Unauthorized) {
    signOut("That token was not accepted: paste the current one from api.token.");
    return true;
  }
  return false;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer) clearTimeout(timer);
  timer = null;
  for (const key of Object.keys(last)) delete last[key];
  $("app").hidden = true;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").value = "";
  $("token-input").focus();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  $("logout").hidden = false;
  if (timer) clearTimeout(timer);
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    start();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("publish-form").addEventListener("submit", publish);
  if (token()) start();
  else signOut("");
});
