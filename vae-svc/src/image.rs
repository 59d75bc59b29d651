//! Pixels in and out, exactly as diffusers' `VaeImageProcessor` does it (spec §4.5, §4.6):
//! - in: u8 -> `f32(v) / 255`, then `2x - 1`, in f32; f32 input is already in [-1, 1];
//! - out: `clamp(x * 0.5 + 0.5, 0, 1)` in the model dtype, then `round(255 * y)` in f32 with
//!   ties to even (numpy), as u8.

use candle_core::{DType, Device, Result, Tensor};

/// One image `[H, W, 3]` (u8, or f32 in [-1, 1]) -> `(1, 3, H, W)` f32 in [-1, 1], on the CPU.
pub fn to_model_input(image: &Tensor) -> Result<Tensor> {
    let (h, w, c) = image.dims3()?;
    let hwc = match image.dtype() {
        DType::U8 => {
            let values: Vec<f32> = image
                .flatten_all()?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|v| 2.0 * (f32::from(v) / 255.0) - 1.0)
                .collect();
            Tensor::from_vec(values, (h, w, c), &Device::Cpu)?
        }
        _ => image.to_dtype(DType::F32)?,
    };
    hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
}

/// Decoder output `(B, 3, H, W)` in the model dtype (any device) -> `B * H * W * 3` u8 RGB,
/// image-major, rows top to bottom; quantised where the tensor is
/// ([`klein_kernels::rgb_u8`]), so only the u8 bytes reach the host.
pub fn to_u8(decoded: &Tensor) -> Result<Vec<u8>> {
    klein_kernels::rgb_u8(decoded)?
        .flatten_all()?
        .to_vec1::<u8>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_pixels_map_like_numpy() {
        let img = Tensor::from_vec(vec![0u8, 128, 255], (1, 1, 3), &Device::Cpu).unwrap();
        let x = to_model_input(&img).unwrap();
        assert_eq!(x.dims(), [1, 3, 1, 1]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![-1.0, 2.0 * (128f32 / 255.0) - 1.0, 1.0]);
    }

    #[test]
    fn quantisation_clamps_and_rounds_half_to_even_channel_last() {
        // x = 2y - 1 for y = 0.5 (127.5 -> 128), below 0, above 1, 1/255, 0 and 1; two
        // pixels, channel planes in, pixels of three channels out.
        let y = [[0.5f32, -0.2], [1.3, 1.0 / 255.0], [0.0, 1.0]];
        let x: Vec<f32> = y.iter().flatten().map(|v| 2.0 * v - 1.0).collect();
        let t = Tensor::from_vec(x, (1, 3, 1, 2), &Device::Cpu).unwrap();
        assert_eq!(to_u8(&t).unwrap(), vec![128, 255, 0, 0, 1, 255]);
    }
}
