// medsa serve: browse, click / box, see the mask, save. Plain JS, no dependencies.
// Coordinates sent to the server are (x, y) in image pixels (x = column, y = row).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), model: $("model"), rootSelect: $("root-select"), crumbs: $("crumbs"),
    fileList: $("file-list"), upload: $("upload"), uploadHint: $("upload-hint"),
    stack: $("stack"), image: $("image-canvas"), overlay: $("overlay"), area: $("canvas-area"),
    placeholder: $("placeholder"), sliceBar: $("slice-bar"), slice: $("slice"),
    sliceLabel: $("slice-label"), slicePrev: $("slice-prev"), sliceNext: $("slice-next"),
    imageName: $("image-name"), imageMeta: $("image-meta"), undo: $("undo"), clear: $("clear"),
    multimask: $("multimask"), candidates: $("candidates"), maskInfo: $("mask-info"),
    preset: $("preset"), win: $("win"), lev: $("lev"), winVal: $("win-val"), levVal: $("lev-val"),
    opacity: $("opacity"), showMask: $("show-mask"), saveName: $("save-name"), save: $("save"),
    dicomSeg: $("dicom-seg"), dicomSegRow: $("dicom-seg-row"),
    download: $("download"), saveInfo: $("save-info"), feedback: $("feedback"),
    objects: $("objects"), objAdd: $("obj-add"), objDel: $("obj-del"), objName: $("obj-name"),
    propBox: $("propagate-box"), propagate: $("propagate"), propDir: $("prop-dir"),
    propCancel: $("prop-cancel"), propInfo: $("prop-info"),
  };
  // one colour per object (label 1, 2, ... cycle through them)
  const COLORS = [[255, 70, 70], [60, 200, 255], [255, 210, 60], [120, 230, 110], [220, 110, 255],
    [255, 150, 50], [80, 120, 255], [255, 100, 190]];

  // ------------------------------------------------------------------ state
  const state = {
    info: null,          // image info from /api/open
    z: 0,                // current slice
    raw: new Map(),      // slice -> {data: Float32Array|Uint8Array, channels}
    // per object and slice, keyed "object:slice" (see key()):
    prompts: new Map(),  // -> [{type: "point", x, y, label} | {type: "box", x0, y0, x1, y1}]
    results: new Map(),  // -> {masks: [{bits, score, area, token}], chosen, propagated}
    history: new Map(),  // -> tokens[k]: mask token after k + 1 prompts (previous-mask feedback)
    objects: [],         // [{id, name, label}]; the label map value is the label
    active: 1,           // id of the object that clicks edit
    nextLabel: 1,
    job: null,           // propagation job in progress
    window: [0, 255],    // display window [low, high]
    root: 0, path: "",   // browser position
    seq: 0,              // request counter: stale prediction responses are dropped
    drag: null,          // mouse drag in progress
    dirty: false,        // masks changed since the last save
    inflight: Promise.resolve(),  // latest prediction request (settled, errors swallowed)
  };

  // ------------------------------------------------------------------ helpers
  function setStatus(text, kind = "") {
    ui.status.textContent = text;
    ui.status.className = kind;
  }

  const key = (z, obj = state.active) => `${obj}:${z}`;
  const activeObject = () => state.objects.find((o) => o.id === state.active);
  const color = (o) => COLORS[(o.label - 1) % COLORS.length];

  async function api(path, opts = {}) {
    const init = { method: opts.method || "GET", headers: { "X-Medsa": "1" } };
    if (opts.json !== undefined) {
      init.method = opts.method || "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.json);
    } else if (opts.body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/octet-stream";
      init.body = opts.body;
    }
    const res = await fetch(path, init);
    if (!res.ok) {
      let msg = `${res.status} ${res.statusText}`;
      try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
      const err = new Error(msg);
      err.status = res.status;
      throw err;
    }
    return opts.raw ? res : res.json();
  }

  function rleDecode(runs, n) {
    const out = new Uint8Array(n);
    let pos = 0;
    for (let i = 0; i < runs.length; i++) {
      if (i % 2 === 1) out.fill(1, pos, pos + runs[i]);
      pos += runs[i];
    }
    return out;
  }

  function rleEncode(bits) {
    const runs = [];
    let cur = 0, count = 0;
    for (let i = 0; i < bits.length; i++) {
      if (bits[i] !== cur) { runs.push(count); cur = bits[i]; count = 0; }
      count++;
    }
    runs.push(count);
    return runs;
  }

  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toPrecision(3));

  // ------------------------------------------------------------------ file browser
  async function loadInfo() {
    const info = await api("/api/info");
    ui.model.textContent = `model: ${info.model} (${info.image_size} px)`;
    ui.rootSelect.innerHTML = "";
    for (const r of info.roots) {
      const o = document.createElement("option");
      o.value = r.index; o.textContent = r.name;
      ui.rootSelect.appendChild(o);
    }
    ui.uploadHint.textContent = `up to ${info.max_upload_mb} MB; masks are saved to ${info.output_dir}`;
    await browse(0, "");
    setStatus("ready");
  }

  async function browse(root, path) {
    const listing = await api(`/api/files?root=${root}&path=${encodeURIComponent(path)}`);
    state.root = root; state.path = listing.path;
    ui.crumbs.innerHTML = "";
    const parts = listing.path ? listing.path.split("/") : [];
    const rootLink = document.createElement("a");
    rootLink.textContent = ui.rootSelect.options[root]?.textContent || "root";
    rootLink.onclick = () => browse(root, "").catch(showError);
    ui.crumbs.appendChild(rootLink);
    parts.forEach((p, i) => {
      ui.crumbs.appendChild(document.createTextNode(" / "));
      const a = document.createElement("a");
      a.textContent = p;
      const target = parts.slice(0, i + 1).join("/");
      a.onclick = () => browse(root, target).catch(showError);
      ui.crumbs.appendChild(a);
    });
    ui.fileList.innerHTML = "";
    const join = (name) => (listing.path ? `${listing.path}/${name}` : name);
    if (listing.path) addItem("..", "dir", () => browse(root, parts.slice(0, -1).join("/")));
    if (listing.dicom_series && listing.path) {
      const li = addItem("open this folder as a DICOM series", "series",
        () => openImage(root, listing.path, li));
    }
    for (const d of listing.dirs) addItem(d, "dir", () => browse(root, join(d)));
    for (const f of listing.files) {
      const li = addItem(f.name, "file", () => openImage(root, join(f.name), li));
      li.title = `${f.name} (${(f.size / 1024).toFixed(0)} kB)`;
    }
    if (!listing.dirs.length && !listing.files.length) {
      const li = document.createElement("li");
      li.className = "empty"; li.textContent = "no images here";
      ui.fileList.appendChild(li);
    }
  }

  function addItem(name, cls, onclick) {
    const li = document.createElement("li");
    li.className = cls; li.textContent = name;
    li.onclick = () => Promise.resolve(onclick()).catch(showError);
    ui.fileList.appendChild(li);
    return li;
  }

  function showError(e) { setStatus(e.message || String(e), "error"); }

  const confirmDiscard = () =>
    !state.dirty || window.confirm("The current masks are not saved. Open another image anyway?");

  async function openImage(root, path, li) {
    if (!confirmDiscard()) return;
    setStatus(`opening ${path} …`, "busy");
    const info = await api("/api/open", { json: { root, path } });
    for (const el of ui.fileList.querySelectorAll(".active")) el.classList.remove("active");
    if (li) li.classList.add("active");
    await showImage(info);
  }

  async function uploadFile(file) {
    if (!confirmDiscard()) return;
    setStatus(`uploading ${file.name} …`, "busy");
    const info = await api(`/api/upload?filename=${encodeURIComponent(file.name)}`, { body: file });
    await showImage(info);
  }

  // ------------------------------------------------------------------ image display
  async function showImage(info) {
    state.info = info; state.raw.clear(); state.prompts.clear(); state.results.clear();
    state.history.clear(); state.objects = []; state.nextLabel = 1;
    stopJob(true);
    addObject();
    state.dirty = false;
    state.seq++;
    state.z = info.ndim === 3 ? Math.floor(info.slices / 2) : 0;
    ui.image.width = ui.overlay.width = info.width;
    ui.image.height = ui.overlay.height = info.height;
    ui.stack.classList.add("loaded");
    ui.placeholder.hidden = true;
    ui.imageName.textContent = info.name;
    const sp = info.spacing.map((s) => s.toFixed(2)).join(" × ");
    ui.imageMeta.textContent = `${info.ndim}D · ${info.width} × ${info.height}` +
      (info.ndim === 3 ? ` × ${info.slices} slices` : "") + ` · ${info.dtype} · ${info.format}` +
      ` · spacing ${sp}`;
    ui.sliceBar.hidden = info.ndim !== 3;
    ui.propBox.hidden = info.ndim !== 3;
    ui.slice.max = info.slices - 1; ui.slice.value = state.z;
    ui.saveName.value = info.save_name;
    ui.download.hidden = true; ui.saveInfo.textContent = "";
    // DICOM-SEG references the source series: offered for DICOM images only
    ui.dicomSegRow.hidden = info.format !== "dicom"; ui.dicomSeg.disabled = info.format !== "dicom";
    setupWindow(info);
    layout();
    await gotoSlice(state.z);
    setStatus(`${info.name} open — click on the image to segment`);
  }

  function setupWindow(info) {
    const span = Math.max(info.max - info.min, 1e-6);
    ui.win.min = span / 1000; ui.win.max = span * 2; ui.win.step = span / 1000;
    ui.lev.min = info.min - span / 2; ui.lev.max = info.max + span / 2; ui.lev.step = span / 1000;
    const isCT = info.min < -500;  // Hounsfield units
    for (const o of ui.preset.options) o.disabled = o.value.startsWith("ct-") && !isCT;
    ui.preset.value = "auto";
    applyPreset("auto");
  }

  function applyPreset(name) {
    const info = state.info;
    if (!info) return;
    const presets = {
      auto: info.window, full: [info.min, info.max],
      "ct-soft": [40 - 200, 40 + 200], "ct-lung": [-600 - 750, -600 + 750],
      "ct-bone": [400 - 900, 400 + 900], "ct-brain": [40 - 40, 40 + 40],
    };
    setWindow(...(presets[name] || info.window));
  }

  function setWindow(lo, hi) {
    if (!(hi > lo)) hi = lo + 1e-6;
    state.window = [lo, hi];
    ui.win.value = hi - lo; ui.lev.value = (lo + hi) / 2;
    ui.winVal.textContent = fmt(hi - lo); ui.levVal.textContent = fmt((lo + hi) / 2);
    drawImage();
  }

  function layout() {
    const info = state.info;
    if (!info) return;
    // Physical aspect ratio: rows are spacing[0] mm apart, columns spacing[1] mm.
    const aspect = info.spacing.length === 2 ? info.spacing[0] / info.spacing[1] : 1;
    const h = info.height * aspect;
    const box = ui.area.getBoundingClientRect();
    const scale = Math.min((box.width - 16) / info.width, (box.height - 16) / h);
    ui.stack.style.width = `${Math.max(1, info.width * scale)}px`;
    ui.stack.style.height = `${Math.max(1, h * scale)}px`;
  }

  async function gotoSlice(z) {
    const info = state.info;
    if (!info) return;
    z = Math.max(0, Math.min(info.slices - 1, z));
    state.z = z;
    ui.slice.value = z;
    ui.sliceLabel.textContent = `slice ${z + 1} / ${info.slices}`;
    if (!state.raw.has(z)) {
      const res = await api(`/api/images/${info.id}/slices/${z}`, { raw: true });
      const buf = await res.arrayBuffer();
      const dtype = res.headers.get("X-Dtype");
      const data = dtype === "float32" ? new Float32Array(buf) : new Uint8Array(buf);
      if (state.info !== info) return;  // another image was opened meanwhile
      state.raw.set(z, { data, channels: Number(res.headers.get("X-Channels")) });
      if (state.raw.size > 64) state.raw.delete(state.raw.keys().next().value);
    }
    if (state.z !== z) return;
    drawImage();
    drawOverlay();
    updateCandidates();
    scheduleEmbed();
  }

  // Warm the embedding of the slice the user settled on, so the first click is fast.
  let embedTimer = null;
  function scheduleEmbed() {
    clearTimeout(embedTimer);
    const info = state.info, z = state.z;
    embedTimer = setTimeout(() => {
      if (state.info !== info || state.z !== z) return;
      api("/api/embed", { json: { image: info.id, slice: z } }).catch(() => { /* best effort */ });
    }, 400);
  }

  function drawImage() {
    const info = state.info, slice = info && state.raw.get(state.z);
    if (!slice) return;
    const ctx = ui.image.getContext("2d");
    const img = ctx.createImageData(info.width, info.height);
    const out = img.data, src = slice.data, n = info.width * info.height;
    const [lo, hi] = state.window, k = 255 / (hi - lo);
    if (slice.channels === 3) {
      for (let i = 0, j = 0; i < n; i++, j += 4) {
        out[j] = (src[3 * i] - lo) * k; out[j + 1] = (src[3 * i + 1] - lo) * k;
        out[j + 2] = (src[3 * i + 2] - lo) * k; out[j + 3] = 255;
      }
    } else {
      for (let i = 0, j = 0; i < n; i++, j += 4) {
        const v = (src[i] - lo) * k;  // Uint8ClampedArray clamps to [0, 255]
        out[j] = out[j + 1] = out[j + 2] = v; out[j + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  // ------------------------------------------------------------------ overlay: mask + prompts
  function currentMask(obj = state.active, z = state.z) {
    const r = state.results.get(key(z, obj));
    return r && r.masks[r.chosen];
  }

  function drawOverlay(preview) {
    const info = state.info;
    if (!info) return;
    const ctx = ui.overlay.getContext("2d");
    const w = info.width, h = info.height;
    ctx.clearRect(0, 0, w, h);
    const m = currentMask();
    const area = m ? m.area : 0;
    if (ui.showMask.checked) {
      // every object of the slice, the active one on top and more opaque
      const img = ctx.createImageData(w, h);
      const d = img.data;
      let any = false;
      const order = state.objects.filter((o) => o.id !== state.active).concat(activeObject() || []);
      for (const o of order) {
        const om = currentMask(o.id);
        if (!om) continue;
        any = true;
        const a = Math.round(255 * Number(ui.opacity.value) * (o.id === state.active ? 1 : 0.6));
        const [cr, cg, cb] = color(o), bits = om.bits;
        for (let i = 0, j = 0; i < bits.length; i++, j += 4) {
          if (bits[i]) { d[j] = cr; d[j + 1] = cg; d[j + 2] = cb; d[j + 3] = a; }
        }
      }
      if (any) ctx.putImageData(img, 0, 0);
    }
    ui.overlay.dataset.maskPixels = String(area);
    ui.maskInfo.textContent = m ? `mask: ${area} px` + (m.score != null ? ` · score ${m.score.toFixed(3)}` : "") : "mask: –";
    // Prompt markers, sized relative to the displayed canvas so they look the same at any zoom.
    const px = w / Math.max(1, ui.overlay.getBoundingClientRect().width);
    const r = 5 * px;
    ctx.lineWidth = 2 * px;
    for (const p of state.prompts.get(key(state.z)) || []) {
      if (p.type === "point") {
        ctx.beginPath(); ctx.arc(p.x, p.y, r, 0, 2 * Math.PI);
        ctx.fillStyle = p.label ? "#3ddc84" : "#ff5c5c"; ctx.fill();
        ctx.strokeStyle = "#000"; ctx.stroke();
      } else {
        ctx.strokeStyle = "#ffd84a"; ctx.strokeRect(p.x0, p.y0, p.x1 - p.x0, p.y1 - p.y0);
      }
    }
    if (preview) {
      ctx.setLineDash([6 * px, 4 * px]); ctx.strokeStyle = "#ffd84a";
      ctx.strokeRect(preview.x0, preview.y0, preview.x1 - preview.x0, preview.y1 - preview.y0);
      ctx.setLineDash([]);
    }
  }

  function updateCandidates() {
    ui.candidates.innerHTML = "";
    const r = state.results.get(key(state.z));
    if (!r || r.masks.length < 2) return;
    r.masks.forEach((m, i) => {
      const b = document.createElement("button");
      b.textContent = `${i + 1}: ${m.score.toFixed(2)}`;
      b.title = `candidate ${i + 1}, predicted IoU ${m.score.toFixed(3)}, ${m.area} px`;
      if (i === r.chosen) b.classList.add("selected");
      b.onclick = () => chooseCandidate(i);
      ui.candidates.appendChild(b);
    });
  }

  function chooseCandidate(i) {
    const k = key(state.z), r = state.results.get(k);
    if (!r || i >= r.masks.length) return;
    r.chosen = i;
    // the chosen candidate is the one fed back on the next click
    const hist = state.history.get(k), n = (state.prompts.get(k) || []).length;
    if (hist && n) hist[n - 1] = r.masks[i].token;
    drawOverlay(); updateCandidates();
  }

  // ------------------------------------------------------------------ prompts -> prediction
  // Every prompt change goes through predict(); body[data-pending] counts requests in flight and
  // save() waits for the latest one, so a save right after a click stores the updated mask.
  let pending = 0;
  function predict() {
    document.body.dataset.pending = String(++pending);
    const p = predictNow();
    state.inflight = p.catch(() => {}).finally(() => {
      document.body.dataset.pending = String(--pending);
    });
    return p;
  }

  async function predictNow() {
    const info = state.info, z = state.z, k = key(z);
    const prompts = state.prompts.get(k) || [];
    const seq = ++state.seq;
    if (!prompts.length) {
      state.results.delete(k); state.history.delete(k);
      drawOverlay(); updateCandidates(); renderObjects();
      return;
    }
    // SAM's interactive loop: the mask shown before the latest prompt goes back to the decoder
    const hist = state.history.get(k) || [];
    const maskInput = ui.feedback.checked && prompts.length >= 2 ? hist[prompts.length - 2] || null : null;
    const points = prompts.filter((p) => p.type === "point").map((p) => [p.x, p.y, p.label]);
    const boxes = prompts.filter((p) => p.type === "box");
    const box = boxes.length ? boxes[boxes.length - 1] : null;  // SAM takes one box: the latest
    const mode = ui.multimask.value;
    const multimask = mode === "always" || (mode === "auto" && points.length === 1 && !box);
    setStatus("segmenting …", "busy");
    const res = await api("/api/predict", {
      json: {
        image: info.id, slice: z, points, multimask, mask_input: maskInput,
        box: box ? [box.x0, box.y0, box.x1, box.y1] : null,
      },
    });
    if (seq !== state.seq || state.info !== info) return;  // superseded by a newer prompt
    state.dirty = true;
    const n = info.width * info.height;
    state.results.set(k, {
      masks: res.masks.map((m) => ({ bits: rleDecode(m.rle, n), score: m.score, area: m.area, token: m.token })),
      chosen: res.best,
    });
    hist.length = prompts.length - 1;
    hist[prompts.length - 1] = res.masks[res.best].token;
    state.history.set(k, hist);
    document.body.dataset.maskInputUsed = String(res.mask_input_used);
    if (state.z === z) { drawOverlay(); updateCandidates(); }
    renderObjects();
    setStatus(`mask updated in ${res.ms} ms` + (res.cached ? " (cached embedding)" : " (new embedding)") +
      (res.mask_input_used ? " · previous mask fed back" : ""));
  }

  function addPrompt(p) {
    if (!state.info) return;
    const k = key(state.z);
    const list = state.prompts.get(k) || [];
    const prev = state.results.get(k);
    if (!list.length && prev && prev.propagated && p.type === "point") {
      // correcting a propagated slice: start from the box of its mask, then the click
      const b = bbox(prev.masks[0].bits, state.info.width);
      if (b) list.push({ type: "box", ...b });
    }
    list.push(p);
    state.prompts.set(k, list);
    drawOverlay();
    predict().catch((e) => { list.splice(list.indexOf(p), 1); drawOverlay(); showError(e); });
  }

  function bbox(bits, w) {
    let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1;
    for (let i = 0; i < bits.length; i++) {
      if (!bits[i]) continue;
      const x = i % w, y = (i - x) / w;
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    return x1 < 0 ? null : { x0, y0, x1: x1 + 1, y1: y1 + 1 };
  }

  function undo() {
    const list = state.prompts.get(key(state.z));
    if (!list || !list.length) return;
    list.pop();
    drawOverlay();
    predict().catch(showError);
  }

  function clearSlice() {
    const k = key(state.z);
    state.prompts.delete(k); state.results.delete(k); state.history.delete(k); state.seq++;
    drawOverlay(); updateCandidates(); renderObjects();
    setStatus("cleared");
  }

  function toImage(ev) {
    const rect = ui.overlay.getBoundingClientRect();
    const info = state.info;
    const x = ((ev.clientX - rect.left) / rect.width) * info.width;
    const y = ((ev.clientY - rect.top) / rect.height) * info.height;
    return {
      x: Math.max(0, Math.min(info.width, x)), y: Math.max(0, Math.min(info.height, y)),
      sx: ev.clientX, sy: ev.clientY,
    };
  }

  ui.overlay.addEventListener("contextmenu", (ev) => ev.preventDefault());
  ui.overlay.addEventListener("pointerdown", (ev) => {
    if (!state.info || (ev.button !== 0 && ev.button !== 2)) return;
    ev.preventDefault();
    ui.overlay.setPointerCapture(ev.pointerId);
    state.drag = { start: toImage(ev), button: ev.button, shift: ev.shiftKey, box: null };
  });
  ui.overlay.addEventListener("pointermove", (ev) => {
    const d = state.drag;
    if (!d || d.button !== 0) return;
    const p = toImage(ev);
    if (Math.hypot(p.sx - d.start.sx, p.sy - d.start.sy) < 5) return;  // still a click
    d.box = {
      type: "box", x0: Math.min(d.start.x, p.x), y0: Math.min(d.start.y, p.y),
      x1: Math.max(d.start.x, p.x), y1: Math.max(d.start.y, p.y),
    };
    drawOverlay(d.box);
  });
  ui.overlay.addEventListener("pointerup", (ev) => {
    const d = state.drag;
    state.drag = null;
    if (!d) return;
    if (d.box) { addPrompt(d.box); return; }
    const negative = d.button === 2 || d.shift || ev.shiftKey;
    addPrompt({ type: "point", x: d.start.x, y: d.start.y, label: negative ? 0 : 1 });
  });

  // ------------------------------------------------------------------ save
  function objectMasks(obj) {
    const masks = {};
    for (const [k, r] of state.results) {
      const [o, z] = k.split(":").map(Number);
      if (o === obj && r.masks[r.chosen].area > 0) masks[z] = rleEncode(r.masks[r.chosen].bits);
    }
    return masks;
  }

  async function save() {
    const info = state.info;
    if (!info) return;
    await state.inflight;
    const objects = state.objects.map((o) => ({ name: o.name, label: o.label, masks: objectMasks(o.id) }));
    if (!objects.some((o) => Object.keys(o.masks).length)) {
      setStatus("nothing to save yet: add a prompt first", "error"); return;
    }
    setStatus("saving …", "busy");
    const dicomSeg = info.format === "dicom" && ui.dicomSeg.checked;
    const body = { image: info.id, name: ui.saveName.value.trim() || null, objects, dicom_seg: dicomSeg };
    let res;
    try {
      res = await api("/api/save", { json: body });
    } catch (e) {
      // 409: a file of that name exists that this session did not write; ask before replacing it
      if (e.status !== 409 || !window.confirm(`${e.message}\n\nReplace it?`)) throw e;
      res = await api("/api/save", { json: { ...body, overwrite: true } });
    }
    ui.download.href = res.download; ui.download.download = res.name; ui.download.hidden = false;
    const px = Object.values(res.foreground).reduce((a, b) => a + b, 0);
    const seg = res.dicom_seg ? ` + ${res.dicom_seg}` : "";
    ui.saveInfo.textContent = `saved ${res.path} + ${res.sidecar}${seg} (${objects.length} object(s), ${px} px)`;
    document.body.dataset.saved = res.name;
    state.dirty = false;
    setStatus(`saved ${res.name}`);
  }

  // ------------------------------------------------------------------ objects
  function addObject() {
    if (state.nextLabel > 255) { setStatus("at most 255 objects per image", "error"); return; }
    const label = state.nextLabel++;
    state.objects.push({ id: label, label, name: `object ${label}` });
    selectObject(label);
  }

  function selectObject(id) {
    state.active = id;
    state.seq++;  // a pending prediction belongs to the previous object
    ui.objName.value = activeObject()?.name || "";
    renderObjects(); drawOverlay(); updateCandidates();
  }

  function deleteObject() {
    const o = activeObject();
    if (!o) return;
    const n = Object.keys(objectMasks(o.id)).length;
    if (n && !window.confirm(`Delete ${o.name} and its masks on ${n} slice(s)?`)) return;
    for (const m of [state.prompts, state.results, state.history]) {
      for (const k of [...m.keys()]) if (k.startsWith(`${o.id}:`)) m.delete(k);
    }
    state.objects = state.objects.filter((x) => x !== o);
    if (!state.objects.length) addObject();
    else selectObject(state.objects[state.objects.length - 1].id);
    state.dirty = true;
  }

  function renameObject() {
    const o = activeObject(), name = ui.objName.value.trim();
    if (!o || !name) return;
    if (state.objects.some((x) => x !== o && x.name === name)) {
      setStatus(`another object is already named ${name}`, "error");
      ui.objName.value = o.name; return;
    }
    o.name = name; state.dirty = true; renderObjects();
  }

  function renderObjects() {
    ui.objects.innerHTML = "";
    for (const o of state.objects) {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = `rgb(${color(o).join(",")})`;
      const n = Object.keys(objectMasks(o.id)).length;
      li.append(sw, `${o.label}: ${o.name}` + (n ? ` (${n} slice${n > 1 ? "s" : ""})` : ""));
      li.dataset.label = o.label;
      if (o.id === state.active) li.classList.add("active");
      li.onclick = () => selectObject(o.id);
      ui.objects.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ propagation (volumes)
  function stopJob(cancel = false) {
    if (state.job) {
      clearTimeout(state.job.timer);
      // another image was opened: the server need not finish a propagation nobody will see
      if (cancel) api(`/api/jobs/${state.job.id}/cancel`, { json: {} }).catch(() => {});
      state.job = null;
    }
    ui.propagate.disabled = false; ui.propCancel.hidden = true;
    document.body.dataset.propagating = "0";
  }

  async function propagate() {
    const info = state.info, obj = state.active;
    if (!info || info.ndim !== 3 || state.job) return;
    await state.inflight;
    // key slices: where the user prompted this object (propagated slices are not keys)
    const keys = {};
    for (const [k, list] of state.prompts) {
      const [o, z] = k.split(":").map(Number);
      const r = state.results.get(k);
      if (o === obj && list.length && r && r.masks[r.chosen].area > 0) keys[z] = rleEncode(r.masks[r.chosen].bits);
    }
    if (!Object.keys(keys).length) { setStatus("segment the object on one slice first, then propagate", "error"); return; }
    const job = await api("/api/propagate", { json: { image: info.id, keys, direction: ui.propDir.value } });
    state.job = { id: job.job, timer: null };
    ui.propagate.disabled = true; ui.propCancel.hidden = false;
    document.body.dataset.propagating = "1";
    const poll = async () => {
      if (!state.job || state.job.id !== job.job) return;
      let st;
      try { st = await api(`/api/jobs/${job.job}`); } catch (e) { stopJob(); showError(e); return; }
      if (state.info !== info) { stopJob(); return; }
      if (st.state === "queued" || st.state === "running") {
        ui.propInfo.textContent = `${st.done} / ${st.total || "?"} slices`;
        setStatus(`propagating ${activeName(obj)} … ${st.done} / ${st.total || "?"}`, "busy");
        state.job.timer = setTimeout(poll, 400);
        return;
      }
      stopJob();
      document.body.dataset.propagating = "0";
      if (st.state !== "done") { setStatus(`propagation ${st.state}${st.error ? ": " + st.error : ""}`, st.error ? "error" : ""); return; }
      applyPropagation(obj, st);
    };
    state.job.timer = setTimeout(poll, 200);
  }

  const activeName = (id) => state.objects.find((o) => o.id === id)?.name || "object";

  function applyPropagation(obj, st) {
    const info = state.info, n = info.width * info.height;
    // replace earlier propagated masks of this object; slices the user prompted stay as they are
    for (const [k, r] of [...state.results]) {
      if (r.propagated && k.startsWith(`${obj}:`)) state.results.delete(k);
    }
    let count = 0;
    for (const [zs, runs] of Object.entries(st.masks)) {
      const k = key(Number(zs), obj);
      if ((state.prompts.get(k) || []).length) continue;
      const bits = rleDecode(runs, n);
      let area = 0; for (let i = 0; i < bits.length; i++) area += bits[i];
      state.results.set(k, { masks: [{ bits, score: st.scores[zs], area, token: null }], chosen: 0, propagated: true });
      count++;
    }
    state.dirty = true;
    document.body.dataset.propagated = String(count);
    const range = st.z_range ? ` (slices ${st.z_range[0] + 1}–${st.z_range[1] + 1})` : "";
    ui.propInfo.textContent = `${count} slices added${range}`;
    setStatus(`propagated ${activeName(obj)} to ${count} more slices in ${st.seconds} s${range}`);
    drawOverlay(); updateCandidates(); renderObjects();
  }

  // ------------------------------------------------------------------ controls
  ui.objAdd.onclick = addObject;
  ui.objDel.onclick = deleteObject;
  ui.objName.onchange = renameObject;
  ui.propagate.onclick = () => propagate().catch((e) => { stopJob(); showError(e); });
  ui.propCancel.onclick = () => {
    if (state.job) api(`/api/jobs/${state.job.id}/cancel`, { json: {} }).catch(showError);
  };
  ui.rootSelect.onchange = () => browse(Number(ui.rootSelect.value), "").catch(showError);
  ui.upload.onchange = () => { if (ui.upload.files[0]) uploadFile(ui.upload.files[0]).catch(showError); ui.upload.value = ""; };
  ui.slice.oninput = () => gotoSlice(Number(ui.slice.value)).catch(showError);
  ui.slicePrev.onclick = () => gotoSlice(state.z - 1).catch(showError);
  ui.sliceNext.onclick = () => gotoSlice(state.z + 1).catch(showError);
  ui.undo.onclick = undo;
  ui.clear.onclick = clearSlice;
  ui.save.onclick = () => save().catch(showError);
  ui.multimask.onchange = () => predict().catch(showError);
  ui.preset.onchange = () => applyPreset(ui.preset.value);
  const onWL = () => {
    const w = Number(ui.win.value), l = Number(ui.lev.value);
    setWindow(l - w / 2, l + w / 2);
  };
  ui.win.oninput = onWL; ui.lev.oninput = onWL;
  ui.opacity.oninput = () => drawOverlay();
  ui.showMask.onchange = () => drawOverlay();
  window.addEventListener("resize", () => { layout(); drawOverlay(); });
  ui.area.addEventListener("wheel", (ev) => {
    if (!state.info || state.info.slices < 2) return;
    ev.preventDefault();
    gotoSlice(state.z + (ev.deltaY > 0 ? -1 : 1)).catch(showError);
  }, { passive: false });
  document.addEventListener("keydown", (ev) => {
    if (ev.target instanceof HTMLInputElement && ev.target.type === "text") return;
    const k = ev.key.toLowerCase();
    if ((ev.ctrlKey || ev.metaKey) && k === "z") { ev.preventDefault(); undo(); return; }
    if ((ev.ctrlKey || ev.metaKey) && k === "s") { ev.preventDefault(); save().catch(showError); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (k === "z") undo();
    else if (k === "escape" || k === "c") clearSlice();
    else if (k === "s") save().catch(showError);
    else if (k === "o") { ui.showMask.checked = !ui.showMask.checked; drawOverlay(); }
    else if (k === "n") addObject();
    else if (k === "p") propagate().catch((e) => { stopJob(); showError(e); });
    else if (k === "m") {
      ui.multimask.selectedIndex = (ui.multimask.selectedIndex + 1) % ui.multimask.options.length;
      predict().catch(showError);
    } else if (["1", "2", "3"].includes(k)) chooseCandidate(Number(k) - 1);
    else if (k === "arrowup" || k === "pageup") { ev.preventDefault(); gotoSlice(state.z + 1).catch(showError); }
    else if (k === "arrowdown" || k === "pagedown") { ev.preventDefault(); gotoSlice(state.z - 1).catch(showError); }
  });

  window.addEventListener("beforeunload", (ev) => {
    if (state.dirty) { ev.preventDefault(); ev.returnValue = ""; }
  });

  loadInfo().catch(showError);
})();
