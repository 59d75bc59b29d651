//! Tiled decoding: quality against the untiled decode (PSNR), the budget choosing tiles
//! instead of refusing, and RESOURCE_EXHAUSTED when not even the smallest tile fits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_config, from_wire, psnr, start, to_wire};
use klein_proto::pb;
use klein_runtime::{bytesize::ByteSize, device::DTypeSpec};
use klein_test_support::{pipeline_dir, rel_l2, test_device};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use vae_svc::{
    image,
    loader::{self, ModelSource},
    memory::MemoryModel,
    model::Chunking,
    tiling::{TileJob, decode_tiled},
};

/// A smooth synthetic RGB image `[1, h, w, 3]` u8: gradients, a disc and soft stripes.
fn synthetic_image(h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
            let d = ((fx - 0.6).powi(2) + (fy - 0.4).powi(2)).sqrt();
            let disc = if d < 0.25 { 0.8 } else { 0.2 };
            let stripes = 0.5 + 0.5 * (fx * 12.0 + fy * 5.0).sin();
            for c in [fx, disc * (1.0 - fy) + 0.2 * fy, 0.3 + 0.4 * stripes] {
                v.push((c.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    Tensor::from_vec(v, (1, h, w, 3), &Device::Cpu).unwrap()
}

fn decode_req(latents: &pb::Tensor, grid: pb::LatentGrid, force: bool) -> pb::DecodeRequest {
    pb::DecodeRequest {
        latents: Some(latents.clone()),
        grid: Some(grid),
        force_tiling: force,
    }
}

/// Tiny weights' bytes as the service counts them, and the activation estimates.
/// The fixture's weight bytes and memory model on the device the service under test uses (the
/// estimate depends on it: cuDNN convolutions materialise no im2col rows).
fn fixture_memory() -> (u64, MemoryModel) {
    let source = ModelSource {
        path: pipeline_dir("tiny-klein-4b"),
        single_file_config: None,
        chunking: Chunking::default(),
    };
    let loaded = loader::load(&source, DType::F32, &test_device()).unwrap();
    (
        loaded.weight_bytes,
        MemoryModel::new(&loaded.config, DType::F32),
    )
}

#[tokio::test]
async fn forced_tiles_blend_close_to_the_untiled_decode() {
    let mut config = fixture_config(DTypeSpec::F32);
    config.tile_tokens = 8;
    config.tile_overlap_tokens = 4;
    let server = start(config).await;
    let mut client = server.client().await;
    let image = synthetic_image(128, 192);
    let enc = client
        .encode(pb::VaeServiceEncodeRequest {
            images: Some(to_wire(&image)),
        })
        .await
        .unwrap()
        .into_inner();
    let (latents, grid) = (enc.latents.unwrap(), enc.grid.unwrap());
    let whole = client
        .decode(decode_req(&latents, grid, false))
        .await
        .unwrap()
        .into_inner();
    let tiled = client
        .decode(decode_req(&latents, grid, true))
        .await
        .unwrap()
        .into_inner();
    let plan = tiled.tile_plan.unwrap();
    assert_eq!(
        plan,
        pb::TilePlan {
            tiled: true,
            tile_tokens: 8,
            overlap_tokens: 4,
            tile_count: 2,
            tile_width_tokens: 8
        }
    );
    let (a, b) = (
        from_wire(whole.images.as_ref().unwrap()),
        from_wire(tiled.images.as_ref().unwrap()),
    );
    let db = psnr(&a, &b);
    println!(
        "tiled vs untiled decode, 128x192 px, 8-token tiles, 4-token overlap, 2 tiles: PSNR {db:.2} dB"
    );
    assert!(db >= 40.0, "PSNR {db:.2} dB");
    server.stop().await.unwrap();

    // For comparison: per-tile group-norm statistics (diffusers' tiled decode), same tiles.
    let source = ModelSource {
        path: pipeline_dir("tiny-klein-4b"),
        single_file_config: None,
        chunking: Chunking::default(),
    };
    let dev = test_device();
    let model = loader::load(&source, DType::F32, &dev).unwrap().model;
    let tokens = from_wire(&latents).to_device(&dev).unwrap();
    let z = model.unpack_latents(&tokens, (8, 12)).unwrap();
    let statistics = model.for_statistics();
    let tiled = |job: &TileJob, statistics| {
        decode_tiled(
            &model,
            statistics,
            &z,
            (8, 12),
            job,
            &CancellationToken::new(),
        )
        .unwrap()
    };
    let to_u8 = |pixels: &Tensor| {
        Tensor::from_vec(
            image::to_u8(pixels).unwrap(),
            (1, 128, 192, 3),
            &Device::Cpu,
        )
        .unwrap()
    };
    let decode = |job: &TileJob| {
        let (pixels, passes) = tiled(job, &statistics);
        (to_u8(&pixels), passes)
    };
    let job = TileJob {
        tile: (8, 8),
        overlap: 4,
        max_passes: 1,
        tolerance: 0.0,
        global_blocks: 0,
    };
    let (local, passes) = decode(&job);
    assert_eq!(passes, 1);
    let db_local = psnr(&a, &local);
    println!("same tiles with per-tile group-norm statistics: PSNR {db_local:.2} dB");
    assert!(db_local < db);

    // Bands across the whole width (what the budget picks where they fit): two of 6 rows
    // overlapping by 4, image-wide statistics.
    let bands = TileJob {
        tile: (6, 12),
        overlap: 4,
        max_passes: 4,
        tolerance: 0.02,
        global_blocks: 0,
    };
    let (pixels, passes) = tiled(&bands, &statistics);
    let db_bands = psnr(&a, &to_u8(&pixels));
    println!("bands of 6 x 12 tokens, 4-token overlap, {passes} passes: PSNR {db_bands:.2} dB");
    assert!(db_bands >= 40.0, "PSNR {db_bands:.2} dB");

    // The same bands after the first up blocks ran on the whole image (what the budget picks
    // where they fit): their group norms exact, fewer layers tiled; every count, up to all
    // four (only the output layers tiled), comes closer to the untiled decode.
    let mut last = db_bands;
    for global_blocks in 1..=4 {
        let job = TileJob {
            global_blocks,
            ..bands
        };
        let (pixels, n) = tiled(&job, &statistics);
        let db = psnr(&a, &to_u8(&pixels));
        println!("the same after {global_blocks} global up blocks, {n} passes: PSNR {db:.2} dB");
        assert!(
            db >= last - 0.5 && n <= passes,
            "{db:.2} dB after {last:.2}, {n} passes"
        );
        last = db;
    }
    assert!(last > db_bands + 1.0, "{last:.2} vs {db_bands:.2} dB");
    // More global blocks than the decoder has: an error, not a panic.
    let too_many = TileJob {
        global_blocks: 5,
        ..bands
    };
    let err = decode_tiled(
        &model,
        &statistics,
        &z,
        (8, 12),
        &too_many,
        &CancellationToken::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("has 4 up blocks, not 5"), "{err}");

    // The statistics passes in the model's own arithmetic instead (on the GPU split TF32
    // where the service runs them in one TF32 pass; the CPU's convolutions are exact either
    // way): the image moves by far less than the tiling moves it from the untiled decode.
    let (own, own_passes) = tiled(&bands, &model);
    assert_eq!(own_passes, passes);
    let moved = rel_l2(&pixels, &own);
    let db_own = psnr(&a, &to_u8(&own));
    println!(
        "statistics passes in the model's arithmetic: PSNR {db_own:.2} dB; the image moved by rel-L2 {moved:.3e}"
    );
    assert!(moved <= 1e-3, "rel-L2 {moved:.3e}");
    assert!(
        (db_own - db_bands).abs() <= 0.1,
        "{db_own:.2} vs {db_bands:.2} dB"
    );
}

#[tokio::test]
async fn a_budget_too_small_for_untiled_decodes_tiled_and_a_hopeless_one_is_refused() {
    let (weights, memory) = fixture_memory();
    let grid = (8, 12);
    let untiled = memory.decode_request(grid, 1);
    let mut config = fixture_config(DTypeSpec::F32);
    config.server.gpu_memory_budget = ByteSize(weights + untiled - 1);
    config.min_tile_tokens = 4;
    let server = start(config).await;
    let mut client = server.client().await;
    let latents = to_wire(&Tensor::zeros((1, 96, 128), DType::F32, &Device::Cpu).unwrap());
    let g = pb::LatentGrid {
        height: 8,
        width: 12,
    };
    let out = client
        .decode(decode_req(&latents, g, false))
        .await
        .unwrap()
        .into_inner();
    let plan = out.tile_plan.unwrap();
    assert!(plan.tiled, "{plan:?}");
    let tile = (plan.tile_tokens as usize, plan.tile_width_tokens as usize);
    let sides = (4..=8).contains(&tile.0) && (4..=12).contains(&tile.1);
    assert!(sides && tile != (8, 12), "{plan:?}");
    assert!(
        (0..=memory.up_blocks()).any(|k| memory.tiled_decode_request(grid, 1, tile, k) < untiled),
        "{plan:?}"
    );
    println!("budget {untiled} - 1 bytes of activations: {plan:?}");
    assert_eq!(
        from_wire(out.images.as_ref().unwrap()).dims(),
        [1, 128, 192, 3]
    );

    // A 1024 x 1024 decode needs more than this budget even in 4-token tiles.
    let big = to_wire(&Tensor::zeros((1, 64 * 64, 128), DType::F32, &Device::Cpu).unwrap());
    let status = client
        .decode(decode_req(
            &big,
            pb::LatentGrid {
                height: 64,
                width: 64,
            },
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("never fit"),
        "{}",
        status.message()
    );

    // Encoding is never tiled: too large is refused.
    let image = to_wire(&Tensor::zeros((1, 1024, 1024, 3), DType::U8, &Device::Cpu).unwrap());
    let status = client
        .encode(pb::VaeServiceEncodeRequest {
            images: Some(image),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_budget_below_the_weights_refuses_to_start() {
    let mut config = fixture_config(DTypeSpec::F32);
    config.server.gpu_memory_budget = ByteSize(1 << 20);
    let err = match vae_svc::Vae::start(&config).await {
        Ok(_) => panic!("started with 1 MiB"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("exceed gpu_memory_budget"), "{err}");
}
