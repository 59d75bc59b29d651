//! What each request asks for: a deterministic mix of modes and sizes.

use std::io::Cursor;

use bytes::Bytes;
use image::{DynamicImage, RgbImage, RgbaImage};
use klein_proto::pb::{self, generate_request::Mode as PbMode};

/// Request kinds the generator can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Text-to-image.
    T2i,
    /// Image-to-image (strength 0.75).
    I2i,
    /// Inpainting with the init image's alpha channel as the mask.
    Inpaint,
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "t2i" => Ok(Self::T2i),
            "i2i" => Ok(Self::I2i),
            "inpaint" => Ok(Self::Inpaint),
            other => Err(format!(
                "unknown request kind {other:?} (t2i, i2i, inpaint)"
            )),
        }
    }
}

/// Parses an adapter set: `none`, or `NAME[:SCALE]` entries separated by `+` (`style:0.8+ink`).
pub fn parse_lora_set(s: &str) -> Result<Vec<pb::LoraAdapter>, String> {
    if s == "none" {
        return Ok(Vec::new());
    }
    s.split('+').map(klein_proto::lora::parse_arg).collect()
}

/// The request mix: request `i` gets kind `mix[i % mix.len()]`, size `sizes[i % sizes.len()]`
/// and, when any are given, the LoRA adapters `loras[i % loras.len()]`.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Kinds, repeated by weight (e.g. [T2i, T2i, I2i]).
    pub mix: Vec<Kind>,
    /// Sizes (width, height), multiples of 16.
    pub sizes: Vec<(u32, u32)>,
    /// Steps per request (0 = the model default).
    pub steps: u32,
    /// Seed of request 0; request i uses seed + i.
    pub seed: u64,
    pub prompt: String,
    /// Adapter sets to cycle through (an empty set: a plain request); none: every request plain.
    pub loras: Vec<Vec<pb::LoraAdapter>>,
}

fn png(img: DynamicImage) -> Bytes {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("in-memory PNG encoding cannot fail");
    out.into()
}

impl Workload {
    /// The kind of request `index`.
    pub fn kind_for(&self, index: u64) -> Kind {
        self.mix[(index % self.mix.len() as u64) as usize]
    }

    /// The request with index `index`.
    pub fn request(&self, index: u64) -> pb::GenerateRequest {
        let (width, height) = self.sizes[(index % self.sizes.len() as u64) as usize];
        let gradient = || {
            RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
            })
        };
        let mode = match self.kind_for(index) {
            Kind::T2i => None,
            Kind::I2i => Some(PbMode::ImageToImage(pb::ImageToImageInput {
                image: png(DynamicImage::ImageRgb8(gradient())),
                strength: Some(0.75),
            })),
            Kind::Inpaint => {
                let rgb = gradient();
                let rgba = RgbaImage::from_fn(width, height, |x, y| {
                    let p = rgb.get_pixel(x, y);
                    let hole = x >= width / 4
                        && x < 3 * width / 4
                        && y >= height / 4
                        && y < 3 * height / 4;
                    image::Rgba([p[0], p[1], p[2], if hole { 0 } else { 255 }])
                });
                Some(PbMode::Inpaint(pb::InpaintInput {
                    image: png(DynamicImage::ImageRgba8(rgba)),
                    mask: Bytes::new(),
                    strength: None,
                }))
            }
        };
        pb::GenerateRequest {
            prompt: self.prompt.clone(),
            width,
            height,
            num_steps: self.steps,
            seed: Some(self.seed.wrapping_add(index)),
            num_images: 1,
            mode,
            loras: match self.loras.len() {
                0 => Vec::new(),
                n => self.loras[(index % n as u64) as usize].clone(),
            },
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cycle_through_the_adapter_sets() {
        let sets = ["none", "style:0.8+ink"]
            .map(|s| parse_lora_set(s).unwrap())
            .to_vec();
        assert!(sets[0].is_empty());
        assert_eq!(
            (sets[1][0].name.as_str(), sets[1][0].scale, sets[1][1].scale),
            ("style", Some(0.8), None)
        );
        assert!(parse_lora_set("style:x").is_err() && parse_lora_set("a++b").is_err());
        let w = Workload {
            mix: vec![Kind::T2i],
            sizes: vec![(64, 64)],
            steps: 2,
            seed: 0,
            prompt: "x".into(),
            loras: sets,
        };
        assert!(w.request(0).loras.is_empty());
        assert_eq!(w.request(1).loras.len(), 2);
        assert!(w.request(2).loras.is_empty());
    }
}
