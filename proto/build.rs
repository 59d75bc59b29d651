//! Compiles `klein/v1/*.proto` with protox (no protoc binary) and writes the encoded file
//! descriptor set next to the generated code for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "klein/v1/tensor.proto",
    "klein/v1/info.proto",
    "klein/v1/encoder.proto",
    "klein/v1/denoiser.proto",
    "klein/v1/vae.proto",
    "klein/v1/image.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("klein_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
