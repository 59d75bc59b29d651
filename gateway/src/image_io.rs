//! Input image decoding (PNG, JPEG, WebP) with size limits and EXIF orientation, and PNG
//! output with text metadata.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::GatewayError;

/// Bounds on an input image.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest encoded size, bytes.
    pub max_bytes: usize,
    /// Largest width or height, pixels.
    pub max_side: u32,
    /// Largest decoder allocation, bytes.
    pub max_alloc: u64,
}

/// A decoded input: RGB pixels plus the alpha channel when the image had one.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// RGB pixels, orientation applied.
    pub rgb: RgbImage,
    /// Alpha channel (255 = opaque), orientation applied; `None` for images without alpha.
    pub alpha: Option<GrayImage>,
}

/// Decodes `bytes` (PNG, JPEG or WebP) within `limits`; failures name `field`.
pub fn decode(
    bytes: &[u8],
    field: &str,
    limits: &ImageLimits,
) -> Result<DecodedImage, GatewayError> {
    let bad = |reason: String| GatewayError::invalid(field, reason);
    if bytes.is_empty() {
        return Err(bad("is empty".into()));
    }
    if bytes.len() > limits.max_bytes {
        return Err(bad(format!(
            "encoded image has {} bytes, the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read image: {e}")))?;
    if !matches!(
        reader.format(),
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP)
    ) {
        return Err(bad("not a PNG, JPEG or WebP image".into()));
    }
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| bad(format!("cannot read orientation: {e}")))?;
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    img.apply_orientation(orientation);
    let alpha = img.color().has_alpha().then(|| {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([rgba.get_pixel(x, y)[3]])
        })
    });
    Ok(DecodedImage {
        rgb: img.to_rgb8(),
        alpha,
    })
}

/// Decodes a mask image to 8-bit grey (luma of RGB; alpha ignored).
pub fn decode_mask(
    bytes: &[u8],
    field: &str,
    limits: &ImageLimits,
) -> Result<GrayImage, GatewayError> {
    let decoded = decode(bytes, field, limits)?;
    Ok(DynamicImage::ImageRgb8(decoded.rgb).to_luma8())
}

/// PNG text metadata written with every output image.
#[derive(Debug, Clone)]
pub struct PngMetadata<'a> {
    /// The prompt (UTF-8; stored as iTXt).
    pub prompt: &'a str,
    /// Seed of this image.
    pub seed: u64,
    /// Sampling steps.
    pub steps: u32,
    /// Model id.
    pub model: &'a str,
}

/// Encodes RGB u8 pixels as PNG with the metadata as text chunks; the image data is filtered
/// and compressed on every core ([`crate::png_bands`]).
pub fn encode_png(rgb: &RgbImage, meta: &PngMetadata<'_>) -> Result<Vec<u8>, png::EncodingError> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let zlib = crate::png_bands::zlib_image_data(rgb.as_raw(), 3 * width, height, threads)?;
    let mut out = Vec::with_capacity(zlib.len() + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, rgb.width(), rgb.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk("prompt".into(), meta.prompt.into())?;
        enc.add_text_chunk("seed".into(), meta.seed.to_string())?;
        enc.add_text_chunk("steps".into(), meta.steps.to_string())?;
        enc.add_itxt_chunk("model".into(), meta.model.into())?;
        enc.add_text_chunk("software".into(), "klein-serve".into())?;
        let mut writer = enc.write_header()?;
        writer.write_chunk(png::chunk::IDAT, &zlib)?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 1 << 20,
        max_side: 512,
        max_alloc: 64 << 20,
    };

    fn png_of(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn rgba_png_yields_rgb_and_alpha() {
        let img = image::RgbaImage::from_fn(8, 4, |x, _| {
            image::Rgba([x as u8 * 30, 1, 2, if x < 4 { 0 } else { 255 }])
        });
        let d = decode(&png_of(DynamicImage::ImageRgba8(img)), "image", &LIMITS).unwrap();
        assert_eq!(d.rgb.dimensions(), (8, 4));
        assert_eq!(d.rgb.get_pixel(5, 0)[0], 150);
        let alpha = d.alpha.unwrap();
        assert_eq!(
            (alpha.get_pixel(0, 0)[0], alpha.get_pixel(7, 3)[0]),
            (0, 255)
        );
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "is empty"),
            (b"definitely not an image", "not a PNG, JPEG or WebP"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR truncated", "cannot decode"),
        ];
        for (bytes, want) in cases {
            let err = decode(bytes, "inpaint.image", &LIMITS)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("inpaint.image: "), "{err}");
            assert!(err.contains(want), "{err}");
        }
        let big = png_of(DynamicImage::new_rgb8(600, 8));
        let err = decode(&big, "image", &LIMITS).unwrap_err().to_string();
        assert!(err.contains("cannot decode"), "{err}");
        let tight = ImageLimits {
            max_bytes: 10,
            ..LIMITS
        };
        let err = decode(&png_of(DynamicImage::new_rgb8(8, 8)), "image", &tight)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the limit is 10"), "{err}");
    }

    #[test]
    fn png_output_round_trips_with_metadata() {
        let rgb = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let meta = PngMetadata {
            prompt: "un chat — 猫",
            seed: 42,
            steps: 4,
            model: "tiny",
        };
        let bytes = encode_png(&rgb, &meta).unwrap();
        let decoder = png::Decoder::new(Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf.as_slice(), rgb.as_raw().as_slice());
        let info = reader.info();
        let itxt: Vec<_> = info
            .utf8_text
            .iter()
            .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
            .collect();
        assert!(
            itxt.contains(&("prompt".into(), "un chat — 猫".into())),
            "{itxt:?}"
        );
        let text: Vec<_> = info
            .uncompressed_latin1_text
            .iter()
            .map(|c| (c.keyword.clone(), c.text.clone()))
            .collect();
        assert!(text.contains(&("seed".into(), "42".into())), "{text:?}");
    }
}
