// The admin page: polls /api/admin/* and fills the tables. Model text and names are untrusted: textContent only.
"use strict";

(() => {
  const POLL_MS = 3000;
  const token = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);
  let openItem = null;

  async function api(path) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = `Bearer ${token}`;
    const response = await fetch(path, { headers, cache: "no-store" });
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new Error((data && data.detail) || `HTTP ${response.status}`);
    return data;
  }

  const fmt = {
    num: (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits)),
    pct: (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)} %`),
    time: (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–"),
  };

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = String(cell);
      tr.append(td);
    }
    return tr;
  }

  function fill(tableId, rows) {
    $(tableId).querySelector("tbody").replaceChildren(...rows.map(row));
  }

  function render(summary) {
    const progress = Object.fromEntries(summary.progress.map((p) => [p.round_idx, p]));
    fill("rounds", summary.team.rounds.map((r) => {
      const p = progress[r.round_idx] || {};
      return [r.round_idx, r.items ?? "–", p.complete_items ?? "–",
        p.needed_judgments ? `${p.judgments} / ${p.needed_judgments}` : r.judgments,
        r.alpha === null ? "–" : r.alpha.toFixed(3), r.disagreement_items];
    }));
    const shown = summary.team.rounds.find((r) => r.round_idx === summary.current_round)
      || summary.team.rounds[summary.team.rounds.length - 1];
    $("people-round").textContent = shown ? `(round ${shown.round_idx})` : "";
    fill("people", (shown ? shown.annotators : []).map((a) => [
      a.annotator, a.kind, a.items_judged, fmt.num(a.median_seconds), fmt.num(a.mean_seconds),
      fmt.pct(a.accept_rate), fmt.pct(a.none_fit_rate), a.corrections, fmt.time(a.last_activity)]));
    const rm = summary.reward_vs_people;
    $("reward").textContent = rm
      ? `precision ${fmt.pct(rm.precision)} · recall ${fmt.pct(rm.recall)} · accuracy ${fmt.pct(rm.accuracy)} `
        + `on ${rm.n} candidates of ${rm.items} items (tp ${rm.tp}, fp ${rm.fp}, fn ${rm.fn}, tn ${rm.tn})`
      : "No item was judged by both the reward model and people.";
    $("updated").textContent = `updated ${fmt.time(summary.generated_at)} · every ${POLL_MS / 1000} s`;
  }

  function renderDisagreements(data) {
    $("disagreements-round").textContent = data.round_idx === null ? "" : `(round ${data.round_idx})`;
    $("no-disagreements").hidden = data.items.length > 0;
    $("disagreements").replaceChildren(...data.items.map((item) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.itemId = String(item.item_id);
      button.textContent = `${item.question || item.example_id} — ${item.annotators.join(", ")}`
        + ` (${item.disputed_candidates} rationale${item.disputed_candidates === 1 ? "" : "s"} disputed)`;
      button.addEventListener("click", () => showItem(item.item_id));
      li.append(button);
      return li;
    }));
  }

  async function showItem(itemId) {
    try {
      const item = await api(`/api/admin/item/${itemId}`);
      openItem = itemId;
      $("detail-id").textContent = String(item.item_id);
      $("detail-question").textContent = item.question || item.prompt;
      $("detail-answer").textContent = item.answer;
      fill("detail-table", item.candidates.map((c) => [c.text, c.accepted_by.join(", ") || "–",
        c.rejected_by.join(", ") || "–"]));
      $("detail-notes").replaceChildren(...item.judgments.map((j) => {
        const li = document.createElement("li");
        const what = j.none_fit ? (j.correction ? `none fits, wrote: “${j.correction}”` : "none fits")
          : `accepted ${j.accepted_ids.length}`;
        li.textContent = `${j.annotator} (${j.kind}): ${what}; ${fmt.num(j.seconds)} s`;
        return li;
      }));
      $("detail").hidden = false;
    } catch (error) {
      $("updated").textContent = `Error: ${error.message}`;
    }
  }

  async function refresh() {
    try {
      render(await api("/api/admin/summary"));
      renderDisagreements(await api("/api/admin/disagreements"));
      if (openItem !== null) await showItem(openItem);
    } catch (error) {
      $("updated").textContent = `Error: ${error.message}`;
    } finally {
      setTimeout(refresh, POLL_MS);
    }
  }

  $("detail-close").addEventListener("click", () => { openItem = null; $("detail").hidden = true; });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { openItem = null; $("detail").hidden = true; }
  });
  refresh();
})();
