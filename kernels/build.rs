//! With the `cuda` feature, compiles every `src/cuda/*.cu` to PTX (nvcc, `CUDA_COMPUTE_CAP`) and
//! writes `ptx.rs` with one `&str` constant per file; without it, does nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("src/cuda")
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--use_fast_math")
            .build_ptx()
            .expect("nvcc: compiling kernels/src/cuda");
        ptx.write(out.join("ptx.rs")).expect("writing ptx.rs");
    }
}
