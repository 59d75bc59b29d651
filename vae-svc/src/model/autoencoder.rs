//! `AutoencoderKLFlux2` (diffusers `autoencoder_kl_flux2.py`, spec §1.4, §4.5): encoder,
//! `quant_conv`, `post_quant_conv`, decoder and the latent BatchNorm statistics, plus the
//! pipeline steps around them (`_encode_vae_image` + `_pack_latents`, and the decode
//! post-loop code: unpack, denormalise, unpatchify).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    Config,
    decoder::Decoder,
    encoder::Encoder,
    latents::{BatchNorm, pack, patchify, unpack, unpatchify},
    layers::{Conv2d, Padding},
    norm_stats::NormStats,
};

/// The FLUX.2 VAE. The dtype of its weights is the dtype it computes in.
#[derive(Debug, Clone)]
pub struct AutoencoderKLFlux2 {
    encoder: Encoder,
    decoder: Decoder,
    /// Restricted to the posterior-mean half of its outputs: the log-variance is never used.
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    bn: BatchNorm,
    latent_channels: usize,
    /// Channels of a decoded image.
    out_channels: usize,
    patch_size: [usize; 2],
    dtype: DType,
}

impl AutoencoderKLFlux2 {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let lc = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            let full = Conv2d::new(
                cfg,
                (2 * lc, 2 * lc, 1),
                1,
                Padding::same(0),
                vb.pp("quant_conv"),
            )?;
            Some(full.narrow_out(0, lc)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(
                cfg,
                (lc, lc, 1),
                1,
                Padding::same(0),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            bn: BatchNorm::new(cfg, vb.pp("bn"))?,
            latent_channels: lc,
            out_channels: cfg.out_channels,
            patch_size: cfg.patch_size,
            dtype: vb.dtype(),
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Channels of a decoded image.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The posterior mean (`latent_dist.mode()`; no sampling).
    /// (B, 3, H, W) in [-1, 1] -> (B, 32, H/8, W/8)
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(&x.to_dtype(self.dtype)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments.narrow(1, 0, self.latent_channels)?.contiguous(),
        }
    }

    /// Pipeline encode: posterior mean, patchify, BatchNorm-normalise, pack.
    /// (B, 3, H, W) in [-1, 1] -> (B, (H/16) * (W/16), 128)
    pub fn encode_packed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = self.encode_mean(x)?;
        pack(&self.bn.normalize(&patchify(&mean, self.patch_size)?)?)
    }

    /// Pipeline decode preparation: unpack, BatchNorm-denormalise, unpatchify.
    /// (B, h * w, 128) -> (B, 32, 2h, 2w) in the model dtype
    pub fn unpack_latents(&self, tokens: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let z = unpack(&tokens.to_dtype(self.dtype)?, grid)?;
        unpatchify(&self.bn.denormalize(&z)?, self.patch_size)
    }

    /// (B, 32, h, w) -> (B, 3, 8h, 8w) in the model dtype
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_up_from(self.decode_mid(z)?, 0, &mut NormStats::Local)
    }

    /// The model a tiled decode's statistics passes run ([`crate::tiling::decode_tiled`]): the
    /// same weights, with the up blocks' split-TF32 convolutions in one TF32 pass. Those
    /// passes only record group-norm moments, means over whole images, which TF32's ~2e-4
    /// relative error per convolution moves far less than the tiling itself moves the image;
    /// the final pass keeps the model's own arithmetic.
    pub fn for_statistics(&self) -> Self {
        Self {
            decoder: self.decoder.up_in_one_tf32_pass(),
            ..self.clone()
        }
    }

    /// The first part of [`Self::decode`], with global context: `post_quant_conv`, the
    /// decoder's `conv_in` and mid block. (B, 32, h, w) -> (B, C, h, w)
    pub fn decode_mid(&self, z: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward_mid(&conv.forward(z)?),
            None => self.decoder.forward_mid(z),
        }
    }

    /// [`Self::decode_mid`], then the first `blocks` up blocks on the whole image (the last
    /// without its upsampler; `Decoder::forward_up_to`): the part of a tiled decode that runs
    /// untiled, its group norms exact.
    pub fn decode_global(&self, z: &Tensor, blocks: usize) -> Result<Tensor> {
        self.decoder.forward_up_to(self.decode_mid(z)?, blocks)
    }

    /// The rest of [`Self::decode`] after [`Self::decode_global`] with `blocks`, local apart
    /// from its group-norm statistics (taken from `stats`). (B, C, h, w) -> (B, 3, H, W)
    pub fn decode_up_from(
        &self,
        h: Tensor,
        blocks: usize,
        stats: &mut NormStats,
    ) -> Result<Tensor> {
        self.decoder.forward_up_from(h, blocks, stats)
    }
}
