//! Configuration layering: defaults < TOML file < KLEIN_* env < flags.

// figment's `Jail` closures must return its (large) error type.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use clap::Parser;
use figment::Jail;
use klein_runtime::{
    bytesize::ByteSize,
    config::{self, ConfigError, ServerConfig, ServerFlags},
    device::{DTypeSpec, DeviceSpec},
};
use serde::{Deserialize, Serialize};

/// A service-shaped config: the shared server settings plus service-specific ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
struct SvcConfig {
    #[serde(flatten)]
    server: ServerConfig,
    model_dir: Option<PathBuf>,
    cache_bytes: ByteSize,
}

#[derive(Debug, Parser, Serialize)]
struct Flags {
    #[command(flatten)]
    #[serde(flatten)]
    server: ServerFlags,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model_dir: Option<PathBuf>,
}

fn flags(args: &[&str]) -> Flags {
    Flags::parse_from(std::iter::once("svc").chain(args.iter().copied()))
}

fn load(file: Option<&Path>, args: &[&str]) -> Result<SvcConfig, ConfigError> {
    config::load(file, &flags(args))
}

#[test]
fn each_layer_overrides_the_one_below() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "svc.toml",
            r#"
                listen = "127.0.0.1:7001"
                device = "cuda:1"
                gpu_memory_budget = "6GiB"
                model_dir = "/models/from-file"
                cache_bytes = "1MiB"
            "#,
        )?;
        let file = Some(Path::new("svc.toml"));

        // Defaults only.
        let d = load(None, &[]).unwrap();
        assert_eq!(d, SvcConfig::default());

        // File over defaults.
        let f = load(file, &[]).unwrap();
        assert_eq!(f.server.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(f.server.device, DeviceSpec::Cuda(1));
        assert_eq!(f.server.gpu_memory_budget, ByteSize(6 << 30));
        assert_eq!(f.cache_bytes, ByteSize(1 << 20));
        assert_eq!(
            f.server.dtype,
            DTypeSpec::F32,
            "untouched keys keep their default"
        );

        // Env over file.
        jail.set_env("KLEIN_GPU_MEMORY_BUDGET", "7GiB");
        jail.set_env("KLEIN_MODEL_DIR", "/models/from-env");
        jail.set_env("KLEIN_DTYPE", "bf16");
        let e = load(file, &[]).unwrap();
        assert_eq!(e.server.gpu_memory_budget, ByteSize(7 << 30));
        assert_eq!(e.model_dir.as_deref(), Some(Path::new("/models/from-env")));
        assert_eq!(e.server.dtype, DTypeSpec::Bf16);
        assert_eq!(
            e.server.device,
            DeviceSpec::Cuda(1),
            "file value survives when env is silent"
        );

        // Flags over env; flags not given do not override.
        let g = load(
            file,
            &[
                "--gpu-memory-budget",
                "8GiB",
                "--model-dir",
                "/models/from-flag",
            ],
        )
        .unwrap();
        assert_eq!(g.server.gpu_memory_budget, ByteSize(8 << 30));
        assert_eq!(g.model_dir.as_deref(), Some(Path::new("/models/from-flag")));
        assert_eq!(
            g.server.dtype,
            DTypeSpec::Bf16,
            "env value survives when no flag is given"
        );
        assert_eq!(
            g.cache_bytes,
            ByteSize(1 << 20),
            "file value survives env and flags"
        );
        Ok(())
    });
}

#[test]
fn a_missing_file_is_an_error() {
    Jail::expect_with(|_| {
        let err = load(Some(Path::new("nope.toml")), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)), "{err}");
        Ok(())
    });
}

#[test]
fn bad_values_name_the_key() {
    Jail::expect_with(|jail| {
        jail.set_env("KLEIN_GPU_MEMORY_BUDGET", "lots");
        let err = load(None, &[]).unwrap_err().to_string().to_lowercase();
        assert!(err.contains("gpu_memory_budget"), "{err}");
        assert!(err.contains("lots"), "{err}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.create_file("svc.toml", "device = \"tpu:0\"")?;
        let err = load(Some(Path::new("svc.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("device"), "{err}");
        Ok(())
    });
}

#[test]
fn bad_flags_are_refused_by_the_parser() {
    let r = Flags::try_parse_from(["svc", "--gpu-memory-budget", "-3"]);
    assert!(r.is_err());
    let r = Flags::try_parse_from(["svc", "--device", "cuda:x"]);
    assert!(r.is_err());
}
