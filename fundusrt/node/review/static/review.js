// The review page's behaviour: the worklist refreshed by polling, the study view told when its study
// changes, local times, and the sign-off form's reason check. Patient data goes into the DOM as text only.
"use strict";

const DECISION_CLASS = { refer: "decision-refer", no_refer: "decision-no_refer", ungradable: "decision-ungradable" };

function localTime(epoch) {
  return new Date(epoch * 1000).toLocaleString();
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function isToday(epoch) {
  const d = new Date(epoch * 1000), now = new Date();
  return d.getFullYear() === now.getFullYear() && d.getMonth() === now.getMonth() && d.getDate() === now.getDate();
}

function finalDecision(study) {
  // the grader's word, once given, is what a referable filter means
  if (study.signoff) {
    return Object.values(study.signoff.eyes).some((e) => e.decision === "refer") ? "refer" : "other";
  }
  return study.decision;
}

function matches(study, filters) {
  if (filters.has("today") && !isToday(study.arrived)) return false;
  if (filters.has("referable") && finalDecision(study) !== "refer") return false;
  if (filters.has("failed") && study.status !== "failed") return false;
  if (filters.has("unsigned") && study.signoff) return false;
  return true;
}

function signoffText(s) {
  if (!s) return "";
  const eyes = Object.values(s.eyes).map((e) => `${e.eye_name}: ${e.action}${e.action === "overridden" ? " → " + e.decision_label : ""}`);
  return `${s.overridden ? "overridden" : "confirmed"} by ${s.grader}, ${localTime(s.signed)} (${eyes.join("; ")})${s.delivered ? "" : " · not yet delivered"}`;
}

function renderWorklist(studies) {
  const body = document.getElementById("studies");
  const filters = new Set([...document.querySelectorAll("[data-filter]")].filter((c) => c.checked).map((c) => c.dataset.filter));
  const rows = [];
  for (const study of studies) {
    if (!matches(study, filters)) continue;
    const tr = document.createElement("tr");
    tr.className = "study";
    tr.dataset.study = study.study_uid;
    tr.dataset.status = study.status;
    cell(tr, localTime(study.arrived));
    const name = cell(tr, "");
    const link = document.createElement("a");
    link.href = study.url;
    link.textContent = study.patient_name || "(no name)";
    name.appendChild(link);
    cell(tr, study.patient_id);
    cell(tr, String(study.images));
    const status = cell(tr, study.status, "status status-" + study.status);
    if (study.reason) status.title = study.reason;
    if (study.status === "failed" && study.reason) {
      const why = document.createElement("div");
      why.className = "muted small";
      why.textContent = study.reason;
      status.appendChild(why);
    }
    cell(tr, study.decision_label || "—", DECISION_CLASS[study.decision] || "");
    cell(tr, signoffText(study.signoff), study.signoff ? "signed" : "muted");
    tr.addEventListener("click", (event) => { if (event.target.tagName !== "A") window.location = study.url; });
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  document.getElementById("empty").hidden = rows.length > 0;
}

function startWorklist(section) {
  let latest = [];
  const live = document.getElementById("live");
  async function poll() {
    try {
      const response = await fetch("/api/studies", { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.status === 401) { window.location = "/login"; return; }
      latest = (await response.json()).studies;
      renderWorklist(latest);
      live.textContent = "live · updated " + new Date().toLocaleTimeString();
      live.classList.remove("error");
    } catch (err) {
      live.textContent = "cannot reach the node; retrying";
      live.classList.add("error");
    }
  }
  for (const box of document.querySelectorAll("[data-filter]")) box.addEventListener("change", () => renderWorklist(latest));
  poll();
  setInterval(poll, Number(section.dataset.poll) || 2000);
}

function startStudy(section) {
  const uid = section.dataset.study;
  const form = document.getElementById("signoff-form");
  let dirty = false;
  if (form) {
    form.addEventListener("input", (event) => {
      dirty = true;
      if (event.target.setCustomValidity) event.target.setCustomValidity("");  // typed a reason: ask no more
    });
    form.addEventListener("submit", (event) => {
      // an override needs a reason: say so before the round trip (the server checks it too)
      for (const fieldset of form.querySelectorAll("fieldset")) {
        const select = fieldset.querySelector("select"), reason = fieldset.querySelector("input");
        if (select.value !== fieldset.dataset.ai && !reason.value.trim()) {
          event.preventDefault();
          reason.setCustomValidity("Say why you override the AI's decision.");
          reason.reportValidity();
          return;
        }
        reason.setCustomValidity("");
      }
    });
  }
  async function poll() {
    try {
      const response = await fetch("/api/studies/" + encodeURIComponent(uid), { credentials: "same-origin" });
      if (!response.ok) return;
      const study = await response.json();
      const changed = study.status !== section.dataset.status || String(study.updated) !== section.dataset.updated
        || String(study.signoffs) !== section.dataset.signoffs;
      if (!changed) return;
      if (dirty) document.getElementById("changed").hidden = false;  // never throw away what the grader typed
      else window.location.replace("/study/" + encodeURIComponent(uid));
    } catch (err) { /* the node may be restarting; try again */ }
  }
  setInterval(poll, 2000);
}

function startZoom() {
  // click: the full-resolution image in place, scrollable; click again: back to the fitted one
  for (const link of document.querySelectorAll("a.zoom")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      const img = link.querySelector("img"), figure = link.closest("figure");
      const zoomed = figure.classList.toggle("zoomed");
      img.src = zoomed ? link.href : link.href.replace("?size=full", "");
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll("[data-epoch]")) el.textContent = localTime(Number(el.dataset.epoch));
  const worklist = document.getElementById("worklist");
  if (worklist) startWorklist(worklist);
  const study = document.getElementById("study");
  if (study) { startStudy(study); startZoom(); }
});
