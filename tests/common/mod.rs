//! Shared harness of the workspace-level tests: the whole stack in-process on 127.0.0.1:0.

#![allow(dead_code)]

use std::{io::Cursor, time::Duration};

use candle_core::Tensor;
use gateway::stack::{self, RunningStack, StackOptions};
use image::{DynamicImage, RgbImage};
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{self, generate_response::Event, image_service_client::ImageServiceClient},
    tensor,
};
use klein_runtime::device::{DTypeSpec, DeviceSpec};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Starts the stack on the tiny pipeline `name` (f32 on `KLEIN_TEST_DEVICE`, the CPU by default)
/// and waits until it serves.
pub async fn start_stack(name: &str) -> RunningStack {
    start_with(stack_options(name)).await
}

/// The options [`start_stack`] starts the tiny pipeline `name` with.
pub fn stack_options(name: &str) -> StackOptions {
    let device: DeviceSpec = klein_test_support::test_device_name()
        .parse()
        .expect("KLEIN_TEST_DEVICE is cpu or cuda:N");
    let mut opts = StackOptions::new(
        &klein_test_support::pipeline_dir(name),
        device,
        ([127, 0, 0, 1], 0).into(),
    );
    // The goldens are f32 runs; on a GPU the stack would default to bf16.
    opts.encoder.server.dtype = DTypeSpec::F32;
    opts.denoiser.server.dtype = DTypeSpec::F32;
    opts
}

/// Starts a stack with explicit options and waits until it serves.
pub async fn start_with(opts: StackOptions) -> RunningStack {
    let mut running = stack::start(opts).await.expect("stack starts");
    running
        .ready(Duration::from_secs(300))
        .await
        .expect("stack becomes ready");
    running
}

/// The Generate request of a text-to-image golden `case` (`t2i`, `t2i_9b`): its prompt, size,
/// four steps and noise, for `model`.
pub fn golden_t2i_request(model: &str, case: &str) -> pb::GenerateRequest {
    let g = klein_test_support::golden(case);
    pb::GenerateRequest {
        prompt: "a photo of a cat".into(),
        model: model.into(),
        width: 96,
        height: 64,
        num_steps: 4,
        seed: Some(1),
        initial_noise: Some(wire(klein_test_support::take(&g, "noise"))),
        ..Default::default()
    }
}

/// A client of the stack's gateway.
pub async fn client(running: &RunningStack) -> ImageServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ImageServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// What one Generate call returned.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: Option<pb::Accepted>,
    pub stages: Vec<i32>,
    pub steps: Vec<pb::Step>,
    pub images: Vec<pb::Image>,
}

/// Runs Generate to the end.
pub async fn generate(
    client: &mut ImageServiceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Outcome, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Outcome::default();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(Event::Accepted(a)) => out.accepted = Some(a),
            Some(Event::Stage(s)) => out.stages.push(s.stage),
            Some(Event::Step(s)) => out.steps.push(s),
            Some(Event::Image(i)) => out.images.push(i),
            None => {}
        }
    }
    Ok(out)
}

/// PNG bytes of a u8 `[H, W, 3]` (or `[1, H, W, 3]`) golden tensor.
pub fn png_of_rgb(t: &Tensor) -> bytes::Bytes {
    let t = if t.rank() == 4 {
        t.squeeze(0).unwrap()
    } else {
        t.clone()
    };
    let (h, w, _) = t.dims3().unwrap();
    let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let img = RgbImage::from_raw(w as u32, h as u32, raw).unwrap();
    png_of(DynamicImage::ImageRgb8(img))
}

/// PNG bytes of an image.
pub fn png_of(img: DynamicImage) -> bytes::Bytes {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out.into()
}

/// Decoded RGB pixels of a PNG as a u8 `[1, H, W, 3]` tensor.
pub fn pixels(png: &[u8]) -> Tensor {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    Tensor::from_vec(
        img.into_raw(),
        (1, h as usize, w as usize, 3),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// A wire tensor of a golden tensor.
pub fn wire(t: &Tensor) -> pb::Tensor {
    tensor::encode(t).unwrap()
}

/// Largest absolute pixel difference.
pub fn max_pixel_diff(a: &Tensor, b: &Tensor) -> f64 {
    klein_test_support::max_abs_diff(a, b)
}
