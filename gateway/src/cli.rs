//! The `klein` command-line client: generate, edit, inpaint and info against any gateway.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{self, generate_response::Event, image_service_client::ImageServiceClient},
};
use klein_runtime::server::{CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES};
use tokio_stream::StreamExt;

/// Client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Text-to-image.
    Generate(GenerateArgs),
    /// Image-to-image (--image, --strength) and/or multi-reference editing (--ref).
    Edit {
        #[command(flatten)]
        common: GenerateArgs,
        /// Init image for image-to-image.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Fraction of the schedule to run with --image, in [0, 1] (default 0.75).
        #[arg(long)]
        strength: Option<f32>,
    },
    /// Inpainting: repaint where the mask is white, or where the image is transparent.
    Inpaint {
        #[command(flatten)]
        common: GenerateArgs,
        /// Source image (its alpha channel is the mask when --mask is absent).
        #[arg(long)]
        image: PathBuf,
        /// Mask image, same size: white = repaint.
        #[arg(long)]
        mask: Option<PathBuf>,
        /// Fraction of the schedule to run, in [0, 1] (default 1.0).
        #[arg(long)]
        strength: Option<f32>,
    },
    /// Models, limits and services of the stack.
    Info,
}

/// Options shared by every generating subcommand.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Output width in pixels (multiple of 16; default 1024).
    #[arg(long, default_value_t = 0)]
    pub width: u32,
    /// Output height in pixels (multiple of 16; default 1024).
    #[arg(long, default_value_t = 0)]
    pub height: u32,
    /// Sampling steps (default: the model's).
    #[arg(long, default_value_t = 0)]
    pub steps: u32,
    /// Seed (random when absent; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    /// Guidance scale (base models only).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Negative prompt (base models with guidance > 1).
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Model id (default: the stack's default).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Reference image(s) for multi-reference editing.
    #[arg(long = "ref")]
    pub references: Vec<PathBuf>,
    /// A LoRA adapter of the model to apply, `NAME` or `NAME:SCALE` (repeatable; `klein info`
    /// lists each model's adapters).
    #[arg(long = "lora", value_name = "NAME[:SCALE]", value_parser = klein_proto::lora::parse_arg)]
    pub loras: Vec<pb::LoraAdapter>,
    /// Output PNG path; with several images, `-N` is added before the extension.
    #[arg(long, short, default_value = "klein.png")]
    pub out: PathBuf,
}

/// A failed client command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

fn read(path: &Path) -> Result<bytes::Bytes, CliError> {
    std::fs::read(path)
        .map(Into::into)
        .map_err(|source| CliError::Io {
            path: path.to_owned(),
            source,
        })
}

fn request(args: &GenerateArgs) -> Result<pb::GenerateRequest, CliError> {
    Ok(pb::GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        model: args.model.clone(),
        width: args.width,
        height: args.height,
        num_steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        num_images: args.num_images,
        mode: None,
        reference_images: args
            .references
            .iter()
            .map(|p| read(p))
            .collect::<Result<_, _>>()?,
        initial_noise: None,
        preview_every: 0,
        loras: args.loras.clone(),
    })
}

fn output_path(out: &Path, index: u32, count: u32) -> PathBuf {
    if count <= 1 {
        return out.to_owned();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("klein");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}

/// A line above the progress bar, or to `out` where the bar is hidden (output not a terminal):
/// indicatif drops `println` on a hidden bar, and with it the result line and the warnings.
fn say(bar: &ProgressBar, out: &mut impl std::io::Write, line: String) {
    if bar.is_hidden() {
        // A closed stderr loses the line, as a terminal that went away would.
        let _ = writeln!(out, "{line}");
    } else {
        bar.println(line);
    }
}

/// Runs `command` against the gateway at `addr`.
pub async fn run(addr: &str, command: Command) -> Result<(), CliError> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|source| CliError::Connect {
            addr: addr.into(),
            source,
        })?
        // Images arrive in few large frames, not hundreds of 16 KiB ones.
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .connect()
        .await
        .map_err(|source| CliError::Connect {
            addr: addr.into(),
            source,
        })?;
    let mut client = ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (req, out) = match command {
        Command::Info => {
            let caps = client
                .get_capabilities(pb::GetCapabilitiesRequest {})
                .await?
                .into_inner();
            println!("{caps:#?}");
            return Ok(());
        }
        Command::Generate(args) => (request(&args)?, args.out),
        Command::Edit {
            common,
            image,
            strength,
        } => {
            let mut req = request(&common)?;
            if let Some(path) = image {
                req.mode = Some(pb::generate_request::Mode::ImageToImage(
                    pb::ImageToImageInput {
                        image: read(&path)?,
                        strength,
                    },
                ));
            }
            (req, common.out)
        }
        Command::Inpaint {
            common,
            image,
            mask,
            strength,
        } => {
            let mut req = request(&common)?;
            let mask = mask.map(|m| read(&m)).transpose()?.unwrap_or_default();
            req.mode = Some(pb::generate_request::Mode::Inpaint(pb::InpaintInput {
                image: read(&image)?,
                mask,
                strength,
            }));
            (req, common.out)
        }
    };
    let count = req.num_images.max(1);
    let mut stream = client.generate(req).await?.into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    while let Some(event) = stream.next().await {
        match event?.event {
            Some(Event::Accepted(a)) => say(
                &bar,
                &mut std::io::stderr(),
                format!("request {} seed {}", a.request_id, a.seed),
            ),
            Some(Event::Stage(s)) => {
                let stage = pb::Stage::try_from(s.stage)
                    .map(|s| s.as_str_name())
                    .unwrap_or("STAGE");
                bar.set_message(stage.trim_start_matches("STAGE_").to_lowercase());
            }
            Some(Event::Step(s)) => {
                bar.set_length(u64::from(s.total_steps));
                bar.set_position(u64::from(s.step));
            }
            Some(Event::Image(img)) => {
                let path = output_path(&out, img.index, count);
                std::fs::write(&path, &img.png).map_err(|source| CliError::Io {
                    path: path.clone(),
                    source,
                })?;
                let t = img.timings.unwrap_or_default();
                say(
                    &bar,
                    &mut std::io::stderr(),
                    format!(
                        "wrote {} ({}x{}, seed {}) in {:.2}s (encode {:.2}s, denoise {:.2}s, decode {:.2}s)",
                        path.display(),
                        img.width,
                        img.height,
                        img.seed,
                        t.total_seconds,
                        t.encode_seconds,
                        t.denoise_seconds,
                        t.decode_seconds
                    ),
                );
                for w in img.warnings {
                    say(&bar, &mut std::io::stderr(), format!("warning: {w}"));
                }
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use indicatif::ProgressBar;

    use super::say;

    #[test]
    fn lines_reach_the_output_when_the_bar_is_hidden() {
        let mut out = Vec::new();
        say(&ProgressBar::hidden(), &mut out, "warning: tiled".into());
        assert_eq!(String::from_utf8(out).unwrap(), "warning: tiled\n");
    }
}
