// gpual annotate: the page. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Coordinates: the superpixel map is at the working scale (w x h, the label store's
// size); the photo is the original file. The overlay canvas is W x H (the photo's size,
// times a whole factor for a photo smaller than the screen) and each of
// its pixels shows the region of working pixel (floor(x*w/W), floor(y*h/H)): nearest
// neighbour, OpenCV's INTER_NEAREST rule. Painting and answers are in working pixels.
"use strict";

(() => {
  const VOID = 255;
  const MAX_GRID = 4_000_000; // overlay pixels per image
  const CACHE_IMAGES = 4; // full-resolution lookups of a few images only: a Cityscapes one is ~10 MB
  const $ = (id) => document.getElementById(id);
  const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

  const S = {
    manifest: null,
    classes: [], // [{id, name, color, key, rgb}]
    voidClass: null,
    keyToClass: new Map(),
    order: [], // every queried region: [{image, region}], image by image
    pos: 0, // index into order: the current region
    loaded: new Map(), // image index -> Promise of its pixel data (LRU, CACHE_IMAGES)
    data: null, // pixel data of the image on the canvas
    answers: [], // per image: {region: {class, kind, seconds, source, pixels?}}
    predictions: [], // per image: {region: class} | undefined (not loaded) | {error}
    predicting: new Set(), // images whose predictions are on their way
    spent: new Map(), // "image:region" -> seconds spent on it (stored seconds + this page's)
    queued: new Map(), // "image:region" -> {image, region, local, ticket}: saves not answered yet
    since: null, // performance.now() when the current region's clock started
    paint: null, // {image, region, buf: Uint8Array(w*h), brush, cursor: {x, y}}
    drawing: null, // last pointer position of a stroke, working pixels
    radius: 3,
    zoom: 1,
    pending: 0,
    chain: Promise.resolve(), // saves, one after the other, in the order given
    stopped: false,
    frame: 0, // a requested animation frame, 0 = none
    pixels: null, // the overlay's ImageData (W x H)
    chips: [], // per image: {count, buttons: Map(region -> button)} of the region list
    lastBrush: undefined, // the brush class last picked, for the next mixed region
  };

  // --- server --------------------------------------------------------------------------
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { credentials: "same-origin", cache: "no-store", ...options });
    } catch (e) {
      throw new Error("the server does not answer (stopped?)");
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).error || message;
      } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }

  async function postJSON(path, body) {
    const response = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return response.json();
  }

  // --- start -----------------------------------------------------------------------------
  async function start() {
    const m = await (await api("/api/session")).json();
    S.manifest = m;
    S.classes = m.classes.map((c) => ({ ...c, rgb: hexRgb(c.color) }));
    S.voidClass = { ...m.void, rgb: hexRgb(m.void.color) };
    for (const c of S.classes) if (c.key) S.keyToClass.set(c.key, c.id);
    // Class colours flat (r, g, b per class, then void's): the render loop reads them per pixel.
    S.classRGB = new Uint8Array([...S.classes.flatMap((c) => c.rgb), ...S.voidClass.rgb]);
    m.images.forEach((image, i) => {
      for (const r of image.regions) S.order.push({ image: i, region: r });
      setAnswers(i, (m.answers && m.answers[i]) || {});
    });
    $("round-label").textContent = `round ${m.round}`;
    document.title = `gpual annotate: round ${m.round}`;
    buildClassButtons();
    buildList();
    setProgress(m.progress);
    bindControls();
    const first = firstUnanswered(0);
    S.pos = first === null ? 0 : first;
    startClock();
    await show();
    document.body.dataset.ready = "1";
  }

  // The store's answers of image i, with the page's answers still on their way laid over
  // them (a reply to an earlier save must not undo a later one on the page).
  function setAnswers(i, answers) {
    const merged = { ...answers };
    for (const [k, q] of S.queued) if (q.image === i) merged[q.region] = q.local;
    S.answers[i] = merged;
    for (const [r, a] of Object.entries(answers)) {
      const k = `${i}:${r}`;
      if (!S.spent.has(k) && a.seconds !== null && a.seconds !== undefined) S.spent.set(k, a.seconds);
    }
    const d = S.data && S.data.i === i ? S.data : null;
    if (d) fillStored(d);
  }

  // --- one image's pixel data -----------------------------------------------------------
  function imageData(i) {
    if (S.loaded.has(i)) {
      const p = S.loaded.get(i);
      S.loaded.delete(i);
      S.loaded.set(i, p); // most recently used last
      return p;
    }
    const promise = loadImage(i);
    S.loaded.set(i, promise);
    promise.catch(() => S.loaded.delete(i));
    while (S.loaded.size > CACHE_IMAGES) S.loaded.delete(S.loaded.keys().next().value);
    return promise;
  }

  async function loadImage(i) {
    const [spResponse, photo] = await Promise.all([api(`/api/images/${i}/superpixels`), loadPhoto(i)]);
    const w = Number(spResponse.headers.get("X-Width"));
    const h = Number(spResponse.headers.get("X-Height"));
    const sp = toUint16(await spResponse.arrayBuffer());
    if (sp.length !== w * h) throw new Error(`superpixels of image ${i}: ${sp.length} values for ${w}x${h}`);
    // The overlay grid: the photo's own size, times a whole factor where the photo is smaller
    // than the screen (so outlines stay thin lines), at most MAX_GRID pixels.
    const natW = photo.ok ? photo.img.naturalWidth : w;
    const natH = photo.ok ? photo.img.naturalHeight : h;
    const screen = $("stage-wrap").clientWidth * (window.devicePixelRatio || 1);
    const factor = Math.max(1, Math.min(Math.floor(screen / natW), Math.floor(Math.sqrt(MAX_GRID / (natW * natH)))));
    const W = natW * factor;
    const H = natH * factor;
    const d = { i, w, h, W, H, natW, sp, photo, upIdx: upscaleIndex(w, h, W, H) };
    d.edges = boundaries(d);
    indexRegions(d);
    d.stored = new Uint8Array(w * h).fill(VOID);
    return d;
  }

  function loadPhoto(i) {
    const url = `/api/images/${i}/file`;
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve({ ok: true, img, url });
      img.onerror = async () => {
        let why = "the image file could not be loaded";
        try { await api(url); } catch (e) { why = e.message; }
        resolve({ ok: false, url, why });
      };
      img.src = url;
    });
  }

  function toUint16(buffer) {
    if (LITTLE_ENDIAN) return new Uint16Array(buffer);
    const view = new DataView(buffer);
    const out = new Uint16Array(buffer.byteLength / 2);
    for (let k = 0; k < out.length; k++) out[k] = view.getUint16(2 * k, true);
    return out;
  }

  // (W*H) working-pixel index of every display pixel: nearest neighbour.
  function upscaleIndex(w, h, W, H) {
    const up = new Int32Array(W * H);
    const column = new Int32Array(W);
    for (let x = 0; x < W; x++) column[x] = Math.min(w - 1, Math.floor((x * w) / W));
    for (let y = 0; y < H; y++) {
      const row = Math.min(h - 1, Math.floor((y * h) / H)) * w;
      const base = y * W;
      for (let x = 0; x < W; x++) up[base + x] = row + column[x];
    }
    return up;
  }

  // (W*H) 1 where the display pixel's region differs from its right or lower neighbour's.
  function boundaries(d) {
    const { W, H, sp, upIdx } = d;
    const edges = new Uint8Array(W * H);
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        const p = y * W + x;
        const id = sp[upIdx[p]];
        if ((x + 1 < W && sp[upIdx[p + 1]] !== id) || (y + 1 < H && sp[upIdx[p + W]] !== id)) edges[p] = 1;
      }
    }
    return edges;
  }

  // Per queried region: its working pixels (ascending = raster order, as the server reads
  // a mixed answer) and its working-pixel bounding box.
  function indexRegions(d) {
    const regions = S.manifest.images[d.i].regions;
    const max = Math.max(...regions, 0);
    const slot = new Int32Array(max + 1).fill(-1);
    regions.forEach((r, k) => { slot[r] = k; });
    const counts = new Int32Array(regions.length);
    for (let k = 0; k < d.sp.length; k++) {
      const id = d.sp[k];
      if (id <= max && slot[id] >= 0) counts[slot[id]]++;
    }
    const lists = regions.map((_, k) => new Int32Array(counts[k]));
    const fill = new Int32Array(regions.length);
    const box = regions.map(() => [Infinity, Infinity, -1, -1]);
    for (let k = 0; k < d.sp.length; k++) {
      const id = d.sp[k];
      if (id > max || slot[id] < 0) continue;
      const s = slot[id];
      lists[s][fill[s]++] = k;
      const x = k % d.w;
      const y = (k - x) / d.w;
      const b = box[s];
      if (x < b[0]) b[0] = x;
      if (y < b[1]) b[1] = y;
      if (x > b[2]) b[2] = x;
      if (y > b[3]) b[3] = y;
    }
    d.pixelsOf = new Map(regions.map((r, k) => [r, lists[k]]));
    d.bbox = new Map(regions.map((r, k) => [r, box[k]]));
    d.queried = new Set(regions);
    d.max = d.sp.reduce((a, b) => (b > a ? b : a), max);
  }

  // The stored pixels of the image's "mixed" answers, in one working-scale map.
  function fillStored(d) {
    d.stored.fill(VOID);
    for (const [r, a] of Object.entries(S.answers[d.i])) {
      const list = d.pixelsOf.get(Number(r));
      if (a.kind !== "pixels" || !a.pixels || !list || a.pixels.length !== list.length) continue;
      for (let k = 0; k < list.length; k++) d.stored[list[k]] = a.pixels[k];
    }
  }

  // --- showing the current region -------------------------------------------------------
  function current() {
    return S.order[S.pos];
  }

  async function show() {
    const c = current();
    if (!c) return;
    const wanted = S.pos;
    if (!S.data || S.data.i !== c.image) {
      setStatus(`loading image ${c.image + 1}…`);
      let d;
      try {
        d = await imageData(c.image);
      } catch (e) {
        setStatus(`image ${c.image + 1} could not be loaded: ${e.message}`, true);
        return;
      }
      if (S.pos !== wanted) return; // moved on meanwhile: that call shows it
      S.data = d;
      showPhoto(d);
      refreshAnswers(c.image);
      loadPredictions(c.image);
      setStatus(d.photo.ok ? "" : `image file not shown: ${d.photo.why}`, !d.photo.ok);
      prefetch(c.image + 1);
    }
    fillStored(S.data);
    layout();
    updatePanel();
    updateList();
    scrollToRegion();
    render();
    document.body.dataset.current = `${c.image}:${c.region}`; // where the page is: for tests and scripts
  }

  function prefetch(i) {
    if (i >= S.manifest.images.length) return;
    if (!S.loaded.has(i)) imageData(i).catch(() => {});
    loadPredictions(i); // the server computes them while this image is labelled
  }

  async function refreshAnswers(i) {
    // Another tab may have answered meanwhile: the store is the truth.
    try {
      const state = await (await api(`/api/images/${i}`)).json();
      setAnswers(i, state.answers);
      if (S.data && S.data.i === i) {
        updatePanel();
        updateList();
        render();
      }
    } catch (e) {
      setStatus(`answers of image ${i + 1} could not be read: ${e.message}`, true);
    }
  }

  async function loadPredictions(i) {
    if (S.predictions[i] !== undefined || !S.manifest.model || S.predicting.has(i)) return;
    S.predicting.add(i);
    try {
      const body = await (await api(`/api/images/${i}/predictions`)).json();
      S.predictions[i] = body.predictions || { error: body.error || "no predictions" };
    } catch (e) {
      S.predictions[i] = { error: e.message };
    }
    S.predicting.delete(i);
    if (S.data && S.data.i === i) {
      updatePanel();
      render();
    }
  }

  function showPhoto(d) {
    const photo = $("photo");
    if (d.photo.ok) {
      photo.src = d.photo.url;
      photo.hidden = false;
    } else {
      photo.removeAttribute("src");
      photo.hidden = true;
    }
    photo.alt = `image ${S.manifest.images[d.i].id}`;
    const canvas = $("overlay");
    canvas.width = d.W;
    canvas.height = d.H;
    S.pixels = canvas.getContext("2d").createImageData(d.W, d.H);
  }

  function layout() {
    const d = S.data;
    const wrap = $("stage-wrap");
    const fit = Math.min(wrap.clientWidth / d.W, wrap.clientHeight / d.H);
    const scale = fit * S.zoom;
    const stage = $("stage");
    stage.style.width = `${Math.round(d.W * scale)}px`;
    stage.style.height = `${Math.round(d.H * scale)}px`;
    stage.classList.toggle("pixelated", (d.W * scale) / d.natW >= 2); // a small photo: its pixels, as the overlay
  }

  function scrollToRegion() {
    const d = S.data;
    const b = d.bbox.get(current().region);
    if (!b || S.zoom === 1) return;
    const wrap = $("stage-wrap");
    const stage = $("stage");
    const cx = ((b[0] + b[2] + 1) / 2 / d.w) * stage.clientWidth;
    const cy = ((b[1] + b[3] + 1) / 2 / d.h) * stage.clientHeight;
    wrap.scrollLeft = cx - wrap.clientWidth / 2;
    wrap.scrollTop = cy - wrap.clientHeight / 2;
  }

  // --- drawing ---------------------------------------------------------------------------
  function requestRender() {
    if (!S.frame) S.frame = requestAnimationFrame(() => { S.frame = 0; render(); });
  }

  function render() {
    const d = S.data;
    if (!d || !S.pixels) return;
    const c = current();
    const cur = c.image === d.i ? c.region : -1;
    const painting = S.paint && S.paint.image === d.i ? S.paint : null;
    const { W, H, sp, upIdx, edges } = d;
    const out = S.pixels.data;

    // Per region: a fill colour, or alpha -1 where the colour comes per pixel (mixed answers).
    const fill = new Int16Array((d.max + 1) * 4); // r, g, b, a
    for (const r of d.queried) {
      const a = S.answers[d.i][r];
      let rgba;
      if ((r === cur && painting) || (a && a.kind === "pixels")) rgba = [0, 0, 0, -1];
      else if (a) rgba = [...colourOf(a.class), a.class === VOID ? 150 : r === cur ? 150 : 110];
      else rgba = r === cur ? [255, 214, 0, 110] : [255, 214, 0, 70];
      fill.set(rgba, r * 4);
    }
    const rgb = S.classRGB;
    const paintBuf = painting ? painting.buf : null;
    for (let p = 0; p < W * H; p++) {
      const o = p * 4;
      if (edges[p]) {
        out[o] = 255; out[o + 1] = 255; out[o + 2] = 255; out[o + 3] = 110;
        continue;
      }
      const k = upIdx[p];
      const id = sp[k];
      const f = id * 4;
      const alpha = fill[f + 3];
      if (alpha === -1) {
        const mine = paintBuf !== null && id === cur;
        const v = (mine ? paintBuf : d.stored)[k];
        if (v === VOID) {
          out[o] = 255; out[o + 1] = mine ? 255 : 214; out[o + 2] = mine ? 255 : 0; out[o + 3] = mine ? 40 : 45;
        } else {
          const c = v < S.classes.length ? v * 3 : S.classes.length * 3; // beyond: the void colour
          out[o] = rgb[c]; out[o + 1] = rgb[c + 1]; out[o + 2] = rgb[c + 2]; out[o + 3] = mine ? 170 : 130;
        }
      } else if (alpha > 0) {
        out[o] = fill[f]; out[o + 1] = fill[f + 1]; out[o + 2] = fill[f + 2]; out[o + 3] = alpha;
      } else {
        out[o + 3] = 0;
      }
    }
    if (cur >= 0) outline(d, cur, out);
    const ctx = $("overlay").getContext("2d");
    ctx.putImageData(S.pixels, 0, 0);
    if (painting) drawCursor(ctx, d, painting);
  }

  // The current region's outline, a few display pixels thick: yellow inside, dark outside.
  function outline(d, region, out) {
    const b = d.bbox.get(region);
    if (!b) return;
    const { W, H, sp, upIdx } = d;
    const stage = $("stage");
    const t = Math.max(1, Math.round((2 * W) / Math.max(1, stage.clientWidth))); // ~2 screen pixels
    const x0 = Math.max(0, Math.floor((b[0] * W) / d.w) - t);
    const x1 = Math.min(W - 1, Math.ceil(((b[2] + 1) * W) / d.w) + t);
    const y0 = Math.max(0, Math.floor((b[1] * H) / d.h) - t);
    const y1 = Math.min(H - 1, Math.ceil(((b[3] + 1) * H) / d.h) + t);
    const inside = (x, y) => x >= 0 && y >= 0 && x < W && y < H && sp[upIdx[y * W + x]] === region;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const me = inside(x, y);
        let border = false;
        for (let s = 1; s <= t && !border; s++) {
          border = inside(x + s, y) !== me || inside(x - s, y) !== me || inside(x, y + s) !== me || inside(x, y - s) !== me;
        }
        if (!border) continue;
        const o = (y * W + x) * 4;
        if (me) { out[o] = 255; out[o + 1] = 230; out[o + 2] = 0; out[o + 3] = 255; } else { out[o] = 0; out[o + 1] = 0; out[o + 2] = 0; out[o + 3] = 200; }
      }
    }
  }

  function drawCursor(ctx, d, painting) {
    const sx = d.W / d.w;
    const sy = d.H / d.h;
    ctx.save();
    ctx.lineWidth = Math.max(1, sx * 0.25);
    ctx.strokeStyle = "#ffffff";
    ctx.setLineDash([Math.max(2, sx), Math.max(2, sx)]);
    ctx.beginPath();
    ctx.ellipse((painting.cursor.x + 0.5) * sx, (painting.cursor.y + 0.5) * sy, (S.radius + 0.5) * sx, (S.radius + 0.5) * sy, 0, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.restore();
  }

  // --- answering -------------------------------------------------------------------------
  function className(k) {
    if (k === VOID) return "void";
    if (k === "mixed") return "mixed";
    const c = S.classes[k];
    return c ? c.name : `class ${k}`;
  }

  function colourOf(k) {
    return k === VOID ? S.voidClass.rgb : (S.classes[k] || S.voidClass).rgb;
  }

  function prediction(i, r) {
    const p = S.predictions[i];
    return p && !p.error && p[r] !== undefined ? p[r] : undefined;
  }

  // The class Enter confirms: the stored answer, else the model's guess.
  function preChosen(i, r) {
    const a = S.answers[i][r];
    if (a) return a.kind === "pixels" ? "mixed" : a.class;
    return prediction(i, r);
  }

  function clockKey(c) {
    return `${c.image}:${c.region}`;
  }

  function stopClock() {
    if (S.since === null) return;
    const k = clockKey(current());
    S.spent.set(k, (S.spent.get(k) || 0) + (performance.now() - S.since) / 1000);
    S.since = null;
  }

  function startClock() {
    if (!document.hidden && !S.stopped) S.since = performance.now();
  }

  // Seconds spent on the current region so far (stored seconds included).
  function secondsNow() {
    stopClock();
    startClock();
    return Math.round((S.spent.get(clockKey(current())) || 0) * 1000) / 1000;
  }

  function answerWhole(k) {
    const c = current();
    if (!c || S.stopped) return;
    const seconds = secondsNow();
    save(c.image, { region: c.region, class: k, seconds }, { class: k, kind: "region", seconds, source: "annotator" });
    advance();
  }

  function confirmChoice() {
    const c = current();
    const a = S.answers[c.image][c.region];
    if (a) { advance(); return; } // already answered: Enter keeps it
    const k = prediction(c.image, c.region);
    if (k === undefined) {
      const computing = S.manifest.model && S.predictions[c.image] === undefined;
      setStatus(computing ? "the model's guess is still being computed: wait a moment, or pick a class"
        : "nothing is pre-chosen here: pick a class with a click or its key", true);
      return;
    }
    answerWhole(k);
  }

  // Queue one answer: the page moves on at once, the saves go out one after the other;
  // the store's reply (answers and progress) replaces the page's guess.
  function save(i, item, local) {
    const previous = S.answers[i][item.region];
    const key = `${i}:${item.region}`;
    const ticket = {};
    S.queued.set(key, { image: i, region: item.region, local, ticket });
    S.answers[i] = { ...S.answers[i], [item.region]: local };
    S.pending++;
    document.body.dataset.pending = String(S.pending);
    updateList();
    S.chain = S.chain.then(async () => {
      const done = () => { if (S.queued.has(key) && S.queued.get(key).ticket === ticket) S.queued.delete(key); };
      try {
        const reply = await postJSON(`/api/images/${i}/answers`, { answers: [item] });
        done();
        setAnswers(i, reply.answers);
        setProgress(reply.progress);
        const all = reply.progress.answered >= reply.progress.queried;
        setStatus(`saved region ${item.region} of image ${i + 1}: ${className(item.class)}` +
          (all ? "; every region is answered: press Done, or go back to change an answer" : ""));
      } catch (e) {
        done();
        const restored = { ...S.answers[i] };
        if (!S.queued.has(key)) { // no later answer of this region waits: show what the store holds
          if (previous) restored[item.region] = previous; else delete restored[item.region];
          S.answers[i] = restored;
        }
        setStatus(`region ${item.region} of image ${i + 1} NOT saved: ${e.message}`, true);
      } finally {
        S.pending--;
        document.body.dataset.pending = String(S.pending);
        if (S.data && S.data.i === i) fillStored(S.data);
        updatePanel();
        updateList();
        requestRender();
      }
    });
  }

  function isAnswered(p) {
    const c = S.order[p];
    return Boolean(S.answers[c.image][c.region]);
  }

  function firstUnanswered(from) {
    for (let s = 0; s < S.order.length; s++) {
      const p = (from + s) % S.order.length;
      if (!isAnswered(p)) return p;
    }
    return null;
  }

  function advance() {
    const next = firstUnanswered((S.pos + 1) % S.order.length);
    if (next === null) {
      setStatus("every region is answered: press Done, or go back to change an answer");
      goTo(S.pos);
      return;
    }
    goTo(next);
  }

  function goTo(p) {
    if (S.paint) cancelPaint("moved to another region");
    stopClock();
    S.pos = Math.max(0, Math.min(S.order.length - 1, p));
    startClock();
    show();
  }

  function moveImage(step) {
    const c = current();
    const target = c.image + step;
    if (target < 0 || target >= S.manifest.images.length) return;
    goTo(S.order.findIndex((o) => o.image === target));
  }

  // --- mixed regions: the brush -----------------------------------------------------------
  function startPaint() {
    const c = current();
    const d = S.data;
    if (!d || d.i !== c.image) return;
    const list = d.pixelsOf.get(c.region);
    const buf = new Uint8Array(d.w * d.h).fill(VOID);
    const a = S.answers[c.image][c.region];
    // Start from what is known: the stored pixels, a whole answer, or the model's guess.
    if (a && a.kind === "pixels" && a.pixels && a.pixels.length === list.length) {
      for (let k = 0; k < list.length; k++) buf[list[k]] = a.pixels[k];
    } else {
      const start = a ? a.class : prediction(c.image, c.region);
      if (start !== undefined && start !== VOID) for (const k of list) buf[k] = start;
    }
    const guess = preChosen(c.image, c.region);
    const brush = typeof guess === "number" && guess !== VOID ? guess : S.lastBrush !== undefined ? S.lastBrush : 0;
    const middle = list[Math.floor(list.length / 2)];
    S.paint = { image: c.image, region: c.region, buf, brush, cursor: { x: middle % d.w, y: Math.floor(middle / d.w) } };
    $("paint").hidden = false;
    $("paint-region").textContent = String(c.region);
    document.body.classList.add("painting");
    updatePanel();
    render();
    setStatus("painting: drag over the region (only its pixels take the brush), Enter saves");
  }

  function setBrush(k) {
    S.paint.brush = k;
    if (k !== VOID) S.lastBrush = k;
    updatePanel();
  }

  function setRadius(r) {
    S.radius = Math.max(0, Math.min(40, r));
    $("brush").value = String(S.radius);
    $("brush-value").textContent = String(S.radius);
    requestRender();
  }

  // A disc of radius S.radius working pixels at (cx, cy); pixels outside the region are left alone.
  function stamp(cx, cy) {
    const d = S.data;
    const p = S.paint;
    const r = S.radius;
    for (let dy = -r; dy <= r; dy++) {
      const y = cy + dy;
      if (y < 0 || y >= d.h) continue;
      for (let dx = -r; dx <= r; dx++) {
        const x = cx + dx;
        if (x < 0 || x >= d.w || dx * dx + dy * dy > r * r) continue;
        const k = y * d.w + x;
        if (d.sp[k] === p.region) p.buf[k] = p.brush;
      }
    }
  }

  function strokeTo(point) {
    const from = S.drawing || point;
    const steps = Math.max(1, Math.ceil(Math.hypot(point.x - from.x, point.y - from.y) / Math.max(0.5, S.radius / 2)));
    for (let s = 1; s <= steps; s++) {
      stamp(Math.round(from.x + ((point.x - from.x) * s) / steps), Math.round(from.y + ((point.y - from.y) * s) / steps));
    }
    S.drawing = point;
  }

  function fillRest() {
    const list = S.data.pixelsOf.get(S.paint.region);
    for (const k of list) if (S.paint.buf[k] === VOID) S.paint.buf[k] = S.paint.brush;
    requestRender();
  }

  function savePaint() {
    const p = S.paint;
    const list = S.data.pixelsOf.get(p.region);
    const pixels = Array.from(list, (k) => p.buf[k]);
    const counts = new Map();
    for (const v of pixels) if (v !== VOID) counts.set(v, (counts.get(v) || 0) + 1);
    let major = VOID;
    for (const [v, n] of counts) if (major === VOID || n > counts.get(major) || (n === counts.get(major) && v < major)) major = v;
    const seconds = secondsNow();
    closePaint();
    save(p.image, { region: p.region, class: "mixed", pixels, seconds },
      { class: major, kind: "pixels", pixels, seconds, source: "annotator" });
    advance();
  }

  function cancelPaint(why) {
    closePaint();
    setStatus(`painting discarded${why ? ` (${why})` : ""}`);
    render();
  }

  function closePaint() {
    S.paint = null;
    S.drawing = null;
    $("paint").hidden = true;
    document.body.classList.remove("painting");
    updatePanel();
  }

  function pointToWork(event) {
    const d = S.data;
    const rect = $("overlay").getBoundingClientRect();
    const x = Math.floor(((event.clientX - rect.left) / rect.width) * d.w);
    const y = Math.floor(((event.clientY - rect.top) / rect.height) * d.h);
    return { x: Math.max(0, Math.min(d.w - 1, x)), y: Math.max(0, Math.min(d.h - 1, y)) };
  }

  // --- panel and list -----------------------------------------------------------------------
  function buildClassButtons() {
    const box = $("classes");
    for (const c of [...S.classes, S.voidClass]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cls";
      b.dataset.class = String(c.id);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = c.color;
      const key = document.createElement("kbd");
      key.textContent = c.key || " ";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = c.name;
      b.append(swatch, key, name);
      b.title = c.key ? `${c.name} (key ${c.key})` : c.name;
      b.addEventListener("click", (e) => {
        if (e.detail > 0) b.blur(); // a mouse click: Enter stays "confirm", not "click again"
        if (S.paint) setBrush(c.id); else answerWhole(c.id);
      });
      box.append(b);
    }
  }

  function buildList() {
    const list = $("list");
    S.chips = [];
    S.manifest.images.forEach((image, i) => {
      const row = document.createElement("div");
      row.className = "image-row";
      const head = document.createElement("div");
      head.className = "image-head";
      head.textContent = `${i + 1}. ${image.id} `;
      const count = document.createElement("span");
      count.className = "count";
      head.append(count);
      const chips = document.createElement("div");
      chips.className = "chips";
      row.append(head, chips);
      list.append(row);
      S.chips[i] = { count, buttons: new Map() };
      for (const r of image.regions) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "chip";
        b.textContent = String(r);
        b.dataset.image = String(i);
        b.dataset.region = String(r);
        b.addEventListener("click", (e) => {
          if (e.detail > 0) b.blur();
          goTo(S.order.findIndex((o) => o.image === i && o.region === r));
        });
        chips.append(b);
        S.chips[i].buttons.set(r, b);
      }
    });
  }

  function updateList() {
    const c = current();
    S.manifest.images.forEach((image, i) => {
      let done = 0;
      for (const [r, b] of S.chips[i].buttons) {
        const a = S.answers[i][r];
        if (a) done++;
        b.classList.toggle("answered", Boolean(a));
        b.classList.toggle("mixed", Boolean(a && a.kind === "pixels"));
        b.classList.toggle("current", c.image === i && c.region === r);
        b.style.background = a ? cssColour(a.kind === "pixels" ? null : a.class) : "";
        b.setAttribute("aria-label", `region ${r}: ${a ? (a.kind === "pixels" ? "mixed" : className(a.class)) : "unanswered"}`);
      }
      S.chips[i].count.textContent = `${done} / ${image.regions.length}`;
      S.chips[i].count.classList.toggle("complete", done === image.regions.length);
    });
    const chip = S.chips[c.image].buttons.get(c.region);
    if (chip && chip.scrollIntoView) chip.scrollIntoView({ block: "nearest" });
  }

  function cssColour(k) {
    if (k === null) return "";
    return k === VOID ? S.voidClass.color : (S.classes[k] || S.voidClass).color;
  }

  function updatePanel() {
    const c = current();
    if (!c) return;
    const image = S.manifest.images[c.image];
    const nth = image.regions.indexOf(c.region) + 1;
    $("where").textContent = `Image ${c.image + 1} of ${S.manifest.images.length} (${image.id}) · region ${c.region} · ${nth} of ${image.regions.length}`;
    const a = S.answers[c.image][c.region];
    let state = "unanswered";
    if (a && a.kind === "pixels") {
      const painted = a.pixels ? a.pixels.filter((v) => v !== VOID).length : 0;
      state = `answered: mixed, ${painted} of ${image.pixels[c.region]} pixels painted`;
    } else if (a) {
      state = `answered: ${className(a.class)}${a.source && a.source !== "annotator" ? ` (${a.source})` : ""}`;
    }
    $("answer-state").textContent = state;
    $("answer-state").className = a ? "answered" : "";
    $("suggestion").textContent = suggestionText(c);
    const chosen = preChosen(c.image, c.region);
    for (const b of $("classes").children) {
      const k = Number(b.dataset.class);
      b.classList.toggle("suggested", !S.paint && k === chosen);
      b.classList.toggle("brush", Boolean(S.paint) && k === S.paint.brush);
    }
    $("mixed").disabled = Boolean(S.paint);
    if (S.paint) {
      const brush = $("brush-class");
      brush.textContent = S.paint.brush === VOID ? "eraser (unpainted)" : className(S.paint.brush);
      brush.style.background = S.paint.brush === VOID ? "" : cssColour(S.paint.brush);
    }
  }

  function suggestionText(c) {
    if (S.paint) return "painting: pick the brush class with a click or its key";
    const a = S.answers[c.image][c.region];
    if (!S.manifest.model) return `round ${S.manifest.round} has no model yet: nothing pre-chosen, pick a class`;
    const p = S.predictions[c.image];
    if (p === undefined) return "computing the model's guess…";
    if (p.error) return `no model guess: ${p.error}`;
    const guess = p[c.region];
    if (guess === undefined) return "no model guess for this region";
    return `model's guess: ${className(guess)}${a ? "" : " (Enter confirms)"}`;
  }

  function setProgress(p) {
    $("progress-regions").textContent = `regions ${p.answered} / ${p.queried}`;
    $("progress-images").textContent = `images ${p.images_done} / ${p.images} done`;
    $("progress-fill").style.width = `${p.queried ? (100 * p.answered) / p.queried : 0}%`;
    document.body.dataset.answered = String(p.answered);
  }

  function setStatus(text, bad = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("bad", bad);
  }

  // --- input ------------------------------------------------------------------------------------
  function bindControls() {
    $("mixed").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); startPaint(); });
    $("prev").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); goTo(S.pos - 1); });
    $("next").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); goTo(S.pos + 1); });
    $("fill").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); fillRest(); });
    $("save-mixed").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); savePaint(); });
    $("cancel-mixed").addEventListener("click", (e) => { if (e.detail > 0) e.currentTarget.blur(); cancelPaint(); });
    $("brush").addEventListener("input", (e) => setRadius(Number(e.target.value)));
    $("done").addEventListener("click", finish);

    const canvas = $("overlay");
    canvas.addEventListener("pointerdown", (e) => {
      if (!S.data) return;
      const point = pointToWork(e);
      if (!S.paint) { pickAt(point); return; }
      canvas.setPointerCapture(e.pointerId);
      S.paint.cursor = point;
      S.drawing = null;
      strokeTo(point);
      requestRender();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!S.paint || !S.data) return;
      const point = pointToWork(e);
      S.paint.cursor = point;
      if (S.drawing) strokeTo(point);
      requestRender();
    });
    const end = () => { S.drawing = null; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);

    document.addEventListener("keydown", onKey);
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) { stopClock(); return; }
      startClock();
      if (S.stopped) return;
      api("/api/progress").then((r) => r.json()).then(setProgress).catch(() => {});
      refreshAnswers(current().image);
    });
    window.addEventListener("resize", () => { if (S.data) { layout(); render(); } });
    window.addEventListener("beforeunload", (e) => {
      if (S.pending > 0) e.preventDefault(); // an answer is still on its way to the server
    });
  }

  function pickAt(point) {
    const d = S.data;
    const id = d.sp[point.y * d.w + point.x];
    if (!d.queried.has(id)) { setStatus(`region ${id} is not queried in this round`); return; }
    goTo(S.order.findIndex((o) => o.image === d.i && o.region === id));
  }

  function onKey(e) {
    if (S.stopped || !S.manifest || e.ctrlKey || e.metaKey || e.altKey) return;
    const target = e.target;
    if (target instanceof HTMLInputElement && target.type === "range" && e.key.startsWith("Arrow")) return;
    if ((e.key === "Enter" || e.key === " ") && target instanceof HTMLButtonElement) return; // the focused button acts
    const handled = S.paint ? paintKey(e) : pickKey(e);
    if (handled) e.preventDefault();
  }

  function classKey(key) {
    if (key === "0") return VOID;
    return S.keyToClass.has(key) ? S.keyToClass.get(key) : undefined;
  }

  function pickKey(e) {
    const k = classKey(e.key);
    if (k !== undefined) { answerWhole(k); return true; }
    switch (e.key) {
      case "Enter": confirmChoice(); return true;
      case "M": startPaint(); return true;
      case "ArrowRight": case "ArrowDown": goTo(S.pos + 1); return true;
      case "ArrowLeft": case "ArrowUp": goTo(S.pos - 1); return true;
      case "PageDown": moveImage(1); return true;
      case "PageUp": moveImage(-1); return true;
      case "Home": { const f = firstUnanswered(0); goTo(f === null ? 0 : f); return true; }
      case "+": case "=": zoom(2); return true;
      case "-": zoom(0.5); return true;
      default: return false;
    }
  }

  function paintKey(e) {
    const k = classKey(e.key);
    if (k !== undefined) { setBrush(k); return true; }
    const p = S.paint;
    const step = Math.max(1, Math.ceil(S.radius / 2));
    const move = { ArrowRight: [step, 0], ArrowLeft: [-step, 0], ArrowDown: [0, step], ArrowUp: [0, -step] }[e.key];
    if (move) {
      p.cursor = { x: Math.max(0, Math.min(S.data.w - 1, p.cursor.x + move[0])), y: Math.max(0, Math.min(S.data.h - 1, p.cursor.y + move[1])) };
      requestRender();
      return true;
    }
    switch (e.key) {
      case " ": S.drawing = null; stamp(p.cursor.x, p.cursor.y); requestRender(); return true;
      case "F": fillRest(); return true;
      case "[": setRadius(S.radius - 1); return true;
      case "]": setRadius(S.radius + 1); return true;
      case "Enter": savePaint(); return true;
      case "Escape": cancelPaint(); return true;
      case "+": case "=": zoom(2); return true;
      case "-": zoom(0.5); return true;
      default: return false;
    }
  }

  function zoom(factor) {
    S.zoom = Math.max(1, Math.min(16, S.zoom * factor));
    layout();
    scrollToRegion();
    render();
  }

  async function finish() {
    if (S.stopped) return;
    if (S.paint) cancelPaint("Done pressed");
    stopClock();
    setStatus("saving…");
    await S.chain; // every queued answer reaches the store before the server stops
    try {
      const reply = await postJSON("/api/done", {});
      S.stopped = true;
      const p = reply.progress;
      $("finished-progress").textContent = `${p.answered} of ${p.queried} regions answered, ${p.images_done} of ${p.images} images done.`;
      $("finished-next").textContent = reply.next;
      $("finished").hidden = false;
      document.body.dataset.stopped = "1";
    } catch (e) {
      setStatus(`could not stop the server: ${e.message}`, true);
    }
  }

  function hexRgb(hex) {
    const v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  start().catch((e) => setStatus(`the annotator could not start: ${e.message}`, true));
})();
