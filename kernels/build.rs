//! With the `cuda` feature, compiles every `src/cuda/*.cu` to PTX (nvcc, `CUDA_COMPUTE_CAP`) and
//! writes `ptx.rs` with one `&str` constant per file; without it, does nothing. A build for
//! compute capability 9.0 (PTX target sm_90a) also sets `cfg(klein_sm90a)`: the Hopper-only
//! kernels (wgmma) are compiled in and chosen at run time.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rustc-check-cfg=cfg(klein_sm90a)");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let builder = cudaforge::KernelBuilder::new()
            .source_dir("src/cuda")
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--use_fast_math");
        if builder.get_compute_cap() == Some(90) {
            println!("cargo::rustc-cfg=klein_sm90a");
        }
        let ptx = builder
            .build_ptx()
            .expect("nvcc: compiling kernels/src/cuda");
        ptx.write(out.join("ptx.rs")).expect("writing ptx.rs");
    }
}
