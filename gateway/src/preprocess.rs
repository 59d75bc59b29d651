//! Image preparation as diffusers' FLUX.2 klein pipelines do it (spec §4.6, §5.1, §5.3).
//!
//! - References: LANCZOS area cap to <= 1 MP, floor both sides to multiples of 16, then a pure
//!   centre crop (no second resample).
//! - Inpaint source: area cap, floor to 16, then **resize** (not crop) to the floored size.
//! - Init image (image-to-image): resized to the output size.
//! - Inpaint mask: resized like the source, binarised at 0.5, then bilinearly downsampled to
//!   the token grid (align_corners = false, as `F.interpolate`): each token reads the four
//!   central pixels of its 16 x 16 cell, so edges come out soft ({0, .25, .5, .75, 1}).
//!
//! Rust's LANCZOS is not PIL's bit for bit; inputs that need no resampling (sides already
//! multiples of 16, <= 1 MP) go through unchanged, which is what the parity tests use.

use image::{GrayImage, RgbImage, imageops::FilterType};

/// Largest reference / inpaint-source area before downscaling, pixels.
pub const MAX_CONDITION_PIXELS: u64 = 1024 * 1024;

fn resize<P: image::Pixel + 'static>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    w: u32,
    h: u32,
) -> image::ImageBuffer<P, Vec<P::Subpixel>> {
    if img.dimensions() == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, w, h, FilterType::Lanczos3)
    }
}

/// The size after the 1 MP area cap (`int(w * s)`, `int(h * s)` with `s = sqrt(1 MP / area)`).
pub fn capped_size(w: u32, h: u32) -> (u32, u32) {
    let area = u64::from(w) * u64::from(h);
    if area <= MAX_CONDITION_PIXELS {
        return (w, h);
    }
    let s = (MAX_CONDITION_PIXELS as f64 / area as f64).sqrt();
    ((f64::from(w) * s) as u32, (f64::from(h) * s) as u32)
}

/// Both sides floored to multiples of 16.
pub fn floor16(w: u32, h: u32) -> (u32, u32) {
    (w / 16 * 16, h / 16 * 16)
}

/// A reference image as `Flux2KleinPipeline` prepares it: cap, floor, centre crop.
pub fn reference(img: &RgbImage) -> RgbImage {
    let (cw, ch) = capped_size(img.width(), img.height());
    let capped = resize(img, cw, ch);
    let (w, h) = floor16(cw, ch);
    let left = (cw - w) / 2;
    let top = (ch - h) / 2;
    image::imageops::crop_imm(&capped, left, top, w, h).to_image()
}

/// The output size of an inpaint request for a source of `w` x `h`: cap, then floor.
pub fn inpaint_size(w: u32, h: u32) -> (u32, u32) {
    let (cw, ch) = capped_size(w, h);
    floor16(cw, ch)
}

/// The inpaint source resized to `(w, h)` (from [`inpaint_size`]).
pub fn inpaint_source(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (cw, ch) = capped_size(img.width(), img.height());
    resize(&resize(img, cw, ch), w, h)
}

/// The image-to-image init image at the output size.
pub fn init_image(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    resize(img, w, h)
}

/// A mask where transparent pixels (alpha 0) mean "repaint": `255 - alpha`.
pub fn mask_from_alpha(alpha: &GrayImage) -> GrayImage {
    GrayImage::from_fn(alpha.width(), alpha.height(), |x, y| {
        image::Luma([255 - alpha.get_pixel(x, y)[0]])
    })
}

/// The token-grid mask `[h_tok * w_tok]` (row-major, 1 = repaint) of a grey mask for an
/// output of `(w, h)` pixels.
pub fn mask_to_token_grid(mask: &GrayImage, w: u32, h: u32) -> Vec<f32> {
    let resized = resize(mask, w, h);
    let binary: Vec<f32> = resized
        .pixels()
        .map(|p| {
            if f32::from(p[0]) / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    bilinear_downsample(
        &binary,
        w as usize,
        h as usize,
        (w / 16) as usize,
        (h / 16) as usize,
    )
}

/// `F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False)` of a single-channel
/// row-major image.
fn bilinear_downsample(src: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    // Torch's source index for linear modes: max(0, (dst + 0.5) * scale - 0.5).
    let taps = |dst: usize, in_len: usize, out_len: usize| {
        let scale = in_len as f64 / out_len as f64;
        let real = ((dst as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (real.floor() as usize).min(in_len - 1);
        let i1 = (i0 + 1).min(in_len - 1);
        let frac = (real - i0 as f64) as f32;
        (i0, i1, frac)
    };
    let mut out = Vec::with_capacity(out_w * out_h);
    for oy in 0..out_h {
        let (y0, y1, fy) = taps(oy, h, out_h);
        for ox in 0..out_w {
            let (x0, x1, fx) = taps(ox, w, out_w);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_cap_and_floor_follow_the_pipeline() {
        assert_eq!(capped_size(1024, 1024), (1024, 1024));
        assert_eq!(capped_size(2048, 1024), (1448, 724));
        assert_eq!(floor16(1448, 724), (1440, 720));
        assert_eq!(inpaint_size(100, 70), (96, 64));
    }

    #[test]
    fn references_are_centre_cropped_without_resampling() {
        let img = RgbImage::from_fn(70, 40, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let r = reference(&img);
        assert_eq!(r.dimensions(), (64, 32));
        // left = (70 - 64) / 2 = 3, top = (40 - 32) / 2 = 4: pixels are copied, not resampled.
        assert_eq!(r.get_pixel(0, 0).0, [3, 4, 0]);
        assert_eq!(r.get_pixel(63, 31).0, [66, 35, 0]);
    }

    #[test]
    fn token_mask_reads_the_central_pixels_of_each_cell() {
        // 32 x 32 -> 2 x 2 tokens. Cell (0,0) fully masked; cell (1,0) masked only on its
        // central column pair's left half; cell (0,1) masked away from its centre.
        let mask = GrayImage::from_fn(32, 32, |x, y| {
            let on = if y < 16 { x < 16 || x == 23 } else { x < 4 };
            image::Luma([if on { 255 } else { 0 }])
        });
        let grid = mask_to_token_grid(&mask, 32, 32);
        assert_eq!(grid, vec![1.0, 0.5, 0.0, 0.0]);
        // Grey below 50 % is "keep", at or above is "repaint".
        let grey = GrayImage::from_pixel(16, 16, image::Luma([127]));
        assert_eq!(mask_to_token_grid(&grey, 16, 16), vec![0.0]);
        let grey = GrayImage::from_pixel(16, 16, image::Luma([128]));
        assert_eq!(mask_to_token_grid(&grey, 16, 16), vec![1.0]);
    }

    #[test]
    fn alpha_zero_means_repaint() {
        let alpha = GrayImage::from_fn(2, 1, |x, _| image::Luma([if x == 0 { 0 } else { 255 }]));
        let m = mask_from_alpha(&alpha);
        assert_eq!((m.get_pixel(0, 0)[0], m.get_pixel(1, 0)[0]), (255, 0));
    }
}
