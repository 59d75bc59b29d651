// The web page driven in headless Chromium (playwright-core + Debian's /usr/bin/chromium).
// Started by gateway/tests/http_browser.rs, which runs the stack and passes:
//   KLEIN_URL        the page, e.g. http://127.0.0.1:PORT/
//   KLEIN_INPUTS     a folder with input.png (opaque), alpha.png (transparent hole), ref0.png, ref1.png
//   KLEIN_ARTIFACTS  where the screenshots go
// Every image the page shows is checked against the HTTP API's answer to the same request.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.KLEIN_URL;
const INPUTS = process.env.KLEIN_INPUTS;
const ARTIFACTS = process.env.KLEIN_ARTIFACTS;
const TIMEOUT = 60_000;
let browser;
let page;
const pageErrors = [];

const input = (name) => path.join(INPUTS, name);
const shot = (name) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });

before(async () => {
  assert.ok(BASE && INPUTS && ARTIFACTS, 'KLEIN_URL, KLEIN_INPUTS and KLEIN_ARTIFACTS are set');
  await mkdir(ARTIFACTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  // Records every multipart body the page sends (Chromium does not hand file uploads to
  // request.postData()).
  await context.addInitScript(() => {
    const fetch = window.fetch;
    window.sentForms = [];
    const b64 = async (blob) => {
      const bytes = new Uint8Array(await blob.arrayBuffer());
      let bin = '';
      for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return btoa(bin);
    };
    window.fetch = async (url, init) => {
      if (init?.body instanceof FormData) {
        const entries = [];
        for (const [k, v] of init.body.entries()) entries.push([k, typeof v === 'string' ? v : { b64: await b64(v) }]);
        window.sentForms.push(entries);
      }
      return fetch(url, init);
    };
  });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  await page.goto(BASE);
});

after(async () => { await browser?.close(); });

// The API's answer (first image, base64) to a multipart request; files are input names or bytes.
async function api(endpoint, fields, files = []) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.set(k, typeof v === 'object' ? JSON.stringify(v) : String(v));
  for (const [k, file] of files) {
    const bytes = typeof file === 'string' ? await readFile(input(file)) : file;
    form.append(k, new Blob([bytes], { type: 'image/png' }), `${k}.png`);
  }
  const r = await fetch(new URL(endpoint, BASE), { method: 'POST', body: form });
  const body = await r.json();
  assert.equal(r.status, 200, JSON.stringify(body));
  return body.data[0].b64_json;
}

// Decoded RGBA pixels of a base64 PNG (decoded by the browser).
function pixels(b64) {
  return page.evaluate(async (b64) => {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    return { w: c.width, h: c.height, data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data) };
  }, b64);
}

async function setValue(selector, value) {
  await page.locator(selector).evaluate((el, v) => {
    el.value = v;
    el.dispatchEvent(new Event('input', { bubbles: true }));
  }, String(value));
}

// `size: null` leaves the size alone (inpainting keeps the image's size; the inputs are disabled).
async function fillCommon({ prompt, seed, steps = 4, size = 64 }) {
  await page.fill('#prompt', prompt);
  if (size) {
    await page.fill('#width', String(size));
    await page.fill('#height', String(size));
  }
  await page.fill('#steps', String(steps));
  await page.fill('#seed', String(seed));
}

// Clicks Generate; returns the result (base64 PNG) and the form the page sent: field name ->
// string or Buffer (the last of a name), plus `names` in order.
async function generate(seed) {
  const count = await page.evaluate(() => window.sentForms.length);
  await page.click('#generate');
  const outcome = await page.waitForFunction((s) => {
    const error = document.querySelector('#error');
    if (!error.hidden) return `error: ${error.textContent}`;
    return document.querySelector('#status').textContent === 'done'
      && document.querySelector('#result').dataset.seed === String(s) && 'done';
  }, seed);
  assert.equal(await outcome.jsonValue(), 'done');
  await page.waitForFunction(() => !document.querySelector('#generate').disabled);
  const src = await page.getAttribute('#result', 'src');
  assert.equal(await page.textContent('#result-seed'), String(seed));
  assert.equal(await page.getAttribute('#download', 'download'), `klein-${seed}.png`);
  const entries = await page.evaluate((n) => window.sentForms[n], count);
  const sent = { names: entries.map(([k]) => k) };
  for (const [k, v] of entries) sent[k] = typeof v === 'string' ? v : Buffer.from(v.b64, 'base64');
  return { b64: src.replace(/^data:image\/png;base64,/, ''), sent };
}

test('the page loads and names the served model', async () => {
  await page.waitForFunction(() => /tiny|klein/i.test(document.querySelector('#model-name').textContent));
  assert.equal(await page.textContent('#status'), 'idle');
});

test('text-to-image shows the image the API returns for the same request', async () => {
  await page.check('#mode-t2i');
  await fillCommon({ prompt: 'a red fox in the snow', seed: 7 });
  const { b64, sent } = await generate(7);
  assert.equal(sent.size, '64x64');
  assert.equal(sent.seed, '7');
  const want = await api('/v1/images/generations', { prompt: 'a red fox in the snow', size: '64x64', steps: 4, seed: 7 });
  assert.equal(b64, want, 'the page shows exactly the API image');
  const px = await pixels(b64);
  assert.deepEqual([px.w, px.h], [64, 64]);
  assert.ok(new Set(px.data).size > 10, 'the image is not blank');
  await shot('t2i');
});

test('chosen LoRA adapters are sent with their strengths', async () => {
  assert.equal(await page.isVisible('#lora-panel'), true, 'the model serves an adapter');
  await page.check('#mode-t2i');
  await fillCommon({ prompt: 'a red fox in the snow', seed: 7 });
  await page.check('#lora-list input[data-lora="style"]');
  await page.fill('#lora-list input[data-lora-scale="style"]', '0.8');
  const { b64, sent } = await generate(7);
  assert.deepEqual(JSON.parse(sent.loras), [{ name: 'style', scale: 0.8 }]);
  const want = await api('/v1/images/generations',
    { prompt: 'a red fox in the snow', size: '64x64', steps: 4, seed: 7, loras: [{ name: 'style', scale: 0.8 }] });
  assert.equal(b64, want, 'the page shows exactly the API image');
  const plain = await api('/v1/images/generations', { prompt: 'a red fox in the snow', size: '64x64', steps: 4, seed: 7 });
  assert.notEqual(b64, plain, 'the adapter changes the image');
  await shot('lora');
  await page.uncheck('#lora-list input[data-lora="style"]');
});

test('image-to-image sends the upload with the strength from the slider', async () => {
  await page.check('#mode-i2i');
  await fillCommon({ prompt: 'an oil painting', seed: 11 });
  await page.setInputFiles('#init-file', input('input.png'));
  await setValue('#strength', 0.5);
  assert.equal(await page.textContent('#strength-value'), '0.50');
  const { b64, sent } = await generate(11);
  assert.equal(sent.mode, 'image_to_image');
  assert.equal(sent.strength, '0.5');
  assert.deepEqual(sent.image, await readFile(input('input.png')));
  const want = await api('/v1/images/edits',
    { prompt: 'an oil painting', size: '64x64', steps: 4, seed: 11, strength: 0.5 }, [['image', 'input.png']]);
  assert.equal(b64, want);
  await shot('i2i');
});

test('inpainting sends the mask painted with the brush', async () => {
  await page.check('#mode-inpaint');
  await fillCommon({ prompt: 'a blue door', seed: 13, size: null });
  assert.equal(await page.isDisabled('#width'), true);
  await page.setInputFiles('#inpaint-file', input('input.png'));
  await page.waitForSelector('#paint-area:not([hidden])');
  assert.equal(await page.isDisabled('#use-alpha'), true, 'an opaque upload has no alpha to use');
  await page.locator('#paint-canvas').scrollIntoViewIfNeeded();
  const box = await page.locator('#paint-canvas').boundingBox();
  // A wide stroke across the middle: it covers the centres of the middle 16-pixel cells,
  // which decide the model's token mask.
  await setValue('#brush', 128);
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height * 0.5);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.8, box.y + box.height * 0.5, { steps: 8 });
  await page.mouse.up();
  const { b64, sent } = await generate(13);
  assert.equal(sent.mode, 'inpaint');
  assert.equal(sent.names.includes('size'), false, 'inpainting keeps the image size');
  const mask = await pixels(sent.mask.toString('base64'));
  const at = (x, y) => mask.data[(y * mask.w + x) * 4];
  assert.deepEqual([mask.w, mask.h], [64, 64], 'the mask has the image size');
  for (const [x, y] of [[24, 24], [40, 40], [32, 32]]) assert.equal(at(x, y), 255, `painted at ${x},${y}: white`);
  for (const [x, y] of [[2, 2], [32, 60], [60, 8]]) assert.equal(at(x, y), 0, `not painted at ${x},${y}: black`);
  const want = await api('/v1/images/edits',
    { prompt: 'a blue door', steps: 4, seed: 13, mode: 'inpaint', strength: 1 },
    [['image', 'input.png'], ['mask', sent.mask]]);
  assert.equal(b64, want, 'the page shows the API image for its mask');
  const keepAll = await api('/v1/images/edits',
    { prompt: 'a blue door', steps: 4, seed: 13, mode: 'inpaint', strength: 1 },
    [['image', 'input.png'], ['mask', await readFile(input('black.png'))]]);
  assert.notEqual(b64, keepAll, 'the painted mask changes the result');
  await shot('inpaint');
});

test("inpainting with the image's alpha sends no mask", async () => {
  await fillCommon({ prompt: 'a window', seed: 17, size: null });
  await page.setInputFiles('#inpaint-file', input('alpha.png'));
  await page.waitForFunction(() => !document.querySelector('#use-alpha').disabled);
  assert.equal(await page.isChecked('#use-alpha'), true);
  const { b64, sent } = await generate(17);
  assert.equal(sent.names.includes('mask'), false);
  const want = await api('/v1/images/edits',
    { prompt: 'a window', steps: 4, seed: 17, mode: 'inpaint', strength: 1 }, [['image', 'alpha.png']]);
  assert.equal(b64, want);
  await shot('inpaint-alpha');
});

test('reference images are sent in order', async () => {
  await page.check('#mode-t2i');
  await fillCommon({ prompt: 'the two objects side by side', seed: 19 });
  await page.setInputFiles('#ref-files', [input('ref0.png'), input('ref1.png')]);
  assert.equal(await page.locator('#ref-list img').count(), 2);
  const { b64 } = await generate(19);
  const want = await api('/v1/images/edits', { prompt: 'the two objects side by side', size: '64x64', steps: 4, seed: 19 },
    [['image[]', 'ref0.png'], ['image[]', 'ref1.png']]);
  assert.equal(b64, want);
  await shot('references');
  await page.click('#ref-list img');
  await page.click('#ref-list img');
  assert.equal(await page.locator('#ref-list img').count(), 0);
});

test('a running job shows step progress and previews, and cancel stops it', async () => {
  await page.check('#mode-t2i');
  await fillCommon({ prompt: 'a long job', seed: 23, steps: 200, size: 256 });
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/v1/jobs') && r.request().method() === 'POST'),
    page.click('#generate'),
  ]);
  const { id } = await response.json();
  await page.waitForFunction(() => /^step \d+\/200$/.test(document.querySelector('#status').textContent)
    && !document.querySelector('#preview').hidden);
  await shot('progress');
  await page.click('#cancel');
  await page.waitForFunction(() => document.querySelector('#status').textContent === 'cancelled');
  const job = await (await fetch(new URL(`/v1/jobs/${id}`, BASE))).json();
  assert.equal(job.status, 'cancelled');
  assert.ok(job.progress.step < 200, `cancelled at step ${job.progress.step}`);
  await shot('cancel');
  // The slot is free again: a small request runs at once.
  await fillCommon({ prompt: 'after the cancel', seed: 29 });
  await generate(29);
});

test('the history keeps this browser results across reloads', async () => {
  const before = await page.locator('#history img').count();
  assert.ok(before >= 5, `history has ${before} entries`);
  await page.reload();
  await page.waitForFunction((n) => document.querySelectorAll('#history img').length === n, before);
  await page.click('#history img >> nth=0');
  assert.equal(await page.textContent('#result-seed'), '29');
  await shot('history');
  assert.deepEqual(pageErrors, []);
});
