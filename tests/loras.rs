//! LoRA adapters chosen per request, through the whole stack over gRPC: the default model serves
//! the diffusers-layout fixture adapter as "style" (`--adapter style=PATH`), a second denoiser
//! model entry has the same file merged at 0.8. GetCapabilities lists the adapter; a request
//! with "style" at 0.8 gives the merged model's image (within one level), at 0 the plain image
//! exactly, and the plain request after it is unchanged. A request naming an adapter its model
//! lacks, or one twice, is refused by the gateway with INVALID_ARGUMENT naming the field.

mod common;

use common::{client, generate, golden_t2i_request, max_pixel_diff, pixels, stack_options};
use denoiser_svc::{
    config::ModelEntry,
    lora::{AdapterSpec, LoraSpec},
};
use klein_proto::pb;
use klein_test_support::{fixtures_dir, pipeline_dir};

const MODEL: &str = "tiny-klein-4b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_applies_its_adapters_through_the_stack() {
    let file =
        fixtures_dir().join("loras/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors");
    let mut opts = stack_options(MODEL);
    opts.denoiser.adapters = vec![AdapterSpec {
        name: "style".into(),
        path: file.clone(),
    }];
    opts.denoiser.models.push(ModelEntry {
        id: Some("merged".into()),
        path: pipeline_dir(MODEL),
        is_distilled: None,
        text_encoder: None,
        lora: vec![LoraSpec {
            path: file,
            scale: 0.8,
        }],
        adapters: Vec::new(),
    });
    let running = common::start_with(opts).await;
    let mut c = client(&running).await;

    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let adapters = |id: &str| {
        caps.models
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.adapters.clone())
            .unwrap()
    };
    assert_eq!(adapters(MODEL), ["style"]);
    assert!(adapters("merged").is_empty());
    assert!(caps.features.iter().any(|f| f == "lora"));

    let style = |scale: f32| pb::LoraAdapter {
        name: "style".into(),
        scale: Some(scale),
    };
    let mut image = async |model: &str, loras: Vec<pb::LoraAdapter>| {
        let req = pb::GenerateRequest {
            loras,
            ..golden_t2i_request(model, "t2i")
        };
        let out = generate(&mut c, req).await.unwrap();
        pixels(&out.images[0].png)
    };
    let plain = image(MODEL, vec![]).await;
    let adapted = image(MODEL, vec![style(0.8)]).await;
    let merged = image("merged", vec![]).await;
    let off = image(MODEL, vec![style(0.0)]).await;
    let again = image(MODEL, vec![]).await;
    let moved = max_pixel_diff(&adapted, &plain);
    let from_merged = max_pixel_diff(&adapted, &merged);
    println!("adapter at 0.8: {moved} levels from plain, {from_merged} from the merged model");
    assert!(
        moved > 8.0,
        "the adapter changes the image ({moved} levels)"
    );
    assert!(
        from_merged <= 1.0,
        "{from_merged} levels from the merged model"
    );
    assert_eq!(max_pixel_diff(&off, &plain), 0.0);
    assert_eq!(max_pixel_diff(&again, &plain), 0.0);

    let refused = async |c: &mut _, model: &str, loras| {
        let req = pb::GenerateRequest {
            loras,
            ..golden_t2i_request(model, "t2i")
        };
        generate(c, req).await.unwrap_err()
    };
    let mut c = client(&running).await;
    let unknown = refused(&mut c, "merged", vec![style(1.0)]).await;
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(
        unknown.message().contains("loras[0].name") && unknown.message().contains("none"),
        "{}",
        unknown.message()
    );
    let twice = refused(&mut c, MODEL, vec![style(1.0), style(0.5)]).await;
    assert!(
        twice.message().contains("loras[1].name"),
        "{}",
        twice.message()
    );
}
