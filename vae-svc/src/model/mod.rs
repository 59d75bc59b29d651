//! `AutoencoderKLFlux2`, the FLUX.2 VAE, in candle (spec §1.4, §3.4, §4.5).
//!
//! Same architecture as the SD / FLUX.1 VAE apart from a 32-channel latent, plus the FLUX.2
//! latent layout: 2x2 patchify to 128 channels, BatchNorm running statistics, token packing.
//! Rust field names are the diffusers checkpoint key segments; BFL's `ae.safetensors` is read
//! through [`bfl::BflBackend`]. Reference: diffusers 0.42.1
//! `models/autoencoders/autoencoder_kl_flux2.py` and `vae.py`.
//!
//! Every block is written so that its peak memory is a small, known multiple of its largest
//! activation: intermediates are dropped as soon as the next exists, group norms and
//! convolutions work in bounded chunks, and the mid-block attention processes queries in
//! blocks ([`Chunking`]).
//!
//! # Layout
//! - [`config`]: `config.json` and the execution limits.
//! - [`layers`]: banded Conv2d and Linear; [`norm`]: chunked GroupNorm (+ SiLU);
//!   [`norm_stats`]: image-wide group-norm statistics for tiled decoding.
//! - [`resnet`], [`attention`], [`sampling`]: ResNet block, mid-block attention,
//!   asymmetric-pad downsample and nearest upsample.
//! - [`blocks`]: down, up and mid blocks; [`encoder`], [`decoder`].
//! - [`latents`]: patchify, BatchNorm statistics, token pack / unpack.
//! - [`autoencoder`]: the top-level model; [`bfl`]: BFL key mapping.

pub mod attention;
pub mod autoencoder;
pub mod bfl;
pub mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod latents;
pub mod layers;
pub mod norm;
pub mod norm_stats;
pub mod resnet;
pub mod sampling;

pub use autoencoder::AutoencoderKLFlux2;
pub use config::{BandCopies, Chunking, Config, ConvCopies};
