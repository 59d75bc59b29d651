//! The whole service over real gRPC on 127.0.0.1:0: health SERVING only after the warm-up,
//! Encode / Decode parity with the diffusers goldens through the wire (f32 and bf16), Info,
//! forced tiling reported in the response, and a clean drain.

mod common;

use candle_core::{DType, Tensor};
use common::{fixture_config, from_wire, start, to_wire};
use klein_proto::pb;
use klein_runtime::device::DTypeSpec;
use klein_test_support::{golden, manifest, max_abs_diff, rel_l2, take, test_device_name};

fn encode_request(image_hwc: &Tensor) -> pb::VaeServiceEncodeRequest {
    pb::VaeServiceEncodeRequest {
        images: Some(to_wire(&image_hwc.unsqueeze(0).unwrap())),
    }
}

fn decode_request(latents: &Tensor, force_tiling: bool) -> pb::DecodeRequest {
    pb::DecodeRequest {
        latents: Some(to_wire(latents)),
        grid: Some(pb::LatentGrid {
            height: 4,
            width: 6,
        }),
        force_tiling,
    }
}

fn spread(name: &str, metric: &str) -> f64 {
    2.0 * manifest()["cases"]["vae"]["spread"][name][metric]
        .as_f64()
        .unwrap()
}

#[tokio::test]
async fn f32_service_matches_diffusers_over_the_wire() {
    let g = golden("vae");
    let server = start(fixture_config(DTypeSpec::F32)).await;
    let mut client = server.client().await;

    // Encode from u8 pixels.
    let enc = client
        .encode(encode_request(take(&g, "image_uint8")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        enc.grid,
        Some(pb::LatentGrid {
            height: 4,
            width: 6
        })
    );
    let latents = from_wire(enc.latents.as_ref().unwrap());
    assert_eq!(latents.dtype(), DType::F32);
    let err = rel_l2(&latents, take(&g, "packed_latents.f32"));
    println!("grpc encode (u8 input) packed_latents.f32 rel-L2 {err:.3e}");
    assert!(err <= 1e-4);

    // Encode from f32 pixels in [-1, 1] (NHWC on the wire).
    let f32_image = take(&g, "image")
        .permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    let enc = client
        .encode(pb::VaeServiceEncodeRequest {
            images: Some(to_wire(&f32_image)),
        })
        .await
        .unwrap()
        .into_inner();
    let err = rel_l2(
        &from_wire(enc.latents.as_ref().unwrap()),
        take(&g, "packed_latents.f32"),
    );
    println!("grpc encode (f32 input) packed_latents.f32 rel-L2 {err:.3e}");
    assert!(err <= 1e-4);

    // Decode.
    let dec = client
        .decode(decode_request(take(&g, "decode_input_packed"), false))
        .await
        .unwrap()
        .into_inner();
    let images = from_wire(dec.images.as_ref().unwrap());
    assert_eq!(images.dims(), [1, 64, 96, 3]);
    assert_eq!(images.dtype(), DType::U8);
    let px = max_abs_diff(&images, take(&g, "decoded_uint8.f32"));
    println!("grpc decode decoded_uint8.f32 max abs diff {px} levels");
    assert!(px <= 1.0);
    let plan = dec.tile_plan.unwrap();
    assert_eq!(
        plan,
        pb::TilePlan {
            tiled: false,
            tile_tokens: 0,
            overlap_tokens: 0,
            tile_count: 1,
            tile_width_tokens: 0
        }
    );

    // Decode of a batch of two (the second latents negated) equals two single decodes.
    let z = take(&g, "decode_input_packed");
    let pair = Tensor::cat(&[z, &z.neg().unwrap()], 0).unwrap();
    let dec = client
        .decode(decode_request(&pair, false))
        .await
        .unwrap()
        .into_inner();
    let both = from_wire(dec.images.as_ref().unwrap());
    assert_eq!(both.dims(), [2, 64, 96, 3]);
    assert_eq!(
        max_abs_diff(&both.get(0).unwrap(), &images.get(0).unwrap()),
        0.0
    );

    // Forced tiling: 4-token tiles with 2 of overlap over a 4 x 6 grid.
    let dec = client
        .decode(decode_request(take(&g, "decode_input_packed"), true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        dec.tile_plan.unwrap(),
        pb::TilePlan {
            tiled: true,
            tile_tokens: 4,
            overlap_tokens: 2,
            tile_count: 2,
            tile_width_tokens: 4
        }
    );

    // Info.
    let info = client
        .info(pb::VaeServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.service, "vae");
    assert_eq!(info.model_id, "tiny-klein-4b");
    assert_eq!(info.dtype, pb::Dtype::F32 as i32);
    let device: klein_runtime::device::DeviceSpec = test_device_name().parse().unwrap();
    assert_eq!(info.device, device.to_string());
    assert_eq!(info.memory_budget_bytes, 2 << 30);
    assert!(
        info.weight_bytes > 1_000_000 && info.weight_bytes < 2_000_000,
        "{}",
        info.weight_bytes
    );
    assert_eq!(info.reserved_bytes, 0);
    assert_eq!(
        (info.max_batch, info.max_image_side, info.max_image_pixels),
        (4, 4096, 2048 * 2048)
    );
    assert_eq!(info.details["format"], "diffusers");
    assert_eq!(info.details["block_out_channels"], "[8, 16, 32, 32]");

    server.stop().await.unwrap();
}

#[tokio::test]
async fn bf16_service_is_within_the_torch_spread() {
    let g = golden("vae");
    let server = start(fixture_config(DTypeSpec::Bf16)).await;
    let mut client = server.client().await;
    let enc = client
        .encode(encode_request(take(&g, "image_uint8")))
        .await
        .unwrap()
        .into_inner();
    let latents = from_wire(enc.latents.as_ref().unwrap());
    assert_eq!(latents.dtype(), DType::BF16);
    let err = rel_l2(&latents, take(&g, "packed_latents.bf16"));
    println!("grpc bf16 packed_latents rel-L2 {err:.3e}");
    assert!(err <= spread("packed_latents", "rel_l2"));

    let z = take(&g, "decode_input_packed")
        .to_dtype(DType::BF16)
        .unwrap();
    let dec = client
        .decode(decode_request(&z, false))
        .await
        .unwrap()
        .into_inner();
    let images = from_wire(dec.images.as_ref().unwrap());
    let want = take(&g, "decoded_uint8.bf16");
    let (px, rel) = (max_abs_diff(&images, want), rel_l2(&images, want));
    println!("grpc bf16 decoded_uint8 max abs {px} levels, rel-L2 {rel:.3e}");
    assert!(px <= spread("decoded_uint8", "max_abs"));
    assert!(rel <= spread("decoded_uint8", "rel_l2"));
    let info = client
        .info(pb::VaeServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.dtype, pb::Dtype::Bf16 as i32);
    server.stop().await.unwrap();
}
