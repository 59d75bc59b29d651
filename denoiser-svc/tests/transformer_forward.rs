//! One transformer forward against the diffusers goldens (`goldens/transformer_forward`), with
//! and without reference tokens, in f32 (rel-L2 <= 1e-4) and bf16 (within 2x torch's own
//! bf16-vs-f32 spread), loaded from the diffusers folder and from a BFL single file.

use candle_core::{DType, Device, Tensor};
use denoiser_svc::{
    model::{AttentionConfig, Flux2Transformer2DModel, PositionId},
    weights::Checkpoint,
};
use klein_test_support::{golden, manifest, pipeline_dir, rel_l2, take, test_device};

fn model(dtype: DType, attention: AttentionConfig) -> Flux2Transformer2DModel {
    Checkpoint::locate(&pipeline_dir("tiny-klein-4b"))
        .unwrap()
        .load(dtype, &test_device(), attention)
        .unwrap()
}

fn ids(t: &Tensor) -> Vec<PositionId> {
    t.squeeze(0)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32, r[3] as u32])
        .collect()
}

fn spread(output: &str) -> f64 {
    manifest()["cases"]["transformer_forward"]["spread"][output]["rel_l2"]
        .as_f64()
        .unwrap()
}

/// (without refs, with refs) outputs of `m` on the golden inputs, the refs output sliced to the
/// noisy tokens as the pipeline does.
fn run(m: &Flux2Transformer2DModel, dtype: DType) -> (Tensor, Tensor) {
    let g = golden("transformer_forward");
    let dev = test_device();
    let ehs = take(&g, "encoder_hidden_states")
        .to_device(&dev)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    let mut out = Vec::new();
    for prefix in ["", "ref."] {
        let hs = take(&g, &format!("{prefix}hidden_states"))
            .to_device(&dev)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let mut all = ids(take(&g, "txt_ids"));
        all.extend(ids(take(&g, &format!("{prefix}img_ids"))));
        let rope = m.rope(&all, &dev).unwrap();
        let y = m.forward(&hs, &ehs, &[730.0], &rope).unwrap();
        out.push(y.to_device(&Device::Cpu).unwrap());
    }
    let with_refs = out.pop().unwrap();
    (out.pop().unwrap(), with_refs)
}

#[test]
fn f32_forward_matches_diffusers() {
    let g = golden("transformer_forward");
    let (plain, refs) = run(&model(DType::F32, AttentionConfig::default()), DType::F32);
    let e = rel_l2(&plain, take(&g, "output.f32"));
    let e_ref = rel_l2(&refs, take(&g, "ref.output.f32"));
    println!("f32 forward rel-L2: {e:.3e}; with references: {e_ref:.3e}");
    assert!(e <= 1e-4, "{e}");
    assert!(e_ref <= 1e-4, "{e_ref}");
}

#[test]
fn bf16_forward_is_within_the_torch_spread() {
    let g = golden("transformer_forward");
    let (plain, refs) = run(&model(DType::BF16, AttentionConfig::default()), DType::BF16);
    let e = rel_l2(&plain, take(&g, "output.bf16"));
    let refs = refs.narrow(1, 0, 24).unwrap();
    let want_ref = take(&g, "ref.output.bf16").narrow(1, 0, 24).unwrap();
    let e_ref = rel_l2(&refs, &want_ref);
    let (s, s_ref) = (spread("output"), spread("ref.output[:, :24]"));
    println!(
        "bf16 forward rel-L2: {e:.3e} (torch spread {s:.3e}); with references: {e_ref:.3e} (spread {s_ref:.3e})"
    );
    assert!(e <= 2.0 * s, "{e} > 2 x {s}");
    assert!(e_ref <= 2.0 * s_ref, "{e_ref} > 2 x {s_ref}");
}

#[test]
fn tiny_score_chunks_change_nothing() {
    let g = golden("transformer_forward");
    // One query row per chunk.
    let (plain, refs) = run(
        &model(DType::F32, AttentionConfig { max_score_bytes: 1 }),
        DType::F32,
    );
    assert!(rel_l2(&plain, take(&g, "output.f32")) <= 1e-4);
    assert!(rel_l2(&refs, take(&g, "ref.output.f32")) <= 1e-4);
}
