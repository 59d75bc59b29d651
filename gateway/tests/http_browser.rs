//! The web page in headless Chromium: starts the stack with HTTP on 127.0.0.1:0, writes the
//! input pictures and runs `gateway/web/e2e/browser.test.mjs` (node's test runner driving
//! Debian's `/usr/bin/chromium` through playwright-core): text-to-image, image-to-image,
//! inpainting with a painted mask and with the image's alpha, references, LoRA adapters,
//! progress and cancel, history. Screenshots of every mode are saved in `target/tmp/browser/` (or
//! `$KLEIN_ARTIFACTS`).
//!
//! Without node, chromium or `npm ci` in `gateway/web/e2e` the test is skipped, except when
//! `CI=true` or `KLEIN_REQUIRE_BROWSER=1`: there it fails (`.ci/run` installs all three).

mod http_common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use http_common::{picture, picture_with_hole, png};

fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("KLEIN_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_works_in_headless_chromium() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/e2e");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        (!on_path("node")).then_some("node"),
        (!Path::new(&chromium).is_file()).then_some("chromium (apt-get install chromium)"),
        (!e2e.join("node_modules/playwright-core").is_dir())
            .then_some("playwright-core (npm ci --prefix gateway/web/e2e)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        assert!(!required(), "the browser test needs {missing:?}");
        eprintln!("skipped: the browser test needs {missing:?}");
        return;
    }

    let artifacts = std::env::var_os("KLEIN_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser"));
    let inputs = artifacts.join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let black = png(image::DynamicImage::ImageLuma8(image::GrayImage::new(
        64, 64,
    )));
    for (name, bytes) in [
        ("input.png", picture(64, 64, 0)),
        ("alpha.png", picture_with_hole(64, 64)),
        ("ref0.png", picture(64, 64, 60)),
        ("ref1.png", picture(96, 64, 120)),
        ("black.png", black),
    ] {
        std::fs::write(inputs.join(name), bytes).unwrap();
    }

    // The tiny model's fixture adapter, for the page's adapter picker.
    let (running, http) = http_common::start(|o| {
        o.denoiser.adapters = vec![denoiser_svc::lora::AdapterSpec {
            name: "style".into(),
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join(
                "../tests/fixtures/loras/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors",
            ),
        }];
    })
    .await;
    let url = format!("http://{}/", http.addr);
    let dir = artifacts.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "--test-reporter=spec", "browser.test.mjs"])
            .current_dir(&e2e)
            .env("KLEIN_URL", url)
            .env("KLEIN_INPUTS", &inputs)
            .env("KLEIN_ARTIFACTS", &dir)
            .env("CHROMIUM", chromium)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    running.stop().await.unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the browser test failed (output above; screenshots in {})",
        artifacts.display()
    );
    eprintln!("screenshots: {}", artifacts.display());
}
