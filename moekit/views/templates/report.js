"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const GATE_COLOUR = "#2166ac";

function mix(hex, strength) {
  // hex mixed with white; returns [css colour, whether dark text still reads on it]
  const s = Math.min(Math.max(strength, 0), 1);
  const rgb = [1, 3, 5].map(i => Math.round(255 + (parseInt(hex.slice(i, i + 2), 16) - 255) * s));
  const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140;
  return ["rgb(" + rgb.join(", ") + ")", light];
}

function paint(span, hex, strength) {
  const [colour, light] = mix(hex, strength);
  span.style.backgroundColor = colour;
  span.style.color = light ? "#111" : "#fff";
}

function topOf(text, pos, router) {
  // [expert index, probability] of the selected router, or the all-router dominant expert from the analysis
  if (router === "all") return DATA.dominant[text][pos];
  const r = DATA.routes[text][router];
  const expert = r.e[pos][0];
  return [expert, r.p[pos][expert]];
}

function colourTokens() {
  const select = document.getElementById("router-select");
  const router = select.value === "all" ? "all" : Number(select.value);
  for (const span of document.querySelectorAll("span.tok")) {
    const [expert, probability] = topOf(Number(span.dataset.text), Number(span.dataset.pos), router);
    paint(span, DATA.colours[expert], 0.15 + 0.75 * probability);
  }
  for (const row of document.querySelectorAll("g.row[data-router]")) {
    row.classList.toggle("selected", String(router) === row.dataset.router);
  }
}

function colourGates() {
  const key = Number(document.getElementById("gate-select").value);
  for (const span of document.querySelectorAll("span.gtok")) {
    const [mean] = DATA.gates[Number(span.dataset.text)][key][Number(span.dataset.pos)];
    paint(span, GATE_COLOUR, 0.05 + 0.85 * (mean ?? 0));
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function routingDetails(tip, text, pos) {
  const selected = document.getElementById("router-select").value;
  const [dominant, probability] = DATA.dominant[text][pos];
  const table = document.createElement("table");
  DATA.routers.forEach((router, i) => {
    const r = DATA.routes[text][i];
    const row = table.insertRow();
    if (String(i) === selected) row.className = "selected";
    cell(row, router.label);
    cell(row, r.e[pos].map((e, k) => DATA.experts[e] + " " + r.w[pos][k].toFixed(2)).join("  ·  "));
  });
  const summary = document.createElement("div");
  summary.textContent = "all routers: " + DATA.experts[dominant] + " (mean p " + probability.toFixed(2) + ")";
  tip.append(table, summary);
}

function gateDetails(tip, text, pos) {
  const chosen = DATA.gateKeys[Number(document.getElementById("gate-select").value)];
  const table = document.createElement("table");
  DATA.gateKeys.forEach((key, k) => {
    if (key.stitch !== chosen.stitch) return;
    const [mean, std] = DATA.gates[text][k][pos];
    const row = table.insertRow();
    if (key === chosen) row.className = "selected";
    cell(row, "stitch " + key.stitch + " · " + key.stream);
    cell(row, mean === null ? "–" : mean.toFixed(3) + " ± " + (std ?? 0).toFixed(3));
  });
  tip.append(table);
}

function showTip(event) {
  const span = event.target.closest("span.tok, span.gtok");
  const tip = document.getElementById("tooltip");
  if (!span) { tip.hidden = true; return; }
  const text = Number(span.dataset.text), pos = Number(span.dataset.pos);
  const head = document.createElement("div");
  head.className = "head";
  const label = DATA.texts[text].label;
  head.textContent = JSON.stringify(span.textContent) + " · position " + pos + (label === null ? "" : " · " + label);
  tip.replaceChildren(head);
  (span.classList.contains("tok") ? routingDetails : gateDetails)(tip, text, pos);
  tip.hidden = false;
  const box = tip.getBoundingClientRect();
  tip.style.left = Math.max(4, Math.min(event.clientX + 12, window.innerWidth - box.width - 8)) + "px";
  tip.style.top = (event.clientY + 16 + box.height > window.innerHeight ? event.clientY - box.height - 10
                                                                       : event.clientY + 16) + "px";
}

const routerSelect = document.getElementById("router-select");
if (routerSelect) {
  routerSelect.addEventListener("change", colourTokens);
  for (const row of document.querySelectorAll("g.row[data-router]")) {
    row.addEventListener("click", () => { routerSelect.value = row.dataset.router; colourTokens(); });
  }
  colourTokens();
}
const gateSelect = document.getElementById("gate-select");
if (gateSelect) {
  gateSelect.addEventListener("change", colourGates);
  colourGates();
}
document.addEventListener("mouseover", showTip);
