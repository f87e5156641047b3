// The HTML report's behaviour: fill each pass's before/after pictures from the graph templates,
// colour nodes by the pass's diff, show node details on hover, search by name.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const tip = document.getElementById("tip");

  function nodeName(g) { const t = g.querySelector(":scope > title"); return t ? t.textContent : ""; }

  const markup = {};
  function graphMarkup(index) {  // pictures are gzip-compressed base64 text, unpacked once
    if (!markup[index]) {
      const packed = atob(document.getElementById("graph-" + index).textContent);
      const bytes = Uint8Array.from(packed, (c) => c.charCodeAt(0));
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
      markup[index] = new Response(stream).text();
    }
    return markup[index];
  }

  async function fill(section) {
    if (section.dataset.filled) return;
    section.dataset.filled = "1";
    const view = data.views[section.dataset.view];
    for (const side of ["before", "after"]) {
      const holder = section.querySelector(".side." + side + " .pictures");
      if (!holder) continue;
      const graph = side === "before" ? view.before : view.after;
      holder.insertAdjacentHTML("beforeend", await graphMarkup(graph));
      holder.dataset.graph = graph;
      const status = side === "before" ? view.before_status : view.after_status;
      for (const g of holder.querySelectorAll("g.node")) {
        const name = nodeName(g);
        g.dataset.node = name;
        const s = status[name];
        if (s) g.classList.add(s);
        if (view.declines[name]) g.classList.add("declined");
        if (side === "after" && view.channels[name]) g.classList.add("pruned");
      }
      for (const g of holder.querySelectorAll("g.group")) {
        g.addEventListener("click", () => {
          const label = nodeName(g).replace(/^group:/, "");
          for (const d of holder.querySelectorAll("details.group")) {
            if (d.dataset.group === label) { d.open = true; d.scrollIntoView({block: "nearest"}); }
          }
        });
      }
    }
  }

  function describe(g) {
    const holder = g.closest(".pictures");
    const section = g.closest(".pass");
    const info = data.graphs[holder.dataset.graph][g.dataset.node];
    const view = data.views[section.dataset.view];
    if (!info) return g.dataset.node;
    const lines = [g.dataset.node, "op:         " + info.op + " (" + info.kind + ")",
      "shape:      " + (info.shape ? info.shape.join("x") : "unknown"), "dtype:      " + (info.dtype || "unknown"),
      "provenance: " + info.provenance];
    if (info.precision) lines.push("precision:  " + info.precision);
    if (info.fusion) lines.push("fused into: " + info.fusion);
    const side = holder.closest(".side").classList.contains("before") ? "before" : "after";
    const status = (side === "before" ? view.before_status : view.after_status)[g.dataset.node];
    if (status) lines.push("this pass:  " + status + (view.changed[g.dataset.node] ? " (" + view.changed[g.dataset.node].join(", ") + ")" : ""));
    const ch = view.channels[g.dataset.node];
    if (ch && side === "after") lines.push("channels:   " + ch[1] + " kept of " + ch[0] + " (" + (ch[0] - ch[1]) + " removed)");
    for (const reason of view.declines[g.dataset.node] || []) lines.push("declined:   " + reason);
    const recorded = data.history[view["history_" + side]];
    const error = recorded && recorded.nodes[info.provenance];
    if (error) lines.push("vs original: " + error + " (value of " + info.provenance + ", " + recorded.label + ")");
    lines.push("pass error: " + view.error + " (outputs, whole graph)");
    return lines.join("\n");
  }

  document.addEventListener("mouseover", (e) => {
    const g = e.target.closest && e.target.closest("g.node");
    if (!g || !g.closest(".pictures")) { tip.style.display = "none"; return; }
    tip.textContent = describe(g);
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", (e) => {
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(e.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
  });

  const search = document.getElementById("search");
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    let count = 0, first = null;
    for (const g of document.querySelectorAll(".pictures g.node")) {
      const info = data.graphs[g.closest(".pictures").dataset.graph][g.dataset.node];
      const hit = q && (g.dataset.node.toLowerCase().includes(q) || (info && info.provenance.toLowerCase().includes(q)));
      g.classList.toggle("hit", !!hit);
      if (hit) { count++; if (!first) first = g; }
    }
    document.getElementById("hits").textContent = q ? count + " match(es)" : "";
    if (first) {
      const d = first.closest("details.group");
      if (d) d.open = true;
      first.scrollIntoView({block: "center", inline: "center"});
    }
  });

  const sections = document.querySelectorAll(".pass[data-view]");
  const eager = data.total_nodes <= data.eager_nodes || location.hash === "#all";
  const filling = [];
  for (const s of sections) {
    if (eager || s.open) filling.push(fill(s));
    s.addEventListener("toggle", () => { if (s.open) fill(s); });
  }
  Promise.all(filling).then(() => { document.body.dataset.ready = "1"; });
})();
