//! The `vae/config.json` of `AutoencoderKLFlux2` (spec §1.4), plus the execution limits the
//! model honours (how large a score matrix or a convolution band may grow).

use std::cell::Cell;

use candle_core::{Device, conv::CudnnFwdAlgo};
use klein_kernels::ConvPrecision;
use serde::Deserialize;

/// Execution limits: the largest temporary one chunked operation may allocate, and how
/// convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Largest attention score block (queries x keys, f32, both the scores and their softmax)
    /// the mid-block attention may hold at once, bytes.
    pub attention_bytes: u64,
    /// Largest working set of one convolution band or group-norm chunk, bytes, unless the job
    /// running on this thread planned another ([`with_op_bytes`]).
    pub op_bytes: u64,
    /// cuDNN forward algorithm of every convolution; `None` = cuDNN's heuristic choice (whose
    /// workspace is not bounded). Ignored without cuDNN.
    pub conv_algo: Option<CudnnFwdAlgo>,
    /// Whether a convolution materialises its im2col rows (candle's CPU and plain-CUDA
    /// convolutions do, and cuDNN's explicit GEMM algorithm in its workspace; cuDNN's implicit
    /// ones do not): the band plan and the memory estimate count them only then.
    pub conv_im2col: bool,
    /// The arithmetic of the f32 convolutions on cuDNN (split TF32 by default; elsewhere always
    /// exact).
    pub conv_precision: ConvPrecision,
    /// Copies of a band's input and output rows a convolution holds (the band plan and the
    /// memory estimate count them), [`ConvCopies`].
    pub conv_copies: ConvCopies,
}

thread_local! {
    /// The operation chunk of the job this thread is running, if it planned one.
    static JOB_OP_BYTES: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` with `bytes` as the operation chunk of every convolution and group norm it runs on
/// this thread (a job's planned chunk: the service sizes it per request from the activation
/// capacity, `MemoryModel::op_chunk_ladder`), then restores the one before, also on unwinding.
pub fn with_op_bytes<R>(bytes: u64, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            JOB_OP_BYTES.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(JOB_OP_BYTES.with(|c| c.replace(Some(bytes))));
    f()
}

/// The operation chunk in force on this thread: the running job's, else `configured`.
pub fn op_bytes_in_force(configured: u64) -> u64 {
    JOB_OP_BYTES.with(Cell::get).unwrap_or(configured)
}

/// Copies of a convolution band's rows alive at once where each band's rows are copied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandCopies {
    /// The padded input rows and their copy; on cuDNN with TF32 arithmetic its NHWC copy of
    /// them, and with split TF32 the high part (f32) and the low part (fp16; and the high part
    /// in fp16 for weights that are not exact in TF32).
    pub input: usize,
    /// The output rows and the residual's (or the biased copy); on cuDNN with TF32 arithmetic
    /// its NHWC output, and with split TF32 the low passes' fp16 output too.
    pub output: usize,
}

impl BandCopies {
    /// The copies of a convolution run `through_cudnn` at `precision`.
    pub fn new(through_cudnn: bool, precision: ConvPrecision) -> Self {
        let (input, output) = match (through_cudnn, precision) {
            (false, _) | (true, ConvPrecision::Exact) => (2, 2),
            (true, ConvPrecision::Tf32) => (3, 3),
            // Input 3.5–4 and output 3.5 copies since the low parts run on fp16.
            (true, ConvPrecision::SplitTf32) => (5, 4),
        };
        Self { input, output }
    }
}

/// The band copies of the two ways a convolution runs in bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvCopies {
    /// Stride 1 with the same padding on every side (every decoder convolution): on cuDNN with
    /// TF32 arithmetic each band transposes (and splits) the input rows it reads straight from
    /// the input and writes its rows into the one output (`klein_kernels::conv2d_banded`).
    pub same: BandCopies,
    /// Any other (the encoder's downsamplers): each band's padded input rows are copied out,
    /// and its output rows copied into the output.
    pub other: BandCopies,
}

impl ConvCopies {
    /// The copies of convolutions run `through_cudnn` at `precision`.
    pub fn new(through_cudnn: bool, precision: ConvPrecision) -> Self {
        let other = BandCopies::new(through_cudnn, precision);
        let same = match (through_cudnn, precision) {
            (false, _) | (true, ConvPrecision::Exact) => other,
            // The NHWC input rows; the NHWC output rows.
            (true, ConvPrecision::Tf32) => BandCopies {
                input: 1,
                output: 1,
            },
            // The high part (f32) and the low part and high part (fp16); the NHWC output and
            // the low passes' fp16 output.
            (true, ConvPrecision::SplitTf32) => BandCopies {
                input: 2,
                output: 2,
            },
        };
        Self { same, other }
    }

    /// The copies of a convolution of `stride`, its padding the same on every side or not.
    pub fn of(&self, stride: usize, same_padding: bool) -> BandCopies {
        if stride == 1 && same_padding {
            self.same
        } else {
            self.other
        }
    }
}

impl Chunking {
    /// These limits for convolutions on `device`: through cuDNN on CUDA when built with it.
    pub fn on(self, device: &Device) -> Self {
        self.through_cudnn(cfg!(feature = "cudnn") && device.is_cuda())
    }

    /// These limits for convolutions run through cuDNN or not.
    pub fn through_cudnn(self, through_cudnn: bool) -> Self {
        Self {
            conv_im2col: materialises_im2col(through_cudnn, self.conv_algo),
            conv_copies: ConvCopies::new(through_cudnn, self.conv_precision),
            ..self
        }
    }
}

/// Whether convolutions run `through_cudnn` with `algo` hold their im2col rows.
fn materialises_im2col(through_cudnn: bool, algo: Option<CudnnFwdAlgo>) -> bool {
    !through_cudnn || algo == Some(CudnnFwdAlgo::Gemm)
}

impl Default for Chunking {
    /// 256 MiB score blocks, 128 MiB operation chunks, cuDNN's implicit precomputed GEMM (a
    /// small workspace, the same algorithm for every shape), split-TF32 arithmetic.
    fn default() -> Self {
        Self {
            attention_bytes: 256 << 20,
            op_bytes: 128 << 20,
            conv_algo: Some(CudnnFwdAlgo::ImplicitPrecompGemm),
            conv_im2col: true,
            conv_precision: ConvPrecision::SplitTf32,
            conv_copies: ConvCopies::new(false, ConvPrecision::Exact),
        }
    }
}

/// `AutoencoderKLFlux2` configuration. Defaults are the diffusers class defaults, which equal
/// the released FLUX.2 VAE (84 M parameters).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Image channels in (RGB).
    pub in_channels: usize,
    /// Image channels out (RGB).
    pub out_channels: usize,
    /// One `DownEncoderBlock2D` per entry.
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per entry.
    pub up_block_types: Vec<String>,
    /// Encoder widths per stage (and decoder widths unless `decoder_block_out_channels`).
    pub block_out_channels: Vec<usize>,
    /// Decoder widths per stage when they differ from the encoder's (small-decoder variants);
    /// diffusers writes `null` otherwise.
    pub decoder_block_out_channels: Option<Vec<usize>>,
    /// ResNet blocks per encoder stage (the decoder has one more).
    pub layers_per_block: usize,
    /// Activation; only `silu` exists in this model.
    pub act_fn: String,
    /// Channels of the latent (the posterior mean; the encoder emits twice as many).
    pub latent_channels: usize,
    /// GroupNorm groups everywhere (eps 1e-6).
    pub norm_num_groups: usize,
    /// Applies `quant_conv` after the encoder.
    pub use_quant_conv: bool,
    /// Applies `post_quant_conv` before the decoder.
    pub use_post_quant_conv: bool,
    /// Adds the single-head self-attention to both mid blocks.
    pub mid_block_add_attention: bool,
    /// Epsilon of the latent BatchNorm statistics.
    pub batch_norm_eps: f64,
    /// Patchify size of the latent before BatchNorm and packing.
    pub patch_size: [usize; 2],
    /// Execution limits (not part of config.json).
    #[serde(skip)]
    pub chunking: Chunking,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            decoder_block_out_channels: None,
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 32,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            batch_norm_eps: 1e-4,
            patch_size: [2, 2],
            chunking: Chunking::default(),
        }
    }
}

/// GroupNorm epsilon of every ResNet, attention and output norm (diffusers `resnet_eps`).
pub const NORM_EPS: f64 = 1e-6;

impl Config {
    /// Decoder widths per stage, shallowest first.
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    /// Channels of a packed latent token: `latent_channels * patch_h * patch_w` (128).
    pub fn packed_channels(&self) -> usize {
        self.latent_channels * self.patch_size[0] * self.patch_size[1]
    }

    /// Pixels per latent pixel along each side: 2^(stages - 1) (8).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks what this implementation supports; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let stages = self.block_out_channels.len();
        if stages == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.decoder_channels().len() != stages {
            return Err("decoder_block_out_channels must have one entry per stage".into());
        }
        if self.down_block_types.len() != stages
            || self
                .down_block_types
                .iter()
                .any(|t| t != "DownEncoderBlock2D")
        {
            return Err(format!(
                "down_block_types must be {stages} x DownEncoderBlock2D"
            ));
        }
        if self.up_block_types.len() != stages
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return Err(format!(
                "up_block_types must be {stages} x UpDecoderBlock2D"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (silu only)",
                self.act_fn
            ));
        }
        let groups = self.norm_num_groups;
        let widths = self
            .block_out_channels
            .iter()
            .chain(self.decoder_channels());
        if groups == 0 || widths.clone().any(|&c| c == 0 || c % groups != 0) {
            return Err(format!(
                "every block_out_channels entry must be a multiple of norm_num_groups {groups}"
            ));
        }
        if self.patch_size.contains(&0) {
            return Err("patch_size entries must be >= 1".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("in_channels, out_channels and latent_channels must be >= 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_diffusers_file_with_null_decoder_widths() {
        let json = r#"{"_class_name":"AutoencoderKLFlux2","block_out_channels":[8,16,32,32],
            "decoder_block_out_channels":null,"norm_num_groups":4,"sample_size":1024,
            "batch_norm_momentum":0.1,"force_upcast":true,"patch_size":[2,2]}"#;
        let cfg: Config = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.block_out_channels, [8, 16, 32, 32]);
        assert_eq!(cfg.decoder_channels(), [8, 16, 32, 32]);
        assert_eq!(cfg.norm_num_groups, 4);
        assert_eq!(
            cfg.latent_channels, 32,
            "missing keys take the class default"
        );
        cfg.validate().unwrap();
    }

    #[test]
    fn class_defaults_are_the_released_vae() {
        let cfg = Config::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.packed_channels(), 128);
        assert_eq!(cfg.vae_scale_factor(), 8);
    }

    #[test]
    fn unsupported_configs_name_the_key() {
        let mut cfg = Config {
            norm_num_groups: 3,
            ..Config::default()
        };
        assert!(cfg.validate().unwrap_err().contains("norm_num_groups"));
        cfg.norm_num_groups = 32;
        cfg.act_fn = "gelu".into();
        assert!(cfg.validate().unwrap_err().contains("act_fn"));
    }

    #[test]
    fn tf32_arithmetic_on_cudnn_counts_more_band_copies() {
        let copies = |cudnn, p| {
            let c = BandCopies::new(cudnn, p);
            (c.input, c.output)
        };
        assert_eq!(copies(false, ConvPrecision::SplitTf32), (2, 2));
        assert_eq!(copies(true, ConvPrecision::Exact), (2, 2));
        assert_eq!(copies(true, ConvPrecision::Tf32), (3, 3));
        assert_eq!(copies(true, ConvPrecision::SplitTf32), (5, 4));
        let cpu = Chunking {
            conv_precision: ConvPrecision::SplitTf32,
            ..Chunking::default()
        };
        assert_eq!(
            cpu.on(&Device::Cpu).conv_copies,
            ConvCopies::new(false, ConvPrecision::Exact)
        );
    }

    /// Stride-1, same-padding convolutions on cuDNN with TF32 arithmetic run their bands in
    /// place (no padded copy of the input rows, no band output): fewer copies; the others keep
    /// the copied bands' count.
    #[test]
    fn bands_in_place_count_fewer_copies() {
        let same = |cudnn, p| {
            let c = ConvCopies::new(cudnn, p).of(1, true);
            (c.input, c.output)
        };
        assert_eq!(same(true, ConvPrecision::Tf32), (1, 1));
        assert_eq!(same(true, ConvPrecision::SplitTf32), (2, 2));
        assert_eq!(same(true, ConvPrecision::Exact), (2, 2));
        assert_eq!(same(false, ConvPrecision::SplitTf32), (2, 2));
        for precision in [ConvPrecision::Tf32, ConvPrecision::SplitTf32] {
            let copies = ConvCopies::new(true, precision);
            let copied = BandCopies::new(true, precision);
            assert_eq!(copies.of(2, false), copied, "the downsamplers");
            assert_eq!(copies.of(1, false), copied, "one-sided padding");
            assert_eq!(copies.of(2, true), copied, "stride 2");
        }
    }

    #[test]
    fn only_cudnn_implicit_algorithms_skip_the_im2col_rows() {
        use CudnnFwdAlgo::{Gemm, ImplicitPrecompGemm};
        assert!(materialises_im2col(false, Some(ImplicitPrecompGemm)));
        assert!(!materialises_im2col(true, Some(ImplicitPrecompGemm)));
        assert!(materialises_im2col(true, Some(Gemm)));
        let cpu = Chunking::default().on(&Device::Cpu);
        assert!(
            cpu.conv_im2col,
            "candle's CPU convolution builds im2col rows"
        );
    }

    #[test]
    fn a_jobs_operation_chunk_holds_inside_its_scope_only() {
        assert_eq!(op_bytes_in_force(7), 7);
        let inner = with_op_bytes(5, || {
            let nested = with_op_bytes(3, || op_bytes_in_force(7));
            (nested, op_bytes_in_force(7))
        });
        assert_eq!(inner, (3, 5));
        let unwound = std::panic::catch_unwind(|| with_op_bytes(9, || panic!("job failed")));
        assert!(unwound.is_err());
        assert_eq!(op_bytes_in_force(7), 7, "restored after a panic");
    }
}
