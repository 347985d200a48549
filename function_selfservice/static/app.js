/* BC Contact Sync: the self-service page (issue 13).
 *
 * Signs the person in with MSAL for the browser (authorization code + PKCE, redirect), asks for an
 * access token for this app's API (scope access_as_user) and calls /api/signed-in/... with it. The
 * page never holds a function key; what a person may do is decided by the API, the page only hides
 * what would be refused (the Admin tab). English and Norwegian (bokmål), chosen from the browser.
 */
"use strict";

const FILTER_FIELDS = ["displayName", "companyName", "companyNumber", "number", "searchName",
  "jobTitle", "city", "state", "postalCode", "country"];
const WRITES = ["outlookCreated", "outlookUpdated", "outlookDeleted", "outlookRecreated", "bcCreated", "bcUpdated"];
const POLL_MS = 1000;

const TEXT = {
  en: {
    title: "Contact sync", language: "Language", signIn: "Sign in", signOut: "Sign out",
    welcome: "Set up your own contact sync",
    welcomeText: "Sign in with your work account to choose your Outlook folder and filters, check the connection and run a sync.",
    tabSettings: "My sync", tabCheck: "Check connection", tabRun: "Run", tabHistory: "My recent runs", tabAdmin: "Admin",
    mailbox: "Mailbox", folderName: "Outlook folder", useDefaultFolder: "Use my default Contacts folder (the one my phone shows) instead", category: "Outlook category (empty: none)", filters: "Filters (Business Central syntax)",
    filterHelpTitle: "How to write a filter", helpOr: "starts with Contoso, or is Fabrikam", helpNot: "anything but Oslo",
    helpCase: "ignore upper and lower case", helpRange: "from 1000 to 1999", helpBlank: "blank",
    helpQuote: "quoted text is taken literally", switches: "What the sync may do",
    pullNew: "Bring new Outlook contacts into Business Central",
    pullEdits: "Take edits made in Outlook back to Business Central",
    remove: "Remove from Outlook what leaves Business Central or the filter",
    photos: "Copy contact pictures between Business Central and Outlook",
    save: "Save", saved: "Saved.", created: "Your sync is set up.", checkNow: "Check now", ok: "ok",
    syncNow: "Sync now", fullSync: "Full sync", dryRun: "Dry run", report: "Report", filterItems: "Filter the list",
    itemsCaption: "Contacts in this run", colAction: "Action", colName: "Contact", colEmail: "Email", colReason: "Reason",
    chartCaption: "Writes (bars) and duration in seconds (line) per run, oldest first",
    chartScale: "(top of the chart: {writes} writes, {seconds} s)",
    colStarted: "Started", colMode: "Mode", colStatus: "Status", colWrites: "Writes", colSeconds: "Seconds",
    colUser: "User", colEnabled: "Enabled", colLastRun: "Last run", colFailed: "Failed", colActions: "Actions",
    enable: "Enable", disable: "Disable", yes: "yes", no: "no", never: "never",
    loading: "Loading…", signingIn: "Signing in…", noSettings: "You have no sync yet: fill in the form and save to set it up.",
    queued: "Queued…", running: "Running…", finished: "Finished",
    summary: "{status}: {mode}{dry}, started {started}.", dryNote: " (dry run: nothing was written)",
    noRuns: "No runs yet.", needSettings: "Save your settings first.", error: "Something went wrong: {message}",
    filterLabel: "Filter on {field}", modes: { incremental: "sync", full: "full sync" },
    fields: { displayName: "Name", companyName: "Company name", companyNumber: "Company no.", number: "Contact no.",
      searchName: "Search name", jobTitle: "Job title", city: "City", state: "County/state", postalCode: "Postal code", country: "Country/region" },
    checks: { graphToken: "Sign-in to Microsoft Graph", bcToken: "Sign-in to Business Central", mailbox: "Mailbox",
      contactsPermission: "Permission to write contacts", categoryPermission: "Permission to add the Outlook category", bcCompany: "Business Central company", bcWrite: "Permission to write Business Central contacts",
      bcFields: "Business Central contact fields", bcWebhooks: "Business Central change notifications" },
    actions: { failed: "failed", skipped: "skipped", outlookCreated: "created in Outlook", outlookUpdated: "updated in Outlook",
      outlookDeleted: "removed from Outlook", outlookRecreated: "recreated in Outlook", bcCreated: "created in BC",
      bcUpdated: "updated in BC", linked: "linked", unlinked: "unlinked", released: "kept as your own, no longer synced", note: "note", safetyStop: "stopped for safety" },
  },
  nb: {
    title: "Kontaktsynkronisering", language: "Språk", signIn: "Logg på", signOut: "Logg av",
    welcome: "Sett opp din egen kontaktsynkronisering",
    welcomeText: "Logg på med jobbkontoen din for å velge Outlook-mappe og filtre, sjekke tilkoblingen og kjøre en synkronisering.",
    tabSettings: "Min synkronisering", tabCheck: "Sjekk tilkoblingen", tabRun: "Kjør", tabHistory: "Mine siste kjøringer", tabAdmin: "Administrasjon",
    mailbox: "Postboks", folderName: "Outlook-mappe", useDefaultFolder: "Bruk standardmappen Kontakter (den telefonen viser) i stedet", category: "Outlook-kategori (tom: ingen)", filters: "Filtre (Business Central-syntaks)",
    filterHelpTitle: "Slik skriver du et filter", helpOr: "begynner med Contoso, eller er Fabrikam", helpNot: "alt unntatt Oslo",
    helpCase: "skiller ikke mellom store og små bokstaver", helpRange: "fra 1000 til 1999", helpBlank: "tom",
    helpQuote: "tekst i anførselstegn tas bokstavelig", switches: "Hva synkroniseringen kan gjøre",
    pullNew: "Ta nye Outlook-kontakter inn i Business Central",
    pullEdits: "Ta endringer gjort i Outlook tilbake til Business Central",
    remove: "Fjern fra Outlook det som forsvinner fra Business Central eller filteret",
    photos: "Kopier kontaktbilder mellom Business Central og Outlook",
    save: "Lagre", saved: "Lagret.", created: "Synkroniseringen din er satt opp.", checkNow: "Sjekk nå", ok: "ok",
    syncNow: "Synkroniser nå", fullSync: "Full synkronisering", dryRun: "Prøvekjøring", report: "Rapport", filterItems: "Filtrer listen",
    itemsCaption: "Kontakter i denne kjøringen", colAction: "Handling", colName: "Kontakt", colEmail: "E-post", colReason: "Årsak",
    chartCaption: "Skrivinger (stolper) og varighet i sekunder (linje) per kjøring, eldste først",
    chartScale: "(toppen av diagrammet: {writes} skrivinger, {seconds} s)",
    colStarted: "Startet", colMode: "Type", colStatus: "Status", colWrites: "Skrivinger", colSeconds: "Sekunder",
    colUser: "Bruker", colEnabled: "Aktiv", colLastRun: "Siste kjøring", colFailed: "Feilet", colActions: "Handlinger",
    enable: "Aktiver", disable: "Deaktiver", yes: "ja", no: "nei", never: "aldri",
    loading: "Laster…", signingIn: "Logger på…", noSettings: "Du har ingen synkronisering ennå: fyll ut skjemaet og lagre for å sette den opp.",
    queued: "I kø…", running: "Kjører…", finished: "Ferdig",
    summary: "{status}: {mode}{dry}, startet {started}.", dryNote: " (prøvekjøring: ingenting ble skrevet)",
    noRuns: "Ingen kjøringer ennå.", needSettings: "Lagre innstillingene først.", error: "Noe gikk galt: {message}",
    filterLabel: "Filter på {field}", modes: { incremental: "synkronisering", full: "full synkronisering" },
    fields: { displayName: "Navn", companyName: "Firmanavn", companyNumber: "Firmanr.", number: "Kontaktnr.",
      searchName: "Søkenavn", jobTitle: "Stilling", city: "Poststed", state: "Fylke/delstat", postalCode: "Postnummer", country: "Land/område" },
    checks: { graphToken: "Pålogging til Microsoft Graph", bcToken: "Pålogging til Business Central", mailbox: "Postboks",
      contactsPermission: "Tillatelse til å skrive kontakter", categoryPermission: "Tillatelse til å legge til Outlook-kategorien", bcCompany: "Business Central-selskap", bcWrite: "Tillatelse til å skrive Business Central-kontakter",
      bcFields: "Business Central-kontaktfelt", bcWebhooks: "Varsler om endringer fra Business Central" },
    actions: { failed: "feilet", skipped: "hoppet over", outlookCreated: "opprettet i Outlook", outlookUpdated: "oppdatert i Outlook",
      outlookDeleted: "fjernet fra Outlook", outlookRecreated: "gjenopprettet i Outlook", bcCreated: "opprettet i BC",
      bcUpdated: "oppdatert i BC", linked: "koblet", unlinked: "frakoblet", released: "beholdt som din egen, ikke lenger synkronisert", note: "merknad", safetyStop: "stoppet av sikkerhetshensyn" },
  },
};

const state = { lang: "en", msal: null, account: null, config: null, me: null, settings: null, report: null };
const $ = (id) => document.getElementById(id);

function pickLanguage() {
  const saved = localStorage.getItem("lang");
  if (saved && TEXT[saved]) return saved;
  const wanted = (navigator.languages || [navigator.language || "en"]).map((l) => l.toLowerCase());
  return wanted.some((l) => l.startsWith("nb") || l.startsWith("no") || l.startsWith("nn")) ? "nb" : "en";
}

function t(key, values) {
  let text = key.split(".").reduce((o, k) => (o ? o[k] : undefined), TEXT[state.lang]);
  if (text === undefined) text = key.split(".").reduce((o, k) => (o ? o[k] : undefined), TEXT.en) || key;
  return String(text).replace(/\{(\w+)\}/g, (_, name) => (values && name in values ? values[name] : ""));
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "nb" ? "nb" : "en";
  $("lang").value = state.lang;
  document.title = t("title");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  buildFilterFields();
  if (state.report) showReport(state.report);
}

function setStatus(text) { $("status").textContent = text || ""; }

// Sign-in ------------------------------------------------------------------------------------------
async function startMsal() {
  state.config = await (await fetch("selfservice/config.json")).json();
  const redirectUri = window.location.origin + window.location.pathname;
  state.msal = await msal.PublicClientApplication.createPublicClientApplication({
    auth: {
      clientId: state.config.clientId,
      authority: state.config.authority,
      // A host other than Microsoft's clouds must be named as known, or MSAL refuses the authority.
      knownAuthorities: [state.config.knownAuthority],
      redirectUri,
      postLogoutRedirectUri: redirectUri,
      navigateToLoginRequestUrl: false,
    },
    cache: { cacheLocation: "sessionStorage" },
  });
  const result = await state.msal.handleRedirectPromise();
  if (result && result.account) state.msal.setActiveAccount(result.account);
  state.account = state.msal.getActiveAccount() || state.msal.getAllAccounts()[0] || null;
}

async function token() {
  const request = { scopes: [state.config.scope], account: state.account };
  try {
    return (await state.msal.acquireTokenSilent(request)).accessToken;
  } catch (e) {
    if (e instanceof msal.InteractionRequiredAuthError) {
      await state.msal.acquireTokenRedirect(request);
    }
    throw e;
  }
}

// API ----------------------------------------------------------------------------------------------
function apiBase() {
  return window.location.pathname.replace(/selfservice\/?$/, "signed-in");
}

async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${await token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(`${apiBase()}/${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  return { status: resp.status, data };
}

function enc(user) { return encodeURIComponent(user); }

// My sync ------------------------------------------------------------------------------------------
function buildFilterFields() {
  const box = $("filter-fields");
  const values = {};
  for (const f of FILTER_FIELDS) { const el = $(`filter-${f}`); if (el) values[f] = el.value; }
  box.textContent = "";
  for (const f of FILTER_FIELDS) {
    const row = document.createElement("div");
    row.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `filter-${f}`;
    label.textContent = t(`fields.${f}`);
    const input = document.createElement("input");
    input.id = `filter-${f}`;
    input.type = "text";
    input.autocomplete = "off";
    input.setAttribute("aria-describedby", `err-${f}`);
    input.value = values[f] || "";
    const err = document.createElement("p");
    err.className = "error";
    err.id = `err-${f}`;
    err.setAttribute("role", "alert");
    row.append(label, input, err);
    box.append(row);
  }
  if (state.settings && !Object.keys(values).length) fillSettings(state.settings);
}

function fillSettings(s) {
  $("mailbox").value = s.user;
  $("folderName").value = s.folderName || "";
  $("useDefaultFolder").checked = s.folderName === null;
  $("folderName").disabled = s.folderName === null;
  $("category").value = s.category || "";
  $("category").disabled = !!s.companies;  // each company of `companies` names its own (BEHAVIOUR §5.4)
  for (const f of FILTER_FIELDS) $(`filter-${f}`).value = (s.filter || {})[f] || "";
  for (const k of ["pullNewFromOutlook", "pullEditsFromOutlook", "removeFromOutlook", "syncPhotos"]) $(k).checked = !!s[k];
}

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showFieldError(name, message) {
  const field = name.startsWith("filter.") ? name.slice("filter.".length) : name;  // the API names filter.city
  const target = $(`err-${field}`) ? field : "form";
  $(`err-${target}`).textContent = message;
  const input = target === "form" ? null : ($(`filter-${field}`) || $(field));
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

async function saveSettings(event) {
  event.preventDefault();
  clearErrors();
  $("saved").textContent = "";
  const user = $("mailbox").value;
  const filter = {};
  for (const f of FILTER_FIELDS) { const v = $(`filter-${f}`).value.trim(); if (v) filter[f] = v; }
  const category = $("category").value.trim();
  // folderName null: the default Contacts folder; category "" means none (BEHAVIOUR §5).
  const body = { folderName: $("useDefaultFolder").checked ? null : $("folderName").value, category: category || null, filter };
  for (const k of ["pullNewFromOutlook", "pullEditsFromOutlook", "removeFromOutlook", "syncPhotos"]) body[k] = $(k).checked;
  const { status, data } = await call("PUT", `users/${enc(user)}`, body);
  if (status === 200 || status === 201) {
    state.settings = data;
    state.me.user = data.user;
    $("saved").textContent = status === 201 ? t("created") : t("saved");
    $("hint").textContent = "";
    $("mailbox").readOnly = true;
    return;
  }
  const err = (data && data.error) || {};
  showFieldError(err.field || "form", err.message || `HTTP ${status}`);
}

// Check connection ---------------------------------------------------------------------------------
async function checkConnection() {
  const list = $("checks");
  list.textContent = "";
  if (!state.me.user) { setStatus(t("needSettings")); return; }
  setStatus(t("loading"));
  const { status, data } = await call("POST", `users/${enc(state.me.user)}/validate`);
  setStatus("");
  if (status !== 200) { setStatus(t("error", { message: (data && data.error && data.error.message) || status })); return; }
  for (const c of data.checks || []) {
    const li = document.createElement("li");
    li.className = c.ok ? "ok" : "bad";
    const name = document.createElement("strong");
    name.textContent = t(`checks.${c.name}`) === `checks.${c.name}` ? c.name : t(`checks.${c.name}`);
    const msg = document.createElement("span");
    msg.textContent = c.ok ? ` ${t("ok")}` : ` ${c.message}`;
    li.append(name, msg);
    list.append(li);
  }
}

// Run ----------------------------------------------------------------------------------------------
async function runSync(event) {
  const button = event.currentTarget;
  if (!state.me.user) { $("progress").textContent = t("needSettings"); return; }
  for (const b of document.querySelectorAll(".run")) b.disabled = true;
  $("report").hidden = true;
  $("progress").textContent = t("running");
  try {
    const body = { user: state.me.user, mode: button.dataset.mode, dryRun: button.dataset.dry === "1" };
    let { status, data } = await call("POST", "sync", body);
    while (status === 202) {
      $("progress").textContent = data.status === "queued" ? t("queued") : t("running");
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      ({ status, data } = await call("GET", `sync/runs/${data.runId}`));
    }
    if (status !== 200) throw new Error((data && data.error && data.error.message) || `HTTP ${status}`);
    $("progress").textContent = t("finished");
    state.report = data;
    showReport(data);
  } catch (e) {
    $("progress").textContent = t("error", { message: e.message });
  } finally {
    for (const b of document.querySelectorAll(".run")) b.disabled = false;
  }
}

function showReport(r) {
  $("report").hidden = false;
  $("report-summary").textContent = t("summary", {
    status: r.status, mode: t(`modes.${r.mode}`), dry: r.dryRun ? t("dryNote") : "", started: new Date(r.startedAt).toLocaleString(state.lang),
  }) + (r.message ? ` ${r.message}` : "");
  const counts = $("counts");
  counts.textContent = "";
  for (const [k, v] of Object.entries(r.counts || {})) {
    // One group per count, so a label and its number stay together however the grid wraps.
    const group = document.createElement("div");
    const dt = document.createElement("dt"); dt.textContent = t(`actions.${k}`);
    const dd = document.createElement("dd"); dd.textContent = v;
    dd.dataset.count = k;
    group.append(dt, dd);
    counts.append(group);
  }
  renderItems();
}

function renderItems() {
  const r = state.report;
  const needle = $("item-filter").value.trim().toLowerCase();
  const rank = (a) => (a === "failed" ? 0 : a === "skipped" ? 1 : 2);
  const items = [...(r.items || [])].sort((a, b) => rank(a.action) - rank(b.action));
  const body = $("items").tBodies[0];
  body.textContent = "";
  for (const i of items) {
    // People know contacts by name and email; ids mean nothing to them and are never shown.
    const cells = [t(`actions.${i.action}`), i.name || "", i.email || "", i.reason || ""];
    if (needle && !cells.join(" ").toLowerCase().includes(needle)) continue;
    const tr = document.createElement("tr");
    tr.className = i.action;
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
    body.append(tr);
  }
}

// History ------------------------------------------------------------------------------------------
function writesOf(run) { return WRITES.reduce((n, k) => n + ((run.counts || {})[k] || 0), 0); }
function secondsOf(run) {
  return run.finishedAt ? Math.max(0, (Date.parse(run.finishedAt) - Date.parse(run.startedAt)) / 1000) : 0;
}

async function loadHistory() {
  const body = $("runs").tBodies[0];
  body.textContent = "";
  $("chart").textContent = "";
  if (!state.me.user) { setStatus(t("needSettings")); return; }
  const { status, data } = await call("GET", `users/${enc(state.me.user)}/runs`);
  if (status !== 200) { setStatus(t("error", { message: (data && data.error && data.error.message) || status })); return; }
  const runs = data.runs || [];
  if (!runs.length) {
    const tr = document.createElement("tr"); const td = document.createElement("td");
    td.colSpan = 5; td.textContent = t("noRuns"); tr.append(td); body.append(tr);
  }
  for (const run of runs) {
    const tr = document.createElement("tr");
    const cells = [new Date(run.startedAt).toLocaleString(state.lang), t(`modes.${run.mode}`) + (run.dryRun ? ` (${t("dryRun")})` : ""),
      run.status, writesOf(run), secondsOf(run).toFixed(1)];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
    body.append(tr);
  }
  drawChart([...runs].reverse());
}

function drawChart(runs) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  $("chart-scale").textContent = "";
  if (!runs.length) return;
  const W = 320, H = 120, pad = 4;
  const maxW = Math.max(1, ...runs.map(writesOf));
  const maxS = Math.max(0.001, ...runs.map(secondsOf));
  const step = (W - 2 * pad) / runs.length;
  $("chart-scale").textContent = t("chartScale", { writes: maxW, seconds: maxS.toFixed(1) });
  const points = [];
  runs.forEach((run, i) => {
    const h = (writesOf(run) / maxW) * (H - 2 * pad);
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", String(pad + i * step + step * 0.15));
    rect.setAttribute("y", String(H - pad - h));
    rect.setAttribute("width", String(step * 0.7));
    rect.setAttribute("height", String(h));
    rect.setAttribute("class", `bar ${run.status}`);
    const title = document.createElementNS(ns, "title");
    title.textContent = `${writesOf(run)} ${t("colWrites").toLowerCase()}, ${secondsOf(run).toFixed(1)} s`;
    rect.append(title);
    svg.append(rect);
    points.push(`${pad + i * step + step / 2},${H - pad - (secondsOf(run) / maxS) * (H - 2 * pad)}`);
  });
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("class", "duration");
  svg.append(line);
}

// Admin --------------------------------------------------------------------------------------------
async function loadAdmin() {
  const body = $("users").tBodies[0];
  body.textContent = "";
  const { status, data } = await call("GET", "users");
  if (status !== 200) { setStatus(t("error", { message: (data && data.error && data.error.message) || status })); return; }
  for (const u of data.users) {
    const tr = document.createElement("tr");
    tr.dataset.user = u.user;
    const last = u.lastRun;
    const cells = [u.user, u.enabled ? t("yes") : t("no"),
      last ? `${last.status}${last.finishedAt ? ", " + new Date(last.finishedAt).toLocaleString(state.lang) : ""}` : t("never"),
      last ? last.failed : ""];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = u.enabled ? t("disable") : t("enable");
    button.setAttribute("aria-label", `${button.textContent} ${u.user}`);
    button.addEventListener("click", async () => {
      const settings = { ...u };
      delete settings.lastRun;
      settings.enabled = !u.enabled;
      const answer = await call("PUT", `users/${enc(u.user)}`, settings);
      if (answer.status !== 200) setStatus(t("error", { message: (answer.data && answer.data.error && answer.data.error.message) || answer.status }));
      await loadAdmin();
    });
    td.append(button);
    tr.append(td);
    body.append(tr);
  }
}

// Tabs and start -----------------------------------------------------------------------------------
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.setAttribute("aria-current", b.dataset.tab === name ? "page" : "false");
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `panel-${name}`;
  setStatus("");
  if (name === "history") loadHistory();
  if (name === "admin") loadAdmin();
}

async function loadMe() {
  const { status, data } = await call("GET", "me");
  if (status !== 200) throw new Error((data && data.error && data.error.message) || `HTTP ${status}`);
  state.me = data;
  $("who").textContent = data.name || data.username;
  document.querySelector('[data-tab="admin"]').hidden = !data.isAdmin;
  if (data.user) {
    const answer = await call("GET", `users/${enc(data.user)}`);
    if (answer.status === 200) { state.settings = answer.data; fillSettings(answer.data); }
  } else {
    $("mailbox").value = data.username;
    $("mailbox").readOnly = false;
    $("folderName").value = "Business Central";
    $("category").value = "Business Central";
    $("pullNewFromOutlook").checked = true;
    $("removeFromOutlook").checked = true;
    $("syncPhotos").checked = true;
    $("hint").textContent = t("noSettings");
  }
}

async function start() {
  state.lang = pickLanguage();
  applyLanguage();
  $("lang").addEventListener("change", () => { state.lang = $("lang").value; localStorage.setItem("lang", state.lang); applyLanguage(); });
  $("sign-in").addEventListener("click", () => state.msal.loginRedirect({ scopes: [state.config.scope] }));
  $("sign-out").addEventListener("click", () => state.msal.logoutRedirect({ account: state.account }));
  $("settings-form").addEventListener("submit", saveSettings);
  $("useDefaultFolder").addEventListener("change", () => { $("folderName").disabled = $("useDefaultFolder").checked; });
  $("check").addEventListener("click", checkConnection);
  for (const b of document.querySelectorAll(".run")) b.addEventListener("click", runSync);
  $("item-filter").addEventListener("input", renderItems);
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  setStatus(t("signingIn"));
  try {
    await startMsal();
    if (!state.account) { setStatus(""); $("signed-out").hidden = false; return; }
    $("sign-out").hidden = false;
    $("tabs").hidden = false;
    await loadMe();
    showTab("settings");
    document.body.dataset.ready = "true";
  } catch (e) {
    setStatus(t("error", { message: e.message || String(e) }));
  }
}

document.addEventListener("DOMContentLoaded", start);
