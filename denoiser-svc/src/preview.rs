//! Cheap approximate previews: a linear projection of the latents to RGB, no VAE decode.
//!
//! The factors are the published FLUX.2 latent→RGB factors (32 VAE channels × RGB, plus a
//! bias; ComfyUI `latent_formats.Flux2`) for normalised latents. A packed token holds the
//! 2×2 sub-pixels of each VAE channel (packed channel `c·4 + 2·pi + pj`), so the token colour
//! is the mean of its four sub-pixels. The result is only a rough impression of composition
//! and colour.

use candle_core::{DType, Device, Result, Tensor};

const FACTORS: [[f32; 3]; 32] = [
    [0.0058, 0.0113, 0.0073],
    [0.0495, 0.0443, 0.0836],
    [-0.0099, 0.0096, 0.0644],
    [0.2144, 0.3009, 0.3652],
    [0.0166, -0.0039, -0.0054],
    [0.0157, 0.0103, -0.0160],
    [-0.0398, 0.0902, -0.0235],
    [-0.0052, 0.0095, 0.0109],
    [-0.3527, -0.2712, -0.1666],
    [-0.0301, -0.0356, -0.0180],
    [-0.0107, 0.0078, 0.0013],
    [0.0746, 0.0090, -0.0941],
    [0.0156, 0.0169, 0.0070],
    [-0.0034, -0.0040, -0.0114],
    [0.0032, 0.0181, 0.0080],
    [-0.0939, -0.0008, 0.0186],
    [0.0018, 0.0043, 0.0104],
    [0.0284, 0.0056, -0.0127],
    [-0.0024, -0.0022, -0.0030],
    [0.1207, -0.0026, 0.0065],
    [0.0128, 0.0101, 0.0142],
    [0.0137, -0.0072, -0.0007],
    [0.0095, 0.0092, -0.0059],
    [0.0000, -0.0077, -0.0049],
    [-0.0465, -0.0204, -0.0312],
    [0.0095, 0.0012, -0.0066],
    [0.0290, -0.0034, 0.0025],
    [0.0220, 0.0169, -0.0048],
    [-0.0332, -0.0457, -0.0468],
    [-0.0085, 0.0389, 0.0609],
    [-0.0076, 0.0003, -0.0043],
    [-0.0111, -0.0460, -0.0614],
];
const BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// RGB u8 preview `[B, h, w, 3]` (on the CPU) of packed latents `[B, h·w, 128]`.
pub fn preview(latents: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, n, c) = latents.dims3()?;
    if c != 4 * FACTORS.len() || n != height * width {
        candle_core::bail!(
            "preview needs [B, {height}x{width}, 128] latents, got {:?}",
            latents.dims()
        );
    }
    let weights: Vec<f32> = (0..c)
        .flat_map(|ch| FACTORS[ch / 4].map(|f| f / 4.0))
        .collect();
    let weights = Tensor::from_vec(weights, (c, 3), &Device::Cpu)?;
    let bias = Tensor::new(&BIAS, &Device::Cpu)?;
    let x = latents.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let rgb = x.broadcast_matmul(&weights)?.broadcast_add(&bias)?;
    let rgb = ((rgb + 1.0)? * 127.5)?.clamp(0.0, 255.0)?.round()?;
    rgb.to_dtype(DType::U8)?.reshape((b, height, width, 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_latents_preview_as_the_bias_colour() {
        let z = Tensor::zeros((1, 6, 128), DType::BF16, &Device::Cpu).unwrap();
        let p = preview(&z, 2, 3).unwrap();
        assert_eq!(p.dims(), &[1, 2, 3, 3]);
        let px = p.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let want: Vec<u8> = BIAS
            .iter()
            .map(|b| ((b + 1.0) * 127.5).round() as u8)
            .collect();
        assert_eq!(px[..3], want[..]);
        assert!(preview(&z, 3, 3).is_err());
    }
}
