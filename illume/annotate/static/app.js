// The annotation page: plain JS, no build step.
// Everything the model wrote (question, answer, rationales) is untrusted: it is only ever put into the
// page with textContent, so HTML or <script> in it stays inert text.
"use strict";

(() => {
  const NAME_KEY = "illume.annotator";
  const POLL_MS = 8000;            // how often an empty page asks for work again
  const RETRIES = 3;               // network retries of one submission (same client_token: stored once)

  const $ = (id) => document.getElementById(id);
  const el = {
    main: $("main"), empty: $("empty"), emptyTitle: $("empty-title"), emptyMessage: $("empty-message"),
    image: $("image"), imageButton: $("image-button"), noImage: $("no-image"),
    question: $("question"), answer: $("answer"), candidates: $("candidates"), noneFit: $("none-fit"),
    submit: $("submit"), submitLabel: $("submit-label"), back: $("back"), status: $("status"),
    guidelines: $("guidelines"), reviewBanner: $("review-banner"), reviewPosition: $("review-position"),
    lightbox: $("lightbox"), lightboxImage: $("lightbox-image"), help: $("help"), helpClose: $("help-close"),
    helpButton: $("help-button"), nameDialog: $("name-dialog"), nameForm: $("name-form"),
    nameInput: $("name-input"), annotatorName: $("annotator-name"), changeName: $("change-name"),
    roundLabel: $("round-label"), adminLink: $("admin-link"), correctionHint: $("correction-hint"),
    correctionBox: $("correction-box"), correctionInput: $("correction-input"),
    conflict: $("conflict"), conflictStored: $("conflict-stored"), conflictKeep: $("conflict-keep"),
  };

  const token = new URLSearchParams(location.search).get("token");
  const state = {
    annotator: loadName(),
    config: null,
    current: null,     // the view of the item leased to this annotator (kept while going back)
    history: [],       // this annotator's judged items of the round, newest first (from /api/history)
    historyStale: true,
    historyRequest: null,
    reviewIndex: -1,   // -1: showing `current`; else the history entry being changed
    view: null,        // what is on screen: `current` or a view of a history entry
    busy: false,       // a submission is in flight
    pollTimer: null,
    heartbeatTimer: null,
  };

  // ------------------------------------------------------------------ helpers

  function loadName() {
    try { return localStorage.getItem(NAME_KEY) || ""; } catch (_) { return ""; }
  }

  function saveName(name) {
    try { localStorage.setItem(NAME_KEY, name); } catch (_) { /* private mode: kept for this tab only */ }
  }

  // crypto.randomUUID exists only in secure contexts (https, localhost); a --host page may be plain http.
  function newToken() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function withToken(url) {
    if (!token) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  class ApiError extends Error {
    constructor(status, message, body) { super(message); this.status = status; this.body = body; }
  }

  function reason(body, status) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => (d && d.msg ? String(d.msg).replace(/^Value error, /, "") : String(d))).join("; ");
    }
    return `HTTP ${status}`;
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
    });
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) throw new ApiError(response.status, reason(data, response.status), data);
    return data;
  }

  // Network failures (server restarting, wifi) are retried with the same body and client_token, so a
  // submission that did reach the server is still stored once.
  async function apiWithRetry(method, path, body) {
    let lastError = null;
    for (let attempt = 0; attempt <= RETRIES; attempt++) {
      try {
        return await api(method, path, body);
      } catch (error) {
        if (error instanceof ApiError && error.status < 500) throw error;
        lastError = error;
        if (attempt < RETRIES) {
          setStatus(`Server not reachable, retrying (${attempt + 1}/${RETRIES})…`, "warn");
          await new Promise((resolve) => setTimeout(resolve, 600 * 2 ** attempt));
        }
      }
    }
    throw lastError;
  }

  function setStatus(text, kind) {
    el.status.textContent = text;
    el.status.className = "status" + (kind ? ` status-${kind}` : "");
  }

  function fail(error) {
    if (error instanceof ApiError && error.status === 401) {
      setStatus(`Not let in: ${error.message}`, "error");
    } else {
      setStatus(`Error: ${error.message || error}`, "error");
    }
  }

  // ------------------------------------------------------------------ time spent

  function startClock(view) {
    view.runningSince = document.visibilityState === "visible" ? performance.now() : null;
  }

  function stopClock(view) {
    if (view && view.runningSince !== null) {
      view.elapsedMs += performance.now() - view.runningSince;
      view.runningSince = null;
    }
  }

  function secondsSpent(view) {
    const running = view.runningSince !== null ? performance.now() - view.runningSince : 0;
    return Math.round((view.elapsedMs + running) / 100) / 10;
  }

  document.addEventListener("visibilitychange", () => {
    if (!state.view) return;
    if (document.visibilityState === "visible") startClock(state.view);
    else stopClock(state.view);
  });

  // ------------------------------------------------------------------ views

  function makeView(item, mode, accepted, noneFit, correction) {
    return {
      mode,                                   // "new" (POST) or "review" (PUT)
      item,
      selected: new Set(accepted || []),
      lastTicked: null,                       // what "e" edits
      noneFit: Boolean(noneFit),
      correction: correction || null,         // the person's own rationale (annotate.corrections); null: none
      original: { accepted: [...(accepted || [])].sort(), noneFit: Boolean(noneFit), correction: correction || null },
      clientToken: newToken(),                // one per item shown: retries and double clicks reuse it
      conflict: null,                         // what is stored when this answer differed from it (409)
      elapsedMs: 0,
      runningSince: null,
    };
  }

  function show(view) {
    if (state.view && state.view !== view) stopClock(state.view);
    state.view = view;
    startClock(view);
    el.empty.hidden = true;
    el.main.hidden = false;
    const item = view.item;
    el.main.dataset.itemId = String(item.item_id);   // for tests and for people reporting a problem
    el.main.dataset.mode = view.mode;

    el.question.textContent = item.question;
    el.answer.textContent = item.answer;
    if (item.image_url) {
      const src = withToken(item.image_url);
      if (el.image.getAttribute("src") !== src) {
        el.image.classList.remove("pixelated");
        el.image.src = src;
      }
      el.imageButton.hidden = false;
      el.noImage.hidden = true;
    } else {
      el.image.removeAttribute("src");
      el.imageButton.hidden = true;
      el.noImage.hidden = false;
    }

    el.candidates.replaceChildren(...item.candidates.map((candidate, index) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "candidate";
      button.dataset.index = String(index);
      const key = document.createElement("kbd");
      key.textContent = index < 9 ? String(index + 1) : "·";
      const check = document.createElement("span");
      check.className = "check";
      check.setAttribute("aria-hidden", "true");
      const text = document.createElement("span");
      text.className = "candidate-text";
      text.textContent = candidate.text;          // untrusted model output: text only
      button.append(key, check, text);
      button.addEventListener("click", () => toggle(index));
      li.append(button);
      return li;
    }));
    if (!item.candidates.length) {
      const li = document.createElement("li");
      li.className = "no-candidates";
      li.textContent = "The model wrote no rationale for this item: choose “none fits”.";
      el.candidates.append(li);
    }

    const reviewing = view.mode === "review";
    el.reviewBanner.hidden = !reviewing;
    if (reviewing) {
      const back = state.reviewIndex + 1;
      el.reviewPosition.textContent = `${back} item${back === 1 ? "" : "s"} back`;
    }
    el.main.classList.toggle("reviewing", reviewing);
    renderConflict(view);
    renderSelection();
  }

  // A "new" answer to an item this person already answered otherwise (another tab, a reload): the server
  // kept the first (409) and sent it; the page shows it, and Enter replaces it through the revision (PUT).
  function renderConflict(view) {
    const stored = view.conflict;
    el.conflict.hidden = !stored;
    if (stored) el.conflictStored.textContent = describeStored(view.item, stored);
    el.submitLabel.textContent = view.mode === "review" ? "Save change"
      : stored ? "Replace saved answer" : "Submit & next";
  }

  // The stored answer in the page's own terms: the rationales' numbers as shown.
  function describeStored(item, stored) {
    if (stored.correction) return `none fits, with your rationale “${stored.correction}”`;
    if (stored.none_fit) return "none of these fits";
    const numbers = item.candidates.flatMap((c, i) => (stored.accepted.includes(c.id) ? [i + 1] : []));
    return `rationale${numbers.length === 1 ? "" : "s"} ${numbers.join(", ")} ticked`;
  }

  function keepStored() {
    const view = state.view;
    if (!view || !view.conflict || state.busy) return;
    view.conflict = null;
    renderConflict(view);
    setStatus("Kept your saved answer.", "ok");
    loadNext();
  }

  function renderSelection() {
    const view = state.view;
    for (const button of el.candidates.querySelectorAll("button.candidate")) {
      const candidate = view.item.candidates[Number(button.dataset.index)];
      const on = view.selected.has(candidate.id);
      button.classList.toggle("selected", on);
      button.setAttribute("aria-pressed", on ? "true" : "false");
    }
    el.noneFit.classList.toggle("selected", view.noneFit);
    el.noneFit.setAttribute("aria-pressed", view.noneFit ? "true" : "false");
    const writing = view.correction !== null;
    el.correctionBox.hidden = !writing;
    if (writing && el.correctionInput.value !== view.correction) el.correctionInput.value = view.correction;
    el.correctionHint.hidden = !(state.config && state.config.corrections) || writing;
    el.submit.disabled = state.busy;
  }

  // "c": write a rationale; "e": start from the last ticked candidate (else the first). Either is a "none
  // fits" that carries the text; ticking a candidate or Esc drops it.
  function openCorrection(edit) {
    const view = state.view;
    if (!view || state.busy || !(state.config && state.config.corrections)) return;
    let text = view.correction || "";
    if (edit) {
      const candidates = view.item.candidates;
      const ticked = candidates.find((c) => c.id === view.lastTicked) || candidates.find((c) => view.selected.has(c.id));
      text = (ticked || candidates[0] || { text: "" }).text.trim();
    }
    view.noneFit = true;
    view.selected.clear();
    view.correction = text;
    renderSelection();
    el.correctionInput.value = text;
    el.correctionInput.focus();
  }

  function closeCorrection() {
    const view = state.view;
    if (view) view.correction = null;
    el.correctionInput.blur();
    if (view) renderSelection();
  }

  function toggle(index) {
    const view = state.view;
    if (!view || state.busy) return;
    const candidate = view.item.candidates[index];
    if (!candidate) return;
    if (view.selected.has(candidate.id)) view.selected.delete(candidate.id);
    else { view.selected.add(candidate.id); view.lastTicked = candidate.id; }
    if (view.selected.size) { view.noneFit = false; view.correction = null; }
    renderSelection();
  }

  function toggleNoneFit() {
    const view = state.view;
    if (!view || state.busy) return;
    view.noneFit = !view.noneFit;
    if (view.noneFit) view.selected.clear();
    else view.correction = null;
    renderSelection();
  }

  function showEmpty(title, message) {
    if (state.view) stopClock(state.view);
    state.view = null;
    el.main.hidden = true;
    el.empty.hidden = false;
    el.emptyTitle.textContent = title;
    el.emptyMessage.textContent = message || "";
  }

  function setMeter(id, counts) {
    const meter = $(id);
    const judged = counts ? counts.judged : 0;
    const total = counts ? counts.total : 0;
    const share = total ? Math.min(1, judged / total) : 0;
    meter.querySelector(".meter-fill").style.width = `${(100 * share).toFixed(1)}%`;
    meter.querySelector(".meter-count").textContent = counts ? `${judged} / ${total}` : "–";
  }

  function setProgress(progress, roundIdx) {
    if (roundIdx !== undefined && roundIdx !== null) el.roundLabel.textContent = `Round ${roundIdx}`;
    if (!progress) return;
    setMeter("progress-mine", progress.mine);
    setMeter("progress-everyone", progress.everyone);
    setMeter("progress-round", progress.round);
  }

  // ------------------------------------------------------------------ server round trips

  async function loadNext() {
    clearTimeout(state.pollTimer);
    try {
      const data = await apiWithRetry("POST", "/api/next", { annotator: state.annotator });
      setProgress(data.progress, data.round_idx);
      state.reviewIndex = -1;
      state.historyStale = true;
      if (data.item) {
        const same = state.current && state.current.item.item_id === data.item.item_id;
        // With annotate.assist the reward model pre-checks its confident accepts; the person still decides.
        const prechecked = data.item.candidates.filter((c) => c.prechecked).map((c) => c.id);
        state.current = same ? state.current : makeView(data.item, "new", prechecked);
        show(state.current);
      } else {
        state.current = null;
        showEmpty(data.progress && data.progress.round.judged === data.progress.round.total
          ? "All done for now" : "Nothing to judge right now", data.message);
        state.pollTimer = setTimeout(loadNext, POLL_MS);
      }
    } catch (error) {
      fail(error);
      if (error instanceof ApiError && error.status === 401) {   // revoked while working: stop asking
        state.current = null;
        showEmpty("This link does not work", error.message);
        return;
      }
      showEmpty("Cannot reach the server", String(error.message || error));
      state.pollTimer = setTimeout(loadNext, POLL_MS);
    }
  }

  function unchanged(view) {
    const now = [...view.selected].sort();
    return view.noneFit === view.original.noneFit
      && (view.correction || null) === view.original.correction
      && now.length === view.original.accepted.length
      && now.every((id, i) => id === view.original.accepted[i]);
  }

  async function submit() {
    const view = state.view;
    if (!view || state.busy) return;
    if (!view.noneFit && view.selected.size === 0) {
      setStatus("Tick at least one rationale, or press 0 / n for “none fits”.", "warn");
      return;
    }
    if (view.correction !== null) view.correction = el.correctionInput.value.trim();
    if (view.correction === "") {
      setStatus("Write the rationale, or press Esc to discard it.", "warn");
      view.correction = "";
      return;
    }
    if (view.mode === "review" && unchanged(view)) {
      setStatus("Unchanged.", "");
      forward();
      return;
    }
    state.busy = true;
    el.submit.disabled = true;
    const body = {
      annotator: state.annotator,
      item_id: view.item.item_id,
      accepted: [...view.selected],
      none_fit: view.noneFit,
      seconds: secondsSpent(view),
      client_token: view.clientToken,
      shown_order: view.item.candidates.map((c) => c.id),
    };
    if (view.correction) body.correction = view.correction;
    try {
      const revise = view.mode === "review" || view.conflict !== null;
      const data = await apiWithRetry(revise ? "PUT" : "POST", "/api/judgment", body);
      setProgress(data.progress);
      const what = view.correction ? "your rationale" : view.noneFit ? "none fits" : `${view.selected.size} accepted`;
      if (view.conflict) {
        view.conflict = null;
        state.historyStale = true;
        setStatus(`Replaced your saved answer (${what}).`, "ok");
        await loadNext();
      } else if (view.mode === "review") {
        const entry = state.history[state.reviewIndex];
        entry.accepted = [...view.selected];
        entry.none_fit = view.noneFit;
        entry.correction = view.correction;
        setStatus(`Changed (${what}).`, "ok");
        forward();
      } else {
        setStatus(data.duplicate ? "Already saved — moving on." : `Saved (${what}, ${body.seconds} s).`, "ok");
        await loadNext();
      }
    } catch (error) {
      const stored = error instanceof ApiError && error.status === 409 && error.body && error.body.stored;
      if (stored && view.mode === "new") {
        view.conflict = stored;
        view.clientToken = newToken();   // the revision is a new request (its retries reuse this token)
        renderConflict(view);
        setStatus("Not saved: you already answered this item differently.", "warn");
      } else if (error instanceof ApiError && error.status === 409 && view.mode === "new") {
        setStatus(`Not saved: ${error.message}. Here is the next item.`, "warn");
        await loadNext();
      } else if (error instanceof ApiError) {
        fail(error);
      } else {
        setStatus("Could not reach the server; your choice is kept. Press Enter to try again.", "error");
      }
    } finally {
      state.busy = false;
      if (state.view) renderSelection();
    }
  }

  function reviewView(entry) {
    return makeView(entry, "review", entry.accepted, entry.none_fit, entry.correction);
  }

  // One request however fast Backspace is pressed; each press then goes one item further back.
  function loadHistory() {
    if (!state.historyRequest) {
      const query = state.me && state.me.name ? "" : `?annotator=${encodeURIComponent(state.annotator)}`;
      state.historyRequest = api("GET", `/api/history${query}`)
        .then((data) => { state.history = data.items; state.historyStale = false; })
        .finally(() => { state.historyRequest = null; });
    }
    return state.historyRequest;
  }

  async function back() {
    if (state.busy) return;
    try {
      if (state.reviewIndex === -1 && (state.historyStale || state.historyRequest)) await loadHistory();
      if (state.reviewIndex + 1 >= state.history.length) {
        setStatus(state.history.length ? "That is the first item you judged in this round."
          : "Nothing to go back to yet.", "warn");
        return;
      }
      state.reviewIndex += 1;
      show(reviewView(state.history[state.reviewIndex]));
      setStatus("", "");
    } catch (error) {
      fail(error);
    }
  }

  function forward() {
    state.reviewIndex -= 1;
    if (state.reviewIndex >= 0) show(reviewView(state.history[state.reviewIndex]));
    else leaveReview();
  }

  function leaveReview() {
    state.reviewIndex = -1;
    if (state.current) show(state.current);
    else loadNext();
  }

  // Keeps the item held while this page shows it; a page that went away lets the lease expire.
  async function heartbeat() {
    const current = state.current;
    if (!current || state.busy) return;
    try {
      const data = await api("POST", "/api/lease", { annotator: state.annotator, item_id: current.item.item_id });
      if (!data.held && state.current === current) {
        setStatus("This item went to someone else while the page was away; here is the next one.", "warn");
        state.current = null;
        if (state.reviewIndex === -1) loadNext();
      }
    } catch (_) { /* the next heartbeat or submission will tell */ }
  }

  // ------------------------------------------------------------------ overlays

  function openImage() {
    if (!state.view || !state.view.item.image_url) return;
    el.lightboxImage.src = el.image.src;
    el.lightboxImage.classList.toggle("pixelated", el.image.classList.contains("pixelated"));
    el.lightbox.hidden = false;
  }

  function closeOverlays() {
    el.lightbox.hidden = true;
    el.help.hidden = true;
  }

  function askName() {
    el.nameInput.value = state.annotator;
    el.nameDialog.hidden = false;
    el.nameInput.focus();
    el.nameInput.select();
  }

  function setName(name) {
    state.annotator = name;
    saveName(name);
    el.annotatorName.textContent = name;
    el.nameDialog.hidden = true;
    state.current = null;
    state.history = [];
    state.historyStale = true;
    state.reviewIndex = -1;
    loadNext();
  }

  // ------------------------------------------------------------------ keys

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (!el.nameDialog.hidden) return;                    // typing a name
    const key = event.key;
    if (event.target === el.correctionInput) {            // typing a rationale: only Enter and Esc act
      if (key === "Enter" && !event.shiftKey) { submit(); event.preventDefault(); }
      else if (key === "Escape") { closeCorrection(); event.preventDefault(); }
      return;
    }
    if (!el.help.hidden || !el.lightbox.hidden) {
      if (key === "Escape" || key === "?" || (key === "i" && !el.lightbox.hidden)) {
        closeOverlays();
        event.preventDefault();
      }
      return;
    }
    if (key === "?") { el.help.hidden = false; event.preventDefault(); return; }
    if (key === "Backspace") { back(); event.preventDefault(); return; }
    if (key === "Escape") {
      if (state.view && state.view.conflict) keepStored();
      else if (state.reviewIndex >= 0) leaveReview();
      event.preventDefault();
      return;
    }
    if (!state.view) return;
    if (/^[1-9]$/.test(key)) { toggle(Number(key) - 1); event.preventDefault(); return; }
    if (key === "0" || key === "n" || key === "N") { toggleNoneFit(); event.preventDefault(); return; }
    if (key === "c" || key === "e") { openCorrection(key === "e"); event.preventDefault(); return; }
    if (key === "Enter") { submit(); event.preventDefault(); return; }   // also stops a focused button's click
    if (key === "i") { openImage(); event.preventDefault(); }
  });

  // ------------------------------------------------------------------ wiring

  el.submit.addEventListener("click", submit);
  el.back.addEventListener("click", back);
  el.conflictKeep.addEventListener("click", keepStored);
  el.noneFit.addEventListener("click", toggleNoneFit);
  el.imageButton.addEventListener("click", openImage);
  el.lightbox.addEventListener("click", closeOverlays);
  el.helpButton.addEventListener("click", () => { el.help.hidden = false; });
  el.helpClose.addEventListener("click", closeOverlays);
  el.help.addEventListener("click", (event) => { if (event.target === el.help) closeOverlays(); });
  el.changeName.addEventListener("click", askName);
  el.nameForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    if (name) setName(name);
  });
  // Tiny images (the shapes world is 96 px) are blown up with crisp pixels rather than blurred.
  el.image.addEventListener("load", () => {
    el.image.classList.toggle("pixelated", el.image.naturalWidth > 0 && el.image.naturalWidth < 256);
  });
  el.image.addEventListener("error", () => setStatus("The image could not be loaded.", "warn"));

  async function start() {
    try {
      state.config = await api("GET", "/api/config");
      el.guidelines.textContent = state.config.guidelines;
      // With accounts the server knows who this is (from the link's token): no name to type or change.
      state.me = state.config.me || {};
      if (state.me.name) {
        state.annotator = state.me.name;
        el.changeName.hidden = true;
      }
      if (state.me.role === "admin") {
        el.adminLink.href = withToken("/admin");
        el.adminLink.hidden = false;
      }
      for (const row of document.querySelectorAll(".corrections-only")) row.hidden = !state.config.corrections;
      const leaseMs = 1000 * (state.config.lease_seconds || 300);
      state.heartbeatTimer = setInterval(heartbeat, Math.max(5000, Math.min(60000, leaseMs / 3)));
    } catch (error) {
      fail(error);
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        showEmpty("This link does not work", error.message);
        return;
      }
    }
    if (state.annotator) {
      el.annotatorName.textContent = state.annotator;
      loadNext();
    } else {
      askName();
    }
  }

  start();
})();
