//! HTTP request bodies -> `pb::GenerateRequest`: the OpenAI Images fields plus the documented
//! extensions, from JSON (generations) or multipart (edits, jobs). Only the shape is checked
//! here; the values are validated once, by the gateway's `validate`, on the shared code path.

use std::collections::HashMap;

use axum::extract::{Multipart, multipart::MultipartError, rejection::JsonRejection};
use bytes::Bytes;
use image::{DynamicImage, GrayImage};
use klein_proto::pb::{self, generate_request::Mode};
use serde::Deserialize;

use super::error::{ApiError, Kind};
use crate::{
    config::Limits,
    image_io::{self, ImageLimits},
};

/// Largest `partial_images`, as in the OpenAI API.
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// Random seeds stay below 2^53 - 16: JSON numbers are exact there (JavaScript clients read
/// them as doubles), for the seed and the `seed + i` of every image.
const MAX_RANDOM_SEED: u64 = (1 << 53) - 16;

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    // The OS RNG failing is not the client's problem; fall back to the clock.
    if getrandom::fill(&mut buf).is_err() {
        buf = super::run::unix_now().to_le_bytes();
    }
    u64::from_le_bytes(buf) % MAX_RANDOM_SEED
}

/// Options shared by every image endpoint (JSON keys = multipart field names).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Options {
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub n: Option<u32>,
    /// `"<width>x<height>"` or `"auto"`.
    pub size: Option<String>,
    /// Only `b64_json`.
    pub response_format: Option<String>,
    /// Only `png`.
    pub output_format: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<u32>,
    /// Extension: the seed (random when absent; image i uses seed + i).
    pub seed: Option<u64>,
    /// Extension: sampling steps.
    #[serde(alias = "num_inference_steps")]
    pub steps: Option<u32>,
    /// Extension: CFG scale (base models).
    #[serde(alias = "guidance_scale")]
    pub guidance: Option<f32>,
    /// Extension: negative prompt (base models with guidance > 1).
    pub negative_prompt: Option<String>,
    /// Extension: strength of image-to-image and inpainting, in [0, 1].
    pub strength: Option<f32>,
    /// Extension: `edit` (images are references), `image_to_image` or `inpaint`.
    pub mode: Option<String>,
    /// Extension: LoRA adapters of the model to apply, `[{"name": …, "scale": …}]` (a JSON
    /// text in a multipart form).
    pub loras: Option<Vec<LoraOption>>,
}

/// One entry of `loras`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraOption {
    pub name: String,
    pub scale: Option<f32>,
}

/// Uploaded files of a multipart request.
#[derive(Debug, Clone, Default)]
pub struct Uploads {
    /// `image` / `image[]`, in order.
    pub images: Vec<Bytes>,
    /// `mask`.
    pub mask: Option<Bytes>,
    /// Extension `reference_image` / `reference_image[]`.
    pub references: Vec<Bytes>,
}

/// An image request ready for the shared code path.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub generate: pb::GenerateRequest,
    /// Stream server-sent events instead of one JSON response.
    pub stream: bool,
    /// Previews to send as partial images when streaming.
    pub partial_images: u32,
}

/// The rejection of a JSON body as an API error (413 when too large).
pub fn json_error(rejection: JsonRejection) -> ApiError {
    if rejection.status().as_u16() == 413 {
        ApiError::too_large(None, rejection.body_text())
    } else {
        ApiError::new(
            Kind::Grpc(tonic::Code::InvalidArgument),
            rejection.body_text(),
        )
    }
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status().as_u16() == 413 {
        ApiError::too_large(None, e.body_text())
    } else {
        ApiError::new(Kind::Grpc(tonic::Code::InvalidArgument), e.body_text())
    }
}

/// Reads a multipart form: files by their field names, every other field as text. A file
/// larger than `limits.max_input_image_bytes` is a 413.
pub async fn read_form(
    mut form: Multipart,
    limits: &Limits,
) -> Result<(Options, Uploads), ApiError> {
    let mut text = HashMap::new();
    let mut uploads = Uploads::default();
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        let data = field.bytes().await.map_err(multipart_error)?;
        let is_file = matches!(
            name.as_str(),
            "image" | "image[]" | "mask" | "reference_image" | "reference_image[]"
        );
        if is_file && data.len() as u64 > limits.max_input_image_bytes.0 {
            let param = name.trim_end_matches("[]");
            return Err(ApiError::too_large(
                Some(param),
                format!(
                    "{param}: {} bytes, the limit is {}",
                    data.len(),
                    limits.max_input_image_bytes.0
                ),
            ));
        }
        match name.as_str() {
            "image" | "image[]" => uploads.images.push(data),
            "mask" => uploads.mask = Some(data),
            "reference_image" | "reference_image[]" => uploads.references.push(data),
            _ => {
                let value = String::from_utf8(data.to_vec())
                    .map_err(|_| ApiError::invalid(&name, format!("{name}: must be UTF-8 text")))?;
                text.insert(name, value);
            }
        }
    }
    Ok((options_from_text(&text)?, uploads))
}

fn parse<T: std::str::FromStr>(
    text: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    text.get(key)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| ApiError::invalid(key, format!("{key}: cannot parse {v:?}")))
        })
        .transpose()
}

fn options_from_text(text: &HashMap<String, String>) -> Result<Options, ApiError> {
    let get = |k: &str| text.get(k).cloned();
    Ok(Options {
        prompt: get("prompt"),
        model: get("model"),
        n: parse(text, "n")?,
        size: get("size"),
        response_format: get("response_format"),
        output_format: get("output_format"),
        stream: parse(text, "stream")?,
        partial_images: parse(text, "partial_images")?,
        seed: parse(text, "seed")?,
        steps: match parse(text, "steps")? {
            None => parse(text, "num_inference_steps")?,
            s => s,
        },
        guidance: match parse(text, "guidance")? {
            None => parse(text, "guidance_scale")?,
            g => g,
        },
        negative_prompt: get("negative_prompt"),
        strength: parse(text, "strength")?,
        mode: get("mode"),
        loras: text
            .get("loras")
            .map(|v| {
                serde_json::from_str(v).map_err(|e| {
                    ApiError::invalid(
                        "loras",
                        format!("loras: expected [{{\"name\": …, \"scale\": …}}]: {e}"),
                    )
                })
            })
            .transpose()?,
    })
}

/// `"WxH"` -> (W, H); `"auto"` or absent -> (0, 0) (the gateway's default size).
fn size(value: Option<&str>) -> Result<(u32, u32), ApiError> {
    let Some(v) = value
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "auto")
    else {
        return Ok((0, 0));
    };
    let bad = || {
        ApiError::invalid(
            "size",
            format!("size: expected \"<width>x<height>\" or \"auto\", got {v:?}"),
        )
    };
    let (w, h) = v.split_once('x').ok_or_else(bad)?;
    let (w, h) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// An OpenAI mask (transparent = edit) as the gateway's grey mask (white = repaint); an opaque
/// mask is passed on as it is.
fn mask(bytes: Bytes, limits: &Limits) -> Result<Bytes, ApiError> {
    let img_limits = ImageLimits {
        max_bytes: usize::try_from(limits.max_input_image_bytes.0).unwrap_or(usize::MAX),
        max_side: 16384,
        max_alloc: 1 << 30,
    };
    let decoded = image_io::decode(&bytes, "inpaint.mask", &img_limits)
        .map_err(|e| ApiError::from(tonic::Status::from(e)))?;
    let Some(alpha) = decoded.alpha.filter(|a| a.pixels().any(|p| p[0] < 255)) else {
        return Ok(bytes);
    };
    let grey = GrayImage::from_fn(alpha.width(), alpha.height(), |x, y| {
        image::Luma([255 - alpha.get_pixel(x, y)[0]])
    });
    let mut out = Vec::new();
    DynamicImage::ImageLuma8(grey)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| ApiError::invalid("mask", format!("mask: {e}")))?;
    Ok(out.into())
}

/// Translates `opts` and `uploads` into the gRPC request. `need_image` is set by
/// `/v1/images/edits`, which requires at least one `image`.
pub fn build(
    opts: Options,
    uploads: Uploads,
    limits: &Limits,
    need_image: bool,
) -> Result<ImageRequest, ApiError> {
    match opts.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::invalid(
                "response_format",
                "response_format: url is not supported; use b64_json",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format: unknown value {other:?}; use b64_json"),
            ));
        }
    }
    if let Some(f) = opts.output_format.as_deref().filter(|f| *f != "png") {
        return Err(ApiError::invalid(
            "output_format",
            format!("output_format: only png is produced, got {f:?}"),
        ));
    }
    let prompt = opts
        .prompt
        .ok_or_else(|| ApiError::invalid("prompt", "prompt: is required"))?;
    for (key, value) in [("n", opts.n), ("steps", opts.steps)] {
        if value == Some(0) {
            return Err(ApiError::invalid(key, format!("{key}: must be at least 1")));
        }
    }
    let partial_images = opts.partial_images.unwrap_or(0);
    if partial_images > MAX_PARTIAL_IMAGES {
        return Err(ApiError::invalid(
            "partial_images",
            format!("partial_images: must be in [0, {MAX_PARTIAL_IMAGES}], got {partial_images}"),
        ));
    }
    let (width, height) = size(opts.size.as_deref())?;
    let Uploads {
        mut images,
        mask: mask_upload,
        references,
    } = uploads;
    if need_image && images.is_empty() {
        return Err(ApiError::invalid("image", "image: is required"));
    }
    let mode_name = opts
        .mode
        .as_deref()
        .unwrap_or(match (&mask_upload, opts.strength) {
            (Some(_), _) => "inpaint",
            (None, Some(_)) if !images.is_empty() => "image_to_image",
            _ => "edit",
        });
    let first = |images: &mut Vec<Bytes>| {
        (!images.is_empty())
            .then(|| images.remove(0))
            .ok_or_else(|| {
                ApiError::invalid("image", format!("image: is required with mode {mode_name}"))
            })
    };
    let mode = match mode_name {
        "inpaint" => Some(Mode::Inpaint(pb::InpaintInput {
            image: first(&mut images)?,
            mask: mask_upload
                .map(|m| mask(m, limits))
                .transpose()?
                .unwrap_or_default(),
            strength: opts.strength,
        })),
        "image_to_image" | "edit" if mask_upload.is_some() => {
            return Err(ApiError::invalid(
                "mask",
                format!("mask: only applies to mode inpaint, not {mode_name}"),
            ));
        }
        "image_to_image" => Some(Mode::ImageToImage(pb::ImageToImageInput {
            image: first(&mut images)?,
            strength: opts.strength,
        })),
        "edit" if opts.strength.is_some() => {
            return Err(ApiError::invalid(
                "strength",
                "strength: applies to modes image_to_image and inpaint, not edit",
            ));
        }
        "edit" => None,
        other => {
            return Err(ApiError::invalid(
                "mode",
                format!("mode: expected edit, image_to_image or inpaint, got {other:?}"),
            ));
        }
    };
    images.extend(references);
    Ok(ImageRequest {
        generate: pb::GenerateRequest {
            prompt,
            negative_prompt: opts.negative_prompt.unwrap_or_default(),
            model: opts.model.unwrap_or_default(),
            width,
            height,
            num_steps: opts.steps.unwrap_or(0),
            guidance_scale: opts.guidance,
            seed: Some(opts.seed.unwrap_or_else(random_seed)),
            num_images: opts.n.unwrap_or(1),
            mode,
            reference_images: images,
            initial_noise: None,
            preview_every: u32::from(partial_images > 0),
            loras: opts
                .loras
                .unwrap_or_default()
                .into_iter()
                .map(|l| pb::LoraAdapter {
                    name: l.name,
                    scale: l.scale,
                })
                .collect(),
        },
        stream: opts.stream.unwrap_or(false),
        partial_images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(prompt: &str) -> Options {
        Options {
            prompt: Some(prompt.into()),
            ..Options::default()
        }
    }

    #[test]
    fn sizes_parse_and_bad_ones_name_the_param() {
        assert_eq!(size(Some("512x256")).unwrap(), (512, 256));
        assert_eq!(size(Some("auto")).unwrap(), (0, 0));
        assert_eq!(size(None).unwrap(), (0, 0));
        for bad in ["512", "0x64", "axb", "512x"] {
            assert_eq!(size(Some(bad)).unwrap_err().param.as_deref(), Some("size"));
        }
    }

    #[test]
    fn random_seeds_are_exact_in_json() {
        let r = build(opts("x"), Uploads::default(), &Limits::default(), false).unwrap();
        assert!(r.generate.seed.unwrap() < 1 << 53);
    }

    #[test]
    fn url_responses_are_refused() {
        let mut o = opts("x");
        o.response_format = Some("url".into());
        let e = build(o, Uploads::default(), &Limits::default(), false).unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
        assert!(e.message.contains("url is not supported"), "{}", e.message);
    }

    #[test]
    fn modes_follow_mask_strength_and_mode() {
        let img = Bytes::from_static(b"img");
        let uploads = |n: usize| Uploads {
            images: vec![img.clone(); n],
            ..Uploads::default()
        };
        let l = Limits::default();
        let r = build(opts("x"), uploads(2), &l, true).unwrap();
        assert!(r.generate.mode.is_none());
        assert_eq!(
            r.generate.reference_images.len(),
            2,
            "edit: images are references"
        );
        let mut o = opts("x");
        o.strength = Some(0.5);
        let r = build(o, uploads(2), &l, true).unwrap();
        assert!(matches!(r.generate.mode, Some(Mode::ImageToImage(_))));
        assert_eq!(r.generate.reference_images.len(), 1);
        let mut o = opts("x");
        o.mode = Some("inpaint".into());
        let r = build(o, uploads(1), &l, true).unwrap();
        assert!(matches!(&r.generate.mode, Some(Mode::Inpaint(i)) if i.mask.is_empty()));
        let e = build(opts("x"), Uploads::default(), &l, true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("image"));
        let mut o = opts("x");
        o.mode = Some("outpaint".into());
        assert_eq!(
            build(o, uploads(1), &l, true).unwrap_err().param.as_deref(),
            Some("mode")
        );
    }

    #[test]
    fn loras_come_from_json_and_from_a_form_field() {
        let json: Options = serde_json::from_str(
            r#"{"prompt": "x", "loras": [{"name": "style", "scale": 0.8}, {"name": "ink"}]}"#,
        )
        .unwrap();
        let r = build(json, Uploads::default(), &Limits::default(), false).unwrap();
        let want = [
            pb::LoraAdapter {
                name: "style".into(),
                scale: Some(0.8),
            },
            pb::LoraAdapter {
                name: "ink".into(),
                scale: None,
            },
        ];
        assert_eq!(r.generate.loras, want);
        let form = HashMap::from([
            ("prompt".to_owned(), "x".to_owned()),
            (
                "loras".to_owned(),
                r#"[{"name": "style", "scale": 0.8}, {"name": "ink"}]"#.to_owned(),
            ),
        ]);
        let o = options_from_text(&form).unwrap();
        let r = build(o, Uploads::default(), &Limits::default(), false).unwrap();
        assert_eq!(r.generate.loras, want);
        for bad in [
            r#"{"name": "style"}"#,
            r#"[{"name": "a", "weight": 1}]"#,
            "style",
        ] {
            let form = HashMap::from([("loras".to_owned(), bad.to_owned())]);
            let e = options_from_text(&form).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("loras"), "{bad}");
        }
    }
}
