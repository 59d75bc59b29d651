// The klein web app: builds a /v1/jobs request from the form, polls the job for progress and
// previews, shows the result with its seed and a download, and keeps a small history.

import { MaskEditor, hasAlpha } from './paint.js';
import * as history from './history.js';

const $ = (id) => document.getElementById(id);
const POLL_MS = 200;
const KEY_STORE = 'klein.apiKey';
let caps = null;
let job = null;
let references = [];
let inpaintFile = null;

const editor = new MaskEditor({
  area: $('paint-area'), imageCanvas: $('paint-image'), overlay: $('paint-canvas'),
  brush: $('brush'), eraser: $('eraser'),
  onPaint: () => { $('use-alpha').checked = false; },
});

function mode() {
  return document.querySelector('input[name=mode]:checked').value;
}

function showMode() {
  $('i2i-panel').hidden = mode() !== 'i2i';
  $('inpaint-panel').hidden = mode() !== 'inpaint';
  for (const id of ['width', 'height']) {
    $(id).disabled = mode() === 'inpaint';
    $(id).title = mode() === 'inpaint' ? "inpainting keeps the image's size" : '';
  }
}

function setStatus(text, fraction) {
  $('status').textContent = text;
  if (fraction !== undefined) $('progress').value = fraction;
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

// fetch() with the API key (when one is set); a 401 opens the key box.
async function api(path, init = {}) {
  const key = localStorage.getItem(KEY_STORE);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const r = await fetch(path, { ...init, headers });
  if (r.status === 401) $('key-box').open = true;
  return r;
}

function pngUrl(b64) {
  return `data:image/png;base64,${b64}`;
}

async function loadCapabilities() {
  try {
    const r = await api('v1/capabilities');
    caps = await r.json();
    if (!r.ok) throw new Error(caps.error?.message ?? r.statusText);
    const m = caps.models[0];
    $('model-name').textContent = m ? `${m.id} · ${m.distilled ? 'distilled' : 'base'}, ${m.default_steps} steps` : 'no model yet';
    $('steps').placeholder = m ? `${m.default_steps}` : 'default';
    $('guidance-label').hidden = !m || m.distilled;
    showAdapters(m?.adapters ?? []);
  } catch (e) {
    $('model-name').textContent = `gateway unavailable: ${e.message}`;
  }
}

// One checkbox and strength per adapter of the model (GET /v1/capabilities).
function showAdapters(names) {
  const list = $('lora-list');
  list.replaceChildren(...names.map((name) => {
    const label = document.createElement('label');
    const on = Object.assign(document.createElement('input'), { type: 'checkbox' });
    on.dataset.lora = name;
    const scale = Object.assign(document.createElement('input'), {
      type: 'number', step: '0.05', min: '-8', max: '8', value: '1', title: 'strength',
    });
    scale.dataset.loraScale = name;
    label.append(on, ` ${name} `, scale);
    return label;
  }));
  $('lora-panel').hidden = names.length === 0;
}

// The checked adapters with their strengths, as the `loras` field takes them.
function chosenAdapters() {
  return [...document.querySelectorAll('#lora-list input[data-lora]:checked')].map((on) => {
    const scale = document.querySelector(`#lora-list input[data-lora-scale="${on.dataset.lora}"]`);
    return { name: on.dataset.lora, scale: Number(scale.value) };
  });
}

async function buildForm() {
  const f = new FormData();
  f.set('prompt', $('prompt').value);
  for (const [key, el] of [['steps', 'steps'], ['seed', 'seed'], ['n', 'count']]) {
    if ($(el).value !== '') f.set(key, $(el).value);
  }
  if (!$('guidance-label').hidden && $('guidance').value !== '') f.set('guidance', $('guidance').value);
  f.set('partial_images', '3');
  const m = mode();
  if (m !== 'inpaint') f.set('size', `${$('width').value}x${$('height').value}`);
  if (m === 'i2i') {
    const file = $('init-file').files[0];
    if (!file) throw new Error('choose an init image');
    f.set('mode', 'image_to_image');
    f.append('image', file);
    f.set('strength', $('strength').value);
  } else if (m === 'inpaint') {
    if (!inpaintFile) throw new Error('choose an image to inpaint');
    f.set('mode', 'inpaint');
    f.append('image', inpaintFile);
    if (!$('use-alpha').checked) {
      const mask = await editor.maskBlob();
      if (!mask) throw new Error("paint the area to repaint, or use the image's alpha");
      f.append('mask', mask, 'mask.png');
    }
    f.set('strength', $('inpaint-strength').value);
  }
  for (const r of references) f.append('reference_image[]', r);
  const loras = chosenAdapters();
  if (loras.length) f.set('loras', JSON.stringify(loras));
  return f;
}

function describe(j) {
  const p = j.progress;
  switch (j.status) {
    case 'queued': return [`queued (position ${j.queue_position ?? '?'})`, 0];
    case 'running':
      if (p.stage === 'denoising' && p.total_steps) return [`step ${p.step}/${p.total_steps}`, p.step / p.total_steps];
      return [`${p.stage ?? 'starting'}…`, p.stage === 'decoding' ? 1 : 0];
    case 'completed': return ['done', 1];
    case 'cancelled': return ['cancelled', 0];
    default: return [`failed`, 0];
  }
}

function showResult(entry) {
  $('result-box').hidden = false;
  $('result').src = entry.url;
  $('result').dataset.seed = entry.seed;
  $('result-seed').textContent = entry.seed;
  $('result-size').textContent = `${entry.width}×${entry.height}`;
  $('download').href = entry.url;
  $('download').download = `klein-${entry.seed}.png`;
}

async function finished(j) {
  const images = j.result?.data ?? [];
  $('result-extra').replaceChildren();
  for (const [i, img] of images.entries()) {
    const entry = { url: pngUrl(img.b64_json), seed: img.seed, width: img.width, height: img.height };
    if (i === 0) showResult(entry);
    else {
      const t = document.createElement('img');
      t.src = entry.url;
      t.onclick = () => showResult(entry);
      $('result-extra').append(t);
    }
    const png = await (await fetch(entry.url)).blob();
    await history.add({ png, seed: img.seed, width: img.width, height: img.height, prompt: $('prompt').value, mode: mode() });
  }
  await renderHistory();
}

async function poll(id) {
  while (job === id) {
    const r = await api(`v1/jobs/${id}`);
    const j = await r.json();
    if (!r.ok) { showError(j.error?.message ?? r.statusText); break; }
    const [text, fraction] = describe(j);
    setStatus(text, fraction);
    if (j.preview_b64_json) {
      $('preview').src = pngUrl(j.preview_b64_json);
      $('preview').hidden = false;
    }
    if (j.status === 'completed') {
      $('preview').hidden = true;
      await finished(j);
    }
    if (j.status === 'failed') showError(j.error?.message ?? 'failed');
    if (!['queued', 'running'].includes(j.status)) break;
    await new Promise((res) => setTimeout(res, POLL_MS));
  }
  if (job === id) done();
}

function done() {
  job = null;
  $('generate').disabled = false;
  $('cancel').disabled = true;
}

async function submit(e) {
  e.preventDefault();
  showError('');
  $('preview').hidden = true;
  let body;
  try { body = await buildForm(); } catch (err) { showError(err.message); return; }
  $('generate').disabled = true;
  setStatus('submitting…', 0);
  const r = await api('v1/jobs', { method: 'POST', body });
  const j = await r.json();
  if (!r.ok) {
    showError(j.error?.message ?? r.statusText);
    setStatus('failed', 0);
    done();
    return;
  }
  job = j.id;
  $('cancel').disabled = false;
  poll(j.id);
}

async function cancel() {
  const id = job;
  if (!id) return;
  job = null;
  const r = await api(`v1/jobs/${id}`, { method: 'DELETE' });
  const j = await r.json();
  setStatus(r.ok ? describe(j)[0] : `cancel failed: ${j.error?.message}`, 0);
  done();
}

async function renderHistory() {
  const items = await history.list();
  $('history').replaceChildren(...items.map((h) => {
    const img = document.createElement('img');
    const url = URL.createObjectURL(h.png);
    img.src = url;
    img.title = `${h.prompt} (seed ${h.seed})`;
    img.dataset.seed = h.seed;
    img.onclick = () => {
      showResult({ url, seed: h.seed, width: h.width, height: h.height });
      $('prompt').value = h.prompt;
    };
    return img;
  }));
}

async function loadInpaintImage(file) {
  inpaintFile = file;
  const bitmap = await createImageBitmap(file);
  editor.load(bitmap);
  const alpha = hasAlpha(bitmap);
  $('use-alpha').disabled = !alpha;
  $('use-alpha').checked = alpha;
}

function showReferences() {
  $('ref-list').replaceChildren(...references.map((file, i) => {
    const img = document.createElement('img');
    img.src = URL.createObjectURL(file);
    img.title = 'click to remove';
    img.onclick = () => { references.splice(i, 1); showReferences(); };
    return img;
  }));
}

for (const el of document.querySelectorAll('input[name=mode]')) el.addEventListener('change', showMode);
$('strength').addEventListener('input', () => { $('strength-value').textContent = Number($('strength').value).toFixed(2); });
$('inpaint-strength').addEventListener('input', () => {
  $('inpaint-strength-value').textContent = Number($('inpaint-strength').value).toFixed(2);
});
$('init-file').addEventListener('change', () => {
  const f = $('init-file').files[0];
  $('init-preview').hidden = !f;
  if (f) $('init-preview').src = URL.createObjectURL(f);
});
$('inpaint-file').addEventListener('change', () => {
  const f = $('inpaint-file').files[0];
  if (f) loadInpaintImage(f).catch((e) => showError(e.message));
});
$('ref-files').addEventListener('change', () => {
  references.push(...$('ref-files').files);
  $('ref-files').value = '';
  showReferences();
});
$('clear-mask').addEventListener('click', () => editor.clear());
$('api-key').value = localStorage.getItem(KEY_STORE) ?? '';
$('api-key').addEventListener('change', () => {
  const key = $('api-key').value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  loadCapabilities();
});
$('reuse-seed').addEventListener('click', () => { $('seed').value = $('result').dataset.seed ?? ''; });
$('clear-history').addEventListener('click', async () => { await history.clear(); await renderHistory(); });
$('cancel').addEventListener('click', cancel);
$('form').addEventListener('submit', submit);
showMode();
loadCapabilities();
renderHistory();
