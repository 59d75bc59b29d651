// The inpainting mask editor: the uploaded image on one canvas, the brush strokes on an
// overlay canvas at the image's resolution, and the mask (white = repaint, black = keep)
// kept in step on an offscreen canvas.

export class MaskEditor {
  constructor({ area, imageCanvas, overlay, brush, eraser, onPaint }) {
    this.area = area;
    this.imageCanvas = imageCanvas;
    this.overlay = overlay;
    this.brush = brush;
    this.eraser = eraser;
    this.onPaint = onPaint;
    this.mask = document.createElement('canvas');
    this.painted = false;
    this.last = null;
    overlay.addEventListener('pointerdown', (e) => this.down(e));
    overlay.addEventListener('pointermove', (e) => this.move(e));
    for (const ev of ['pointerup', 'pointerleave', 'pointercancel']) {
      overlay.addEventListener(ev, () => { this.last = null; });
    }
  }

  // Shows `bitmap` (an ImageBitmap) and starts an empty mask of its size.
  load(bitmap) {
    for (const c of [this.imageCanvas, this.overlay, this.mask]) {
      c.width = bitmap.width;
      c.height = bitmap.height;
    }
    this.imageCanvas.getContext('2d').drawImage(bitmap, 0, 0);
    this.area.hidden = false;
    this.clear();
  }

  clear() {
    this.overlay.getContext('2d').clearRect(0, 0, this.overlay.width, this.overlay.height);
    const m = this.mask.getContext('2d');
    m.fillStyle = '#000';
    m.fillRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  }

  point(e) {
    const r = this.overlay.getBoundingClientRect();
    const scale = this.overlay.width / r.width;
    return { x: (e.clientX - r.left) * scale, y: (e.clientY - r.top) * scale, scale };
  }

  down(e) {
    this.overlay.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke(a, b) {
    const width = Number(this.brush.value) * a.scale;
    const erase = this.eraser.checked;
    const draw = (ctx, color, op) => {
      ctx.save();
      ctx.globalCompositeOperation = op;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.lineCap = 'round';
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x + 0.01, b.y);
      ctx.stroke();
      ctx.restore();
    };
    draw(this.overlay.getContext('2d'), '#ff2050', erase ? 'destination-out' : 'source-over');
    draw(this.mask.getContext('2d'), erase ? '#000' : '#fff', 'source-over');
    if (!erase) this.painted = true;
    this.onPaint?.();
  }

  // The mask as a PNG blob, or null when nothing is painted.
  async maskBlob() {
    if (!this.painted) return null;
    return new Promise((resolve) => this.mask.toBlob(resolve, 'image/png'));
  }
}

// Whether `bitmap` has any pixel that is not fully opaque.
export function hasAlpha(bitmap) {
  const c = document.createElement('canvas');
  c.width = bitmap.width;
  c.height = bitmap.height;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const data = ctx.getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < data.length; i += 4) {
    if (data[i] < 255) return true;
  }
  return false;
}
