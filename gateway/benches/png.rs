//! PNG encoding of a decoded 1024² image: the gateway's banded encoder
//! ([`gateway::image_io::encode_png`]) next to the png crate's own single-threaded fast mode,
//! on noise (what random-weight models decode to) and on a smooth image.
//!
//! `cargo bench -p gateway --bench png` (`-- --threads N` caps the bands). Prints a markdown
//! table: median of 9 encodes, ms, and the size.

use std::time::Instant;

use gateway::image_io::PngMetadata;
use image::RgbImage;

fn median_ms(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..9 {
        let t = Instant::now();
        size = f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], size)
}

fn png_crate_fast(rgb: &RgbImage) -> usize {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, rgb.width(), rgb.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().expect("header");
    w.write_image_data(rgb.as_raw()).expect("data");
    w.finish().expect("finish");
    out.len()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut s = 1u64;
    let noise = RgbImage::from_fn(1024, 1024, |_, _| {
        let mut px = [0u8; 3];
        for v in &mut px {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *v = (s >> 56) as u8;
        }
        image::Rgb(px)
    });
    let smooth = RgbImage::from_fn(1024, 1024, |x, y| {
        image::Rgb([(x / 4) as u8, (y / 4) as u8, ((x + y) / 8) as u8])
    });
    let meta = PngMetadata {
        prompt: "a bench",
        seed: 0,
        steps: 4,
        model: "bench",
    };
    println!("PNG encode of a 1024² RGB image, {threads} bands at most");
    println!();
    println!("| image | banded (ms, bytes) | png crate Fast (ms, bytes) |");
    println!("|---|---|---|");
    for (name, img) in [("noise", &noise), ("smooth", &smooth)] {
        let (ours, ours_size) = median_ms(|| {
            let zlib = gateway::png_bands::zlib_image_data(img.as_raw(), 3 * 1024, 1024, threads)
                .expect("encode");
            zlib.len()
        });
        let (full, _) = median_ms(|| {
            gateway::image_io::encode_png(img, &meta)
                .expect("png")
                .len()
        });
        let (theirs, theirs_size) = median_ms(|| png_crate_fast(img));
        println!(
            "| {name} | {ours:.2} ({ours_size} B of image data; whole PNG {full:.2} ms) | {theirs:.2} ({theirs_size} B) |"
        );
    }
}
