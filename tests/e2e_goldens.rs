//! End to end through real gRPC (gateway + encoder + denoiser + VAE on 127.0.0.1:0, f32 on
//! the CPU): every mode reproduces the diffusers golden image from the golden noise within one
//! pixel level, the same seed twice gives identical pixels, and a transformer quantized once
//! into a GGUF file serves the pixels of the same quantization done at load time.

mod common;

use common::{
    client, generate, max_pixel_diff, pixels, png_of, png_of_rgb, stack_options, start_stack,
    start_with, wire,
};
use image::{DynamicImage, RgbaImage};
use klein_proto::pb::{self, generate_request::Mode};
use klein_test_support::{golden, take};

fn base_request(noise: &candle_core::Tensor, steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a photo of a cat".into(),
        width: 96,
        height: 64,
        num_steps: steps,
        seed: Some(1),
        initial_noise: Some(wire(noise)),
        ..Default::default()
    }
}

fn assert_image(
    case: &str,
    png: &[u8],
    g: &std::collections::HashMap<String, candle_core::Tensor>,
) {
    let got = pixels(png);
    let want = take(g, "image_uint8.f32");
    let diff = max_pixel_diff(&got, want);
    eprintln!("{case}: max pixel diff vs the diffusers f32 golden = {diff}");
    assert!(diff <= 1.0, "{case}: max pixel diff {diff} > 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_reproduces_the_diffusers_goldens() {
    let running = start_stack("tiny-klein-4b").await;
    let mut c = client(&running).await;

    let g = golden("t2i");
    let out = generate(&mut c, base_request(take(&g, "noise"), 4))
        .await
        .unwrap();
    assert_eq!(out.images.len(), 1);
    assert_eq!(out.steps.len(), 4);
    assert_eq!((out.images[0].width, out.images[0].height), (96, 64));
    assert_image("t2i", &out.images[0].png, &g);

    let g = golden("i2i");
    let mut req = base_request(take(&g, "noise"), 6);
    req.mode = Some(Mode::ImageToImage(pb::ImageToImageInput {
        image: png_of_rgb(take(&g, "init_image_uint8")),
        strength: Some(0.6),
    }));
    let out = generate(&mut c, req).await.unwrap();
    assert_eq!(out.steps.len(), 4, "strength 0.6 of 6 steps runs 4");
    assert_image("i2i", &out.images[0].png, &g);

    let g = golden("inpaint");
    let mask = take(&g, "mask_uint8");
    let (h, w) = mask.dims2().unwrap();
    let mask_raw = mask.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mask_png = png_of(DynamicImage::ImageLuma8(
        image::GrayImage::from_raw(w as u32, h as u32, mask_raw.clone()).unwrap(),
    ));
    let init = take(&g, "init_image_uint8");
    let mut req = base_request(take(&g, "noise"), 6);
    req.mode = Some(Mode::Inpaint(pb::InpaintInput {
        image: png_of_rgb(init),
        mask: mask_png,
        strength: Some(0.8),
    }));
    let out = generate(&mut c, req).await.unwrap();
    assert_image("inpaint (mask image)", &out.images[0].png, &g);
    // The same hole given as transparency (alpha 0 = repaint) must give the same image.
    let rgb = init.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let rgba = RgbaImage::from_fn(w as u32, h as u32, |x, y| {
        let i = (y as usize * w + x as usize) * 3;
        image::Rgba([
            rgb[i],
            rgb[i + 1],
            rgb[i + 2],
            255 - mask_raw[y as usize * w + x as usize],
        ])
    });
    let mut req = base_request(take(&g, "noise"), 6);
    req.mode = Some(Mode::Inpaint(pb::InpaintInput {
        image: png_of(DynamicImage::ImageRgba8(rgba)),
        mask: Default::default(),
        strength: Some(0.8),
    }));
    let out = generate(&mut c, req).await.unwrap();
    assert_image("inpaint (alpha channel)", &out.images[0].png, &g);

    let g = golden("multiref");
    let mut req = base_request(take(&g, "noise"), 4);
    req.reference_images = vec![
        png_of_rgb(take(&g, "ref0_uint8")),
        png_of_rgb(take(&g, "ref1_uint8")),
    ];
    let out = generate(&mut c, req).await.unwrap();
    assert_image("multiref", &out.images[0].png, &g);

    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cfg_on_the_base_model_reproduces_the_golden() {
    let running = start_stack("tiny-klein-base-4b").await;
    let mut c = client(&running).await;
    let g = golden("cfg");
    let mut req = base_request(take(&g, "noise"), 8);
    req.guidance_scale = Some(4.0);
    let out = generate(&mut c, req).await.unwrap();
    assert_eq!(out.steps.len(), 8);
    assert!(
        out.images[0].warnings.is_empty(),
        "{:?}",
        out.images[0].warnings
    );
    assert_image("cfg", &out.images[0].png, &g);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_twice_gives_identical_pixels_and_seeds_are_returned() {
    let running = start_stack("tiny-klein-4b").await;
    let mut c = client(&running).await;
    let req = pb::GenerateRequest {
        prompt: "a red car".into(),
        width: 64,
        height: 64,
        seed: Some(42),
        num_images: 2,
        ..Default::default()
    };
    let a = generate(&mut c, req.clone()).await.unwrap();
    let b = generate(&mut c, req).await.unwrap();
    assert_eq!(a.accepted.as_ref().unwrap().seed, 42);
    assert_eq!(
        a.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        vec![42, 43]
    );
    for (x, y) in a.images.iter().zip(&b.images) {
        assert_eq!(
            pixels(&x.png)
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap(),
            pixels(&y.png)
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
        );
    }
    assert_ne!(
        pixels(&a.images[0].png)
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap(),
        pixels(&a.images[1].png)
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap(),
        "images of one request use different seeds"
    );
    let random = generate(
        &mut c,
        pb::GenerateRequest {
            prompt: "x".into(),
            width: 64,
            height: 64,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        random.images[0].seed,
        random.accepted.unwrap().seed,
        "a random seed is chosen and returned"
    );
    running.stop().await.unwrap();
}

/// `klein quantize --out T --text-encoder-out E` then `klein serve --transformer T
/// --text-encoder-gguf E`: the tiny pipeline's transformer and text encoder written as q8_0
/// GGUF files and served in place of its `transformer/` and `text_encoder/` weights (under the
/// pipeline's name, distilled as its `model_index.json` says) give the pixels of the stack that
/// quantizes the same checkpoint to q8_0 at load time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_gguf_files_serve_the_load_time_quantized_pixels() {
    use candle_core::Device;
    use denoiser_svc::{config::Quantize, gguf::write_gguf, weights::Checkpoint};
    use encoder_svc::model::{quant::QuantFormat, weights::QuantPlan};

    let pipeline = "tiny-klein-4b";
    let dir = klein_test_support::pipeline_dir(pipeline);
    let temp = |name: &str| std::env::temp_dir().join(format!("{}-e2e-{name}", std::process::id()));
    let (file, encoder_file) = (temp("q8_0.gguf"), temp("qwen3-q8_0.gguf"));
    let checkpoint = Checkpoint::locate(&dir).unwrap();
    write_gguf(&checkpoint, QuantFormat::Q8_0, &file, &Device::Cpu).unwrap();
    let plan = QuantPlan::projections_in(QuantFormat::Q8_0);
    let written =
        encoder_svc::model::gguf::write_gguf(&dir, plan, &encoder_file, &Device::Cpu).unwrap();
    assert!(written.quantized > 0 && written.quantized < written.tensors);
    let req = pb::GenerateRequest {
        prompt: "a red car".into(),
        width: 64,
        height: 64,
        seed: Some(7),
        // Served under the pipeline's name either way.
        model: pipeline.into(),
        ..Default::default()
    };
    let mut images = Vec::new();
    for from_file in [true, false] {
        let mut opts = stack_options(pipeline);
        if from_file {
            opts = opts.transformer(&file).text_encoder_gguf(&encoder_file);
        } else {
            opts.denoiser.quantize = Quantize::Format(QuantFormat::Q8_0);
            opts.encoder.quantize = Quantize::Format(QuantFormat::Q8_0);
        }
        let running = start_with(opts).await;
        let mut c = client(&running).await;
        let out = generate(&mut c, req.clone()).await.unwrap();
        assert_eq!(out.steps.len(), 4, "distilled: four steps by default");
        images.push(pixels(&out.images[0].png));
        running.stop().await.unwrap();
    }
    std::fs::remove_file(&encoder_file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(max_pixel_diff(&images[0], &images[1]), 0.0);
}
