//! Every field of every RPC refused with INVALID_ARGUMENT naming the field, over real gRPC.

mod common;

use common::{f32_bytes, fixture_config, start, wire};
use klein_proto::pb::{self, Dtype};
use klein_runtime::device::DTypeSpec;
use tonic::Code;

fn images(dtype: Dtype, shape: &[u64]) -> pb::Tensor {
    let n: u64 = shape.iter().product();
    let size = match dtype {
        Dtype::U8 => 1,
        Dtype::Bf16 | Dtype::F16 => 2,
        _ => 4,
    };
    wire(dtype, shape, vec![0; (n * size) as usize])
}

fn f32_images(shape: &[u64], poison: f32) -> pb::Tensor {
    let n: u64 = shape.iter().product();
    let mut v = vec![0.25f32; n as usize];
    v[n as usize / 2] = poison;
    wire(Dtype::F32, shape, f32_bytes(&v))
}

fn encode(images: Option<pb::Tensor>) -> pb::VaeServiceEncodeRequest {
    pb::VaeServiceEncodeRequest { images }
}

fn latents(batch: u64, tokens: u64, channels: u64, poison: Option<f32>) -> pb::Tensor {
    let n = (batch * tokens * channels) as usize;
    let mut v = vec![0.5f32; n];
    if let Some(p) = poison {
        v[n - 1] = p;
    }
    wire(Dtype::F32, &[batch, tokens, channels], f32_bytes(&v))
}

fn decode(latents: Option<pb::Tensor>, grid: Option<(u32, u32)>) -> pb::DecodeRequest {
    pb::DecodeRequest {
        latents,
        grid: grid.map(|(height, width)| pb::LatentGrid { height, width }),
        force_tiling: false,
    }
}

#[tokio::test]
async fn every_bad_field_is_invalid_argument_naming_it() {
    let mut config = fixture_config(DTypeSpec::F32);
    config.max_image_side = 256;
    config.max_image_pixels = 128 * 128;
    let server = start(config).await;
    let mut client = server.client().await;

    let encode_cases: Vec<(&str, pb::VaeServiceEncodeRequest, &str)> = vec![
        ("missing", encode(None), "is required"),
        (
            "unspecified dtype",
            encode(Some(images(Dtype::Unspecified, &[1, 64, 64, 3]))),
            "dtype",
        ),
        (
            "short data",
            encode(Some(wire(Dtype::U8, &[1, 64, 64, 3], vec![0; 10]))),
            "bytes",
        ),
        (
            "zero dimension",
            encode(Some(images(Dtype::U8, &[0, 64, 64, 3]))),
            "zero",
        ),
        (
            "rank 3",
            encode(Some(images(Dtype::U8, &[64, 64, 3]))),
            "rank 4",
        ),
        (
            "four channels",
            encode(Some(images(Dtype::U8, &[1, 64, 64, 4]))),
            "3 (RGB",
        ),
        (
            "bf16 pixels",
            encode(Some(images(Dtype::Bf16, &[1, 64, 64, 3]))),
            "u8 or f32",
        ),
        (
            "height not multiple of 16",
            encode(Some(images(Dtype::U8, &[1, 72, 64, 3]))),
            "multiple of 16",
        ),
        (
            "width below 64",
            encode(Some(images(Dtype::U8, &[1, 64, 48, 3]))),
            "minimum of 64",
        ),
        (
            "aspect 9:1",
            encode(Some(images(Dtype::U8, &[1, 64, 576, 3]))),
            "aspect ratio",
        ),
        (
            "NaN pixel",
            encode(Some(f32_images(&[1, 64, 64, 3], f32::NAN))),
            "finite",
        ),
        (
            "pixel out of range",
            encode(Some(f32_images(&[1, 64, 64, 3], 1.5))),
            "[-1, 1]",
        ),
        (
            "batch over max_batch",
            encode(Some(images(Dtype::U8, &[5, 64, 64, 3]))),
            "max_batch",
        ),
        (
            "side over max_image_side",
            encode(Some(images(Dtype::U8, &[1, 64, 272, 3]))),
            "max_image_side",
        ),
        (
            "area over max_image_pixels",
            encode(Some(images(Dtype::U8, &[1, 144, 144, 3]))),
            "max_image_pixels",
        ),
    ];
    for (name, req, needle) in encode_cases {
        let status = client.encode(req).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with("images: "),
            "{name}: {}",
            status.message()
        );
        assert!(
            status.message().contains(needle),
            "{name}: {}",
            status.message()
        );
    }

    let decode_cases: Vec<(&str, pb::DecodeRequest, &str, &str)> = vec![
        (
            "missing latents",
            decode(None, Some((4, 4))),
            "latents",
            "is required",
        ),
        (
            "u8 latents",
            decode(Some(images(Dtype::U8, &[1, 16, 128])), Some((4, 4))),
            "latents",
            "f32 or bf16",
        ),
        (
            "f16 latents",
            decode(Some(images(Dtype::F16, &[1, 16, 128])), Some((4, 4))),
            "latents",
            "f32 or bf16",
        ),
        (
            "rank 2",
            decode(Some(images(Dtype::F32, &[16, 128])), Some((4, 4))),
            "latents",
            "rank 3",
        ),
        (
            "64 channels",
            decode(Some(latents(1, 16, 64, None)), Some((4, 4))),
            "latents",
            "128 channels",
        ),
        (
            "NaN latent",
            decode(Some(latents(1, 16, 128, Some(f32::NAN))), Some((4, 4))),
            "latents",
            "finite",
        ),
        (
            "inf latent",
            decode(Some(latents(1, 16, 128, Some(f32::INFINITY))), Some((4, 4))),
            "latents",
            "finite",
        ),
        (
            "batch over max_batch",
            decode(Some(latents(5, 16, 128, None)), Some((4, 4))),
            "latents",
            "max_batch",
        ),
        (
            "missing grid",
            decode(Some(latents(1, 16, 128, None)), None),
            "grid",
            "is required",
        ),
        (
            "zero grid height",
            decode(Some(latents(1, 16, 128, None)), Some((0, 16))),
            "grid.height",
            ">= 1",
        ),
        (
            "zero grid width",
            decode(Some(latents(1, 16, 128, None)), Some((16, 0))),
            "grid.width",
            ">= 1",
        ),
        (
            "grid not matching tokens",
            decode(Some(latents(1, 24, 128, None)), Some((4, 5))),
            "grid",
            "24 tokens",
        ),
        (
            "side below 64",
            decode(Some(latents(1, 24, 128, None)), Some((3, 8))),
            "grid",
            "minimum of 64",
        ),
        (
            "aspect 10:1",
            decode(Some(latents(1, 160, 128, None)), Some((4, 40))),
            "grid",
            "aspect ratio",
        ),
        (
            "side over max_image_side",
            decode(Some(latents(1, 68, 128, None)), Some((4, 17))),
            "grid",
            "max_image_side",
        ),
        (
            "area over max_image_pixels",
            decode(Some(latents(1, 81, 128, None)), Some((9, 9))),
            "grid",
            "max_image_pixels",
        ),
    ];
    for (name, req, field, needle) in decode_cases {
        let status = client.decode(req).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{name}: {}",
            status.message()
        );
        assert!(
            status.message().contains(needle),
            "{name}: {}",
            status.message()
        );
    }

    // The server is unharmed.
    let ok = client
        .decode(decode(Some(latents(1, 16, 128, None)), Some((4, 4))))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    server.stop().await.unwrap();
}
