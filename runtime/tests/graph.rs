//! [`klein_runtime::graph::Graphs`] on the test device (`KLEIN_TEST_DEVICE`, default cpu):
//! replays give the eager forward's bits for new inputs, keys keep their own graphs, and a
//! forward that copies between host and device (it reads a value back) is refused and runs
//! eagerly, leaving the stream usable; a small memset (candle's zeros) replays as a kernel
//! that clears as the memset did; the graphs' memory shows in the device's memory snapshot. On
//! the CPU every call runs eagerly.

use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};
use klein_runtime::{device::DeviceSpec, gpu_memory, graph::Graphs};

fn device() -> Device {
    let name = std::env::var("KLEIN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    DeviceSpec::from_str(&name).unwrap().open().unwrap()
}

/// A product and elementwise kernels on contiguous tensors, with allocations freed inside:
/// device work alone (candle uploads the layout of strided or broadcast operands and of
/// reductions from the host, which a graph refuses).
fn forward(i: &[Tensor]) -> Result<Tensor> {
    let h = i[0].matmul(&i[1])?.gelu()?;
    (&h * 0.5)?.exp()? + &h
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn replays_give_the_eager_bits() -> Result<()> {
    // Why a capture fell back, if one does.
    klein_runtime::telemetry::init_tracing(Default::default());
    let dev = device();
    let graphs = Graphs::new(true, &dev);
    assert_eq!(graphs.enabled(), dev.is_cuda());
    let shapes = [(5usize, 8usize, 3usize), (16, 4, 9)];
    for round in 0..4 {
        for (key, &(m, k, n)) in shapes.iter().enumerate() {
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
            let want = forward(&[a.clone(), b.clone()])?;
            let got = graphs.run(&key, &[&a, &b], forward)?;
            // A strided view of `a`: a graph reads it through its static (contiguous) copy.
            let strided = a.t()?.contiguous()?.t()?;
            let again = graphs.run(&key, &[&strided, &b], |i| {
                forward(&[i[0].contiguous()?, i[1].contiguous()?])
            });
            assert_eq!(bits(&got), bits(&want), "round {round}, key {key}");
            assert_eq!(
                bits(&again?),
                bits(&want),
                "round {round}, key {key}, again"
            );
        }
    }
    let expected = if dev.is_cuda() { shapes.len() } else { 0 };
    assert_eq!(graphs.captured(), expected);
    // The memory the graphs keep mapped between replays shows in the device's snapshot, and
    // handing freed memory back while no graph runs returns all of it.
    if dev.is_cuda() {
        let kept = gpu_memory::snapshot(&dev).expect("a CUDA device's snapshot");
        println!("graph memory: {kept:?}");
        assert!(kept.graph_reserved > 0, "{kept:?}");
        assert!(kept.graph_used <= kept.graph_reserved, "{kept:?}");
        gpu_memory::release_freed_memory(&dev);
        let after = gpu_memory::snapshot(&dev).expect("a CUDA device's snapshot");
        println!("trimmed: {after:?}");
        assert_eq!(after.graph_reserved, 0, "{kept:?} → {after:?}");
    }
    Ok(())
}

#[test]
fn a_forward_that_reads_the_device_back_runs_eagerly() -> Result<()> {
    // Why a capture fell back, if one does.
    klein_runtime::telemetry::init_tracing(Default::default());
    let dev = device();
    let graphs = Graphs::new(true, &dev);
    let reads_back = |i: &[Tensor]| -> Result<Tensor> {
        let scale = i[0].sum_all()?.to_scalar::<f32>()?;
        (&i[0] * scale as f64)?.to_dtype(DType::F32)
    };
    for round in 0..3 {
        let x = Tensor::randn(0f32, 1.0, 64, &dev)?;
        let want = reads_back(std::slice::from_ref(&x))?;
        let got = graphs.run(&"reads back", &[&x], reads_back)?;
        assert_eq!(bits(&got), bits(&want), "round {round}");
    }
    assert_eq!(graphs.captured(), 0);
    // The stream still runs other work, captured or not.
    let a = Tensor::randn(0f32, 1.0, (4, 4), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (4, 4), &dev)?;
    for _ in 0..3 {
        let got = graphs.run(&"plain", &[&a, &b], forward)?;
        assert_eq!(bits(&got), bits(&forward(&[a.clone(), b.clone()])?));
    }
    Ok(())
}

/// A chain of products, then a small cleared tensor (candle's zeros: a memset, 16 KiB)
/// allocated after positive values were freed, likely in their memory, then the sum: a replay
/// whose fill kernel did not clear as the memset did would add the positive values in.
/// (Ordering is checked at full width in denoiser-svc's `graphs` test, where cuBLASLt's
/// memsets sit between products.)
fn cleared(i: &[Tensor]) -> Result<Tensor> {
    let mut y = i[0].clone();
    for _ in 0..24 {
        y = y.matmul(&i[1])?.tanh()?;
    }
    let h = (y.matmul(&i[2])?.exp()? + 1.0)?;
    let y = (&h * 2.0)?;
    drop(h);
    let zeros = Tensor::zeros(y.shape(), DType::F32, y.device())?;
    y + zeros
}

#[test]
fn small_memsets_replay_as_kernels() -> Result<()> {
    // Why a capture fell back, if one does.
    klein_runtime::telemetry::init_tracing(Default::default());
    let dev = device();
    let graphs = Graphs::new(true, &dev);
    for round in 0..4 {
        let a = Tensor::randn(0f32, 1.0, (512, 512), &dev)?;
        let b = (Tensor::randn(0f32, 1.0, (512, 512), &dev)? / 16.0)?;
        let c = Tensor::randn(0f32, 1.0, (512, 8), &dev)?;
        let want = cleared(&[a.clone(), b.clone(), c.clone()])?;
        let got = graphs.run(&"cleared", &[&a, &b, &c], cleared)?;
        assert_eq!(bits(&got), bits(&want), "round {round}");
    }
    assert_eq!(graphs.captured(), usize::from(dev.is_cuda()));
    if dev.is_cuda() {
        assert!(graphs.memsets_as_kernels() >= 1, "the zeros' memset stayed");
    }
    Ok(())
}
