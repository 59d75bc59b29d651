//! The sampler on its own: sigma tables (spec §4.3 and the diffusers goldens, to 1e-6), the
//! strength cut, and every mode driven by small fake velocity models.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor};
use denoiser_svc::sampler::{
    self, Grid, Guidance, Mode, Request, Run, Shift, TokenLayout, Velocity, empirical_mu, sigmas,
    start_index,
};
use klein_test_support::{golden, manifest, take};

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "{got:?} vs {want:?}");
    }
}

#[test]
fn spec_sigma_tables() {
    // (N_img, mu, first four sigmas) from spec §4.3, 4 steps; printed to 6 decimals.
    let table: &[(usize, f64, [f32; 4])] = &[
        (1024, 2.030690, [1.0, 0.958085, 0.883982, 0.717497]),
        (2304, 2.139227, [1.0, 0.962234, 0.894658, 0.738969]),
        (4096, 2.291180, [1.0, 0.967384, 0.908144, 0.767200]),
        (4080, 2.289823, [1.0, 0.967341, 0.908031, 0.766958]),
        (6144, 1.496662, [1.0, 0.930557, 0.817076, 0.598219]),
        (16384, 3.229986, [1.0, 0.986986, 0.961947, 0.893915]),
    ];
    for &(n, mu, want) in table {
        assert!((empirical_mu(n, 4) - mu).abs() < 1e-6, "mu({n})");
        let s = sigmas(4, n, Shift::Empirical);
        close(&s[..4], &want, 1.5e-6);
        assert_eq!(s[4], 0.0);
    }
    let s = sigmas(50, 4096, Shift::Empirical);
    assert!((empirical_mu(4096, 50) - 2.023351).abs() < 1e-6);
    assert_eq!(s.len(), 51);
    close(&s[..3], &[1.0, 0.997309, 0.994521], 1.5e-6);
    close(&s[47..50], &[0.325593, 0.239631, 0.133719], 1.5e-6);
}

#[test]
fn mu_jumps_at_4300_tokens() {
    assert!((empirical_mu(4300, 4) - 2.308).abs() < 1e-3);
    assert!((empirical_mu(4301, 4) - 1.185).abs() < 1e-3);
}

#[test]
fn golden_sigmas_match_to_1e6() {
    let g = golden("sigmas");
    let pairs = manifest()["cases"]["sigmas"]["params"]["pairs"].clone();
    for pair in pairs.as_array().unwrap() {
        let prefix = pair["prefix"].as_str().unwrap();
        let n = pair["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = pair["image_seq_len"].as_u64().unwrap() as usize;
        let mu = take(&g, &format!("{prefix}.mu")).to_vec1::<f64>().unwrap()[0];
        assert!((empirical_mu(seq, n) - mu).abs() < 1e-12, "{prefix} mu");
        let want = take(&g, &format!("{prefix}.sigmas"))
            .to_vec1::<f32>()
            .unwrap();
        let got = sigmas(n, seq, Shift::Empirical);
        close(&got, &want, 1e-6);
        let timesteps = take(&g, &format!("{prefix}.timesteps"))
            .to_vec1::<f32>()
            .unwrap();
        let t: Vec<f32> = got[..n].iter().map(|s| s * 1000.0).collect();
        close(&t, &timesteps, 1e-3);
        let tau = take(&g, &format!("{prefix}.tau.bf16"))
            .to_dtype(DType::F32)
            .unwrap();
        let tau = tau.to_vec1::<f32>().unwrap();
        let ours: Vec<f32> = t
            .iter()
            .map(|&t| denoiser_svc::model::embeddings::tau(t, DType::BF16))
            .collect();
        assert_eq!(ours, tau, "{prefix} tau");
    }
}

#[test]
fn fixed_shift_and_strength_cut() {
    let s = sigmas(4, 4096, Shift::Fixed(3.0));
    // 3σ / (1 + 2σ) at σ = 1, .75, .5, .25.
    close(&s, &[1.0, 0.9, 0.75, 0.5, 0.0], 1e-6);
    assert_eq!(start_index(6, 0.6), 2);
    assert_eq!(start_index(6, 0.8), 1);
    assert_eq!(start_index(4, 0.8), 0);
    assert_eq!(start_index(10, 0.7), 3);
    assert_eq!(start_index(50, 0.8), 10);
    assert_eq!(start_index(4, 0.0), 4);
    assert_eq!(start_index(4, 1.0), 0);
}

/// A fake model: velocity = `scale` × the mean of the context (per batch item, broadcast),
/// recording the token counts and timesteps it saw.
struct Fake {
    seen: RefCell<Vec<(usize, Vec<f32>)>>,
}

impl Velocity for Fake {
    type Positions = usize;

    fn positions(&self, layout: &TokenLayout) -> Result<usize> {
        Ok(layout.ids().len())
    }

    fn velocity(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        t: &[f32],
        positions: &usize,
        outputs: usize,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        assert_eq!(*positions, ctx.dim(1)? + n);
        assert!(outputs <= n);
        self.seen.borrow_mut().push((n, t.to_vec()));
        ctx.mean_keepdim(2)?
            .mean_keepdim(1)?
            .broadcast_as((b, outputs, c))?
            .contiguous()
    }
}

fn fake() -> Fake {
    Fake {
        seen: RefCell::new(Vec::new()),
    }
}

fn request(mode: Mode, ctx_value: f32, refs: Vec<(Tensor, Grid)>) -> Request {
    let dev = Device::Cpu;
    let grid = Grid {
        height: 2,
        width: 3,
    };
    Request {
        prompt_embeds: Tensor::full(ctx_value, (1, 4, 8), &dev).unwrap(),
        guidance: None,
        noise: Tensor::ones((1, 6, 4), DType::F32, &dev).unwrap(),
        grid,
        references: refs,
        mode,
        num_steps: 4,
        shift: Shift::Empirical,
    }
}

#[test]
fn text_to_image_integrates_the_velocity_over_the_schedule() {
    let m = fake();
    let out = sampler::sample(&m, request(Mode::TextToImage, 0.5, vec![]), |_, _| {}).unwrap();
    // x_0 = noise + Σ (σ_{i+1} − σ_i) v = 1 − 0.5.
    let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| (x - 0.5).abs() < 1e-6), "{v:?}");
    let seen = m.seen.borrow();
    assert_eq!(seen.len(), 4);
    let s = sigmas(4, 6, Shift::Empirical);
    assert_eq!(seen[1].1, vec![s[1] * 1000.0]);
}

#[test]
fn references_are_appended_and_sliced_off() {
    let m = fake();
    let refs = vec![
        (
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
            Grid {
                height: 2,
                width: 2,
            },
        ),
        (
            Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
            Grid {
                height: 1,
                width: 2,
            },
        ),
    ];
    let out = sampler::sample(&m, request(Mode::TextToImage, 0.5, refs), |_, _| {}).unwrap();
    assert_eq!(out.dims(), &[1, 6, 4]);
    assert!(m.seen.borrow().iter().all(|(n, _)| *n == 6 + 4 + 2));
}

#[test]
fn image_to_image_starts_at_the_strength_sigma() {
    let dev = Device::Cpu;
    let x0 = Tensor::full(2f32, (1, 6, 4), &dev).unwrap();
    let mode = Mode::ImageToImage {
        image_latents: x0.clone(),
        strength: 0.5,
    };
    let m = fake();
    let run: Run<usize> = Run::new(&m, request(mode, 0.0, vec![])).unwrap();
    assert_eq!((run.total_steps(), run.steps_done()), (2, 0));
    let s = sigmas(4, 6, Shift::Empirical);
    let start = run
        .latents()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((start[0] - (s[2] + (1.0 - s[2]) * 2.0)).abs() < 1e-6);
    // Strength 0: nothing runs, the image latents come back.
    let mode = Mode::ImageToImage {
        image_latents: x0.clone(),
        strength: 0.0,
    };
    let out = sampler::sample(&m, request(mode, 0.0, vec![]), |_, _| panic!("no step")).unwrap();
    assert_eq!(out.to_vec3::<f32>().unwrap(), x0.to_vec3::<f32>().unwrap());
}

#[test]
fn inpaint_keeps_unmasked_tokens_and_sees_the_source_as_a_reference() {
    let dev = Device::Cpu;
    let x0 = Tensor::full(3f32, (1, 6, 4), &dev).unwrap();
    let mask = Tensor::new(&[[[1f32], [0.0], [0.5], [1.0], [0.0], [0.0]]], &dev).unwrap();
    let mode = Mode::Inpaint {
        image_latents: x0,
        mask,
        strength: 1.0,
    };
    let m = fake();
    let out = sampler::sample(&m, request(mode, 0.5, vec![]), |_, _| {}).unwrap();
    let rows = out.to_vec3::<f32>().unwrap().remove(0);
    assert_eq!(
        rows[1],
        vec![3.0; 4],
        "unmasked token is exactly the source"
    );
    assert!(
        (rows[0][0] - 0.5).abs() < 1e-6,
        "masked token follows the model"
    );
    assert!(
        rows[2][0] > 0.6 && rows[2][0] < 2.9,
        "half mask blends: {rows:?}"
    );
    assert!(
        m.seen.borrow().iter().all(|(n, _)| *n == 12),
        "source tokens appended"
    );
}

#[test]
fn cfg_combines_two_passes() {
    let dev = Device::Cpu;
    let mut req = request(Mode::TextToImage, 0.5, vec![]);
    req.guidance = Some(Guidance {
        negative: Tensor::full(0.25f32, (1, 4, 8), &dev).unwrap(),
        scale: 4.0,
    });
    let m = fake();
    let out = sampler::sample(&m, req, |_, _| {}).unwrap();
    // v = 0.25 + 4 (0.5 − 0.25) = 1.25; x = 1 − 1.25.
    let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| (x + 0.25).abs() < 1e-6), "{v:?}");
    assert_eq!(m.seen.borrow().len(), 8);
}
