/* menseg review: the index and case pages.
 *
 * Data arrive as scripts (data/index.js, data/<case>/case.js, data/<case>/<volume>.js) that call
 * menseg.index / menseg.caseMeta / menseg.volume, so the same pages work from `menseg review`'s
 * server and from a static folder opened from disk. Verdicts go to the server (PRED/review.csv);
 * in a static folder they stay in this browser and are downloaded as review.csv.
 */
"use strict";

window.menseg = (function () {
  const waiting = new Map();
  const enc = encodeURIComponent;
  const REGIONS = ["ET", "TC", "WT"];
  const VIEW_KEYS = { a: 0, c: 1, s: 2, m: 3 };
  const state = { ready: false, loadMs: null, sequence: null, overlay: "pred", opacity: 0.6, view: 3, saved: null };

  function deliver(key, value) {
    const w = waiting.get(key);
    if (w) { waiting.delete(key); w.resolve(value); }
  }

  function loadScript(src, key) {
    return new Promise((resolve, reject) => {
      waiting.set(key, { resolve, reject });
      const s = document.createElement("script");
      s.src = src;
      s.onerror = () => { waiting.delete(key); reject(new Error("could not load " + src)); };
      s.onload = () => {
        s.remove();
        if (waiting.has(key)) { waiting.delete(key); reject(new Error(src + " did not deliver its data")); }
      };
      document.head.appendChild(s);
    });
  }

  const dataUrl = (caseId, name) => "data/" + enc(caseId) + "/" + name + ".js";
  const caseUrl = (caseId) => "case.html?case=" + enc(caseId);
  const $ = (id) => document.getElementById(id);
  const fmt = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  /* ---- verdicts: the server's review.csv, or this browser's storage in a static folder ---- */
  const COLUMNS = ["case", "verdict", "note", "time", "menseg_version"];

  function csvText(rows) {
    const q = (v) => { const s = String(v ?? ""); return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; };
    const lines = [COLUMNS.join(",")];
    for (const c of Object.keys(rows).sort()) lines.push(COLUMNS.map((k) => q(rows[c][k])).join(","));
    return lines.join("\n") + "\n";
  }

  function verdictStore(payload) {
    if (payload.mode === "server") {
      return {
        download: false,
        async all() {
          const r = await fetch("api/verdicts", { cache: "no-store" });
          const j = await r.json();
          if (!r.ok) throw new Error(j.error || r.statusText);
          return j;
        },
        async save(caseId, verdict, note) {
          const r = await fetch("api/verdict", {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ case: caseId, verdict, note }),
          });
          const j = await r.json();
          if (!r.ok) throw new Error(j.error || r.statusText);
          return j;
        },
      };
    }
    const key = "menseg-review:" + location.pathname.replace(/[^/]*$/, "");
    const mine = () => JSON.parse(localStorage.getItem(key) || "{}");
    return {
      download: true,
      async all() { return Object.assign({}, payload.verdicts || {}, mine()); },
      async save(caseId, verdict, note) {
        const rows = mine();
        rows[caseId] = { case: caseId, verdict, note, time: new Date().toISOString().replace(/\.\d+Z$/, "+00:00"),
                         menseg_version: payload.version };
        localStorage.setItem(key, JSON.stringify(rows));
        return rows[caseId];
      },
    };
  }

  function downloadCsv(rows) {
    const a = el("a", { href: URL.createObjectURL(new Blob([csvText(rows)], { type: "text/csv" })), download: "review.csv" });
    document.body.append(a); a.click(); a.remove();
  }

  /* ---- index ---- */
  async function startIndex() {
    let data;
    try { data = await loadScript("data/index.js", "index"); } catch (e) { $("status").textContent = e.message; return; }
    const store = verdictStore(data);
    let verdicts = {};
    try { verdicts = await store.all(); } catch (e) { $("status").textContent = "verdicts not read: " + e.message; }
    const scored = data.cases.some((r) => r.lesion_dice);
    const cols = [
      { label: "case", text: true, get: (r) => r.case,
        cell: (r) => el("td", {}, el("a", { href: caseUrl(r.case) }, r.case)) },
      { label: "sequences", text: true, get: (r) => r.sequences.length,
        cell: (r) => el("td", { class: "text" + (r.missing.length ? " missing" : ""),
                               title: r.missing.length ? "missing: " + r.missing.join(", ") : "all four" },
                        r.sequences.join(" ") + (r.missing.length ? " (no " + r.missing.join(", ") + ")" : "")) },
      ...REGIONS.map((g) => ({ label: g + " mL", title: "predicted " + g + " volume", get: (r) => r.volumes_ml[g] ?? null, digits: 2 })),
    ];
    if (scored) {
      cols.push(...REGIONS.map((g) => ({ label: "Dice " + g, title: "lesion-wise Dice, " + g,
                                         get: (r) => (r.lesion_dice ? r.lesion_dice[g] : null), digits: 3 })));
      cols.push({ label: "FP lesions", title: "false-positive lesions (WT; ET/TC/WT in the tooltip)",
                  get: (r) => (r.false_positives ? r.false_positives.WT : null), digits: 0,
                  tip: (r) => (r.false_positives ? REGIONS.map((g) => g + " " + r.false_positives[g]).join(", ") : "") });
      cols.push({ label: "missed", title: "missed reference lesions (WT; ET/TC/WT in the tooltip)",
                  get: (r) => (r.missed ? r.missed.WT : null), digits: 0,
                  tip: (r) => (r.missed ? REGIONS.map((g) => g + " " + r.missed[g]).join(", ") : "") });
    }
    cols.push({ label: "verdict", text: true, get: (r) => (verdicts[r.case] || {}).verdict || "" });
    cols.push({ label: "note", text: true, cls: "note", get: (r) => r.problem || (verdicts[r.case] || {}).note || "" });

    let rows = data.cases.slice();
    let sortCol = null, desc = false;
    function render() {
      $("head").replaceChildren(...cols.map((c, i) => el("th", {
        class: (c.text ? "text " : "") + (i === sortCol ? "sorted" + (desc ? " desc" : "") : ""), title: c.title || "sort",
        onclick: () => { desc = sortCol === i ? !desc : false; sortCol = i; sortRows(); render(); },
      }, c.label)));
      $("rows").replaceChildren(...rows.map((r) => el("tr", { class: r.problem ? "problem" : "", "data-case": r.case },
        ...cols.map((c) => (c.cell ? c.cell(r) : el("td", { class: (c.text ? "text " : "") + (c.cls || ""), title: c.tip ? c.tip(r) : "" },
          c.text ? c.get(r) : fmt(c.get(r), c.digits)))))));
    }
    function sortRows() {
      const c = cols[sortCol];
      rows.sort((a, b) => {
        const x = c.get(a), y = c.get(b);
        if (x === null || x === "") return 1;
        if (y === null || y === "") return -1;
        const d = typeof x === "string" ? x.localeCompare(y) : x - y;
        return desc ? -d : d;
      });
    }
    render();
    const n = data.cases.length, bad = data.cases.filter((r) => r.problem).length;
    $("summary").textContent = n + " case" + (n === 1 ? "" : "s") + (scored ? ", worst first (mean lesion-wise Dice)" : "") +
      (bad ? ", " + bad + " not displayable" : "") + " · " + Object.keys(verdicts).length + " reviewed · menseg " + data.version;
    $("status").hidden = true;
    $("cases").hidden = false;
    if (store.download) { $("download").hidden = false; $("download").onclick = async () => downloadCsv(await store.all()); }
    state.ready = true;
  }

  /* ---- case ---- */
  const LABEL_VALUES = { NETC: 1, SNFH: 2, ET: 3 };

  function labelColormap(colours) {
    const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
    for (const [name, v] of Object.entries(LABEL_VALUES)) {
      const [r, g, b] = colours[name];
      cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.A.push(255); cm.I.push(v); cm.labels.push(name);
    }
    return cm;
  }

  function banner(text, error) {
    $("banner").hidden = false;
    $("banner").className = error ? "error" : "";
    $("banner").append(el("div", {}, text));
  }

  async function startCase() {
    const caseId = new URLSearchParams(location.search).get("case");
    let meta;
    try { meta = await loadScript(dataUrl(caseId, "case"), "case:" + caseId); } catch (e) {
      banner("case " + caseId + " not found in this review (" + e.message + ")", true); return;
    }
    document.title = caseId + " · menseg review";
    $("title").textContent = caseId;
    for (const [id, other] of [["prev", meta.previous], ["next", meta.next]]) {
      if (other) { $(id).hidden = false; $(id).href = caseUrl(other); }
    }
    setupVerdicts(meta, caseId);
    const row = meta.row;
    const seqs = Object.keys(meta.sequences);
    $("sequences").replaceChildren(...seqs.map((s, i) => el("button", {
      "data-seq": s, title: meta.sequences[s] ? "key " + (i + 1) : "this case has no " + s,
      ...(meta.sequences[s] ? {} : { disabled: "" }), onclick: () => setSequence(s),
    }, s + (meta.sequences[s] ? "" : " (missing)"))));
    $("legend").replaceChildren(...Object.keys(LABEL_VALUES).map((n) => {
      const [r, g, b] = meta.colours[n];
      return el("span", {}, el("span", { class: "swatch", style: `background: rgb(${r},${g},${b})` }), n);
    }));
    if (meta.problem) { banner("not displayed: " + meta.problem, true); state.ready = true; return; }
    if (meta.geometry.note) banner(meta.geometry.note, false);
    if (row.missing.length) banner("missing sequence" + (row.missing.length > 1 ? "s" : "") + ": " + row.missing.join(", "), false);
    if (row.has_reference) $("showRef").disabled = false;
    lesionLists(meta);

    const nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1], dragAndDropEnabled: false, show3Dcrosshair: false, isColorbar: false,
      crosshairColor: [0.3, 0.75, 1, 0.8], crosshairWidth: 0.2, multiplanarShowRender: 0, loadingText: "loading",
      clipPlaneHotKey: "", cycleClipPlaneHotKey: "", viewModeHotKey: "", logLevel: "error",
    });
    state.nv = nv;
    await nv.attachTo("gl");
    nv.onLocationChange = (loc) => {
      const mm = loc.mm;
      $("location").textContent = "x " + mm[0].toFixed(1) + "  y " + mm[1].toFixed(1) + "  z " + mm[2].toFixed(1) + " mm";
      state.location = [mm[0], mm[1], mm[2]];
    };
    const images = {};
    const cmap = labelColormap(meta.colours);
    async function volume(name) {
      if (!images[name]) {
        const b64 = await loadScript(dataUrl(caseId, name), "vol:" + caseId + ":" + name);
        const img = await niivue.NVImage.loadFromBase64({ base64: b64, name: name + ".nii.gz", colormap: "gray",
                                                          trustCalMinMax: false });
        if (name === "pred" || name === "ref") img.setColormapLabel(cmap);
        else { img.cal_min = 0; img.cal_max = 255; }
        images[name] = img;
      }
      return images[name];
    }
    async function show() {
      const list = [await volume(state.sequence)];
      if (state.overlay !== "none") { const o = await volume(state.overlay); o.opacity = state.opacity; list.push(o); }
      nv.volumes = list;
      nv.setVolume(list[0], 0); // sets the background and overlays from the list, then redraws
      for (const b of $("sequences").children) b.classList.toggle("on", b.dataset.seq === state.sequence);
      $("showPred").classList.toggle("on", state.overlay === "pred");
      $("showRef").classList.toggle("on", state.overlay === "ref");
      $("hideOverlay").classList.toggle("on", state.overlay === "none");
    }
    async function setSequence(s) { if (meta.sequences[s]) { state.sequence = s; await show(); } }
    async function setOverlay(o) { if (o !== "ref" || row.has_reference) { state.overlay = o; await show(); } }
    function setView(v) {
      state.view = v; nv.setSliceType(v);
      for (const b of $("views").children) b.classList.toggle("on", Number(b.dataset.view) === v);
    }
    state.setSequence = setSequence; state.setOverlay = setOverlay; state.setView = setView;
    state.jump = (mm) => { nv.scene.crosshairPos = nv.mm2frac(mm); nv.createOnLocationChange(); nv.drawScene(); };

    $("showPred").onclick = () => setOverlay("pred");
    $("showRef").onclick = () => setOverlay("ref");
    $("hideOverlay").onclick = () => setOverlay("none");
    $("opacity").oninput = (e) => {
      state.opacity = Number(e.target.value);
      if (nv.volumes.length > 1) { nv.volumes[1].opacity = state.opacity; nv.updateGLVolume(); }
    };
    for (const b of $("views").children) b.onclick = () => setView(Number(b.dataset.view));
    document.addEventListener("keydown", (e) => {
      if (e.target.closest("textarea, input") || e.ctrlKey || e.metaKey || e.altKey) return;
      const k = e.key.toLowerCase();
      if (k >= "1" && k <= "4") setSequence(seqs[Number(k) - 1]);
      else if (k === "r") setOverlay(state.overlay === "ref" ? "pred" : "ref");
      else if (k === "o") setOverlay(state.overlay === "none" ? "pred" : "none");
      else if (k in VIEW_KEYS) setView(VIEW_KEYS[k]);
      else if (k === "n" && meta.next) location.href = caseUrl(meta.next);
      else if (k === "p" && meta.previous) location.href = caseUrl(meta.previous);
      else return;
      e.preventDefault();
    });

    state.sequence = seqs.find((s) => meta.sequences[s]);
    await show();
    setView(3);
    const first = meta.lesions.prediction[0] || meta.lesions.reference[0];
    if (first) state.jump(first.mm);
    state.loadMs = performance.now();
    state.ready = true;
  }

  function lesionLists(meta) {
    const box = $("lesions");
    box.replaceChildren();
    for (const [key, title] of [["prediction", "predicted"], ["reference", "reference"]]) {
      const items = meta.lesions[key];
      if (key === "reference" && !meta.row.has_reference) continue;
      box.append(el("div", {}, title + ": " + items.length + " component" + (items.length === 1 ? "" : "s")));
      const item = (l, i) => el("li", { class: l.volume_ml <= meta.small_ml ? "small" : "" },
        el("a", { title: "jump to " + l.mm.map((v) => v.toFixed(1)).join(", ") + " mm",
                  onclick: () => { state.setOverlay(key === "reference" ? "ref" : "pred"); state.jump(l.mm); } },
           "#" + (i + 1) + " " + l.volume_ml.toFixed(2) + " mL"), " " + l.labels.join("/"));
      const list = el("ul", { "data-kind": key }, ...items.map(item));
      box.append(list);
      const small = items.filter((l) => l.volume_ml <= meta.small_ml).length;
      if (small) { // fold specks: the lesion-wise metrics ignore reference lesions this small
        list.classList.add("fold");
        const more = el("a", { class: "more", onclick: () => { list.classList.toggle("fold"); } },
          small + " under " + (meta.small_ml * 1000).toFixed(0) + " mm³ (show / hide)");
        box.append(el("div", {}, more));
      }
    }
  }

  function setupVerdicts(meta, caseId) {
    const store = verdictStore(meta);
    let choice = null;
    const buttons = meta.verdict_choices.map((v) => el("button", { "data-verdict": v, onclick: () => pick(v) }, v));
    $("verdictChoices").replaceChildren(...buttons);
    function pick(v) { choice = v; for (const b of buttons) b.classList.toggle("on", b.dataset.verdict === v); }
    function showSaved(row) {
      state.saved = row || null;
      $("saved").textContent = row ? "saved: " + row.verdict + (row.note ? " — " + row.note : "") + " (" + row.time + ")" : "no verdict saved yet";
    }
    store.all().then((rows) => { const r = rows[caseId]; if (r) { pick(r.verdict); $("note").value = r.note; } showSaved(r); })
      .catch((e) => { $("saved").textContent = "verdicts not read: " + e.message; });
    $("save").onclick = async () => {
      if (!choice) { $("saved").textContent = "pick accept, needs correction or reject first"; return; }
      try { showSaved(await store.save(caseId, choice, $("note").value)); } catch (e) { $("saved").textContent = "NOT saved: " + e.message; }
    };
    if (store.download) { $("download").hidden = false; $("download").onclick = async () => downloadCsv(await store.all()); }
  }

  return {
    state, startIndex, startCase,
    index: (payload) => deliver("index", payload),
    caseMeta: (payload) => deliver("case:" + payload.case, payload),
    volume: (caseId, name, b64) => deliver("vol:" + caseId + ":" + name, b64),
  };
})();
