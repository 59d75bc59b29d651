//! Wire-tensor plumbing the gateway needs without touching a model: images in and out, the
//! token mask, and repeating a batch-1 tensor for `num_images`.

use bytes::{Bytes, BytesMut};
use image::RgbImage;
use klein_proto::pb;

/// An RGB image as a u8 tensor `[1, H, W, 3]`.
pub fn image_tensor(img: &RgbImage) -> pb::Tensor {
    pb::Tensor {
        dtype: pb::Dtype::U8 as i32,
        shape: vec![1, u64::from(img.height()), u64::from(img.width()), 3],
        data: Bytes::copy_from_slice(img.as_raw()),
    }
}

/// A token-grid mask as an f32 tensor `[1, N, 1]`.
pub fn mask_tensor(mask: &[f32]) -> pb::Tensor {
    pb::Tensor {
        dtype: pb::Dtype::F32 as i32,
        shape: vec![1, mask.len() as u64, 1],
        data: mask
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

/// A `[1, ...]` tensor repeated `n` times along the batch axis (`[n, ...]`).
pub fn repeat_batch(t: &pb::Tensor, n: u32) -> pb::Tensor {
    if n == 1 {
        return t.clone();
    }
    let mut data = BytesMut::with_capacity(t.data.len() * n as usize);
    for _ in 0..n {
        data.extend_from_slice(&t.data);
    }
    let mut shape = t.shape.clone();
    if let Some(b) = shape.first_mut() {
        *b *= u64::from(n);
    }
    pb::Tensor {
        dtype: t.dtype,
        shape,
        data: data.freeze(),
    }
}

/// Splits a u8 `[B, H, W, 3]` tensor into images; `None` if it is not such a tensor.
pub fn split_images(t: &pb::Tensor) -> Option<Vec<RgbImage>> {
    if t.dtype != pb::Dtype::U8 as i32 || t.shape.len() != 4 || t.shape[3] != 3 {
        return None;
    }
    let (b, h, w) = (
        t.shape[0] as usize,
        u32::try_from(t.shape[1]).ok()?,
        u32::try_from(t.shape[2]).ok()?,
    );
    let per = (h as usize) * (w as usize) * 3;
    if t.data.len() != per * b {
        return None;
    }
    t.data
        .chunks_exact(per)
        .map(|c| RgbImage::from_raw(w, h, c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_and_split_round_trip() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let t = repeat_batch(&image_tensor(&img), 3);
        assert_eq!(t.shape, vec![3, 2, 3, 3]);
        let imgs = split_images(&t).unwrap();
        assert_eq!(imgs.len(), 3);
        assert!(imgs.iter().all(|i| i == &img));
        assert!(split_images(&mask_tensor(&[0.5, 1.0])).is_none());
    }
}
