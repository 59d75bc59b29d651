//! The tensor codec: round trips for every wire dtype, and every kind of malformed input
//! refused with a typed error before anything is allocated.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use klein_proto::{
    pb,
    tensor::{self, Limits, TensorCodecError},
};
use proptest::prelude::*;

fn wire(dtype: pb::Dtype, shape: &[u64], len: usize) -> pb::Tensor {
    pb::Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: Bytes::from(vec![0u8; len]),
    }
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..=4)
}

proptest! {
    #[test]
    fn f32_round_trips_bit_exactly(shape in shape_strategy(), seed in any::<u64>()) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| f32::from_bits((seed as u32).wrapping_mul(2654435761).wrapping_add(i as u32 * 7919) & 0x7f7f_ffff))
            .collect();
        let t = Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap();
        let w = tensor::encode(&t).unwrap();
        prop_assert_eq!(w.data.len(), n * 4);
        let back = tensor::decode(&w, &Device::Cpu).unwrap();
        prop_assert_eq!(back.dims(), shape.as_slice());
        let got: Vec<u32> = back.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn every_dtype_round_trips(shape in shape_strategy(), dtype_idx in 0usize..5) {
        let dtype = [DType::F32, DType::BF16, DType::F16, DType::U8, DType::I64][dtype_idx];
        let n: usize = shape.iter().product();
        let t = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap()
            .to_dtype(DType::F32).unwrap()
            .affine(1.0, 0.0).unwrap()
            .to_dtype(dtype).unwrap()
            .reshape(shape.as_slice()).unwrap();
        let w = tensor::encode(&t).unwrap();
        prop_assert_eq!(w.data.len(), n * dtype.size_in_bytes());
        let back = tensor::decode(&w, &Device::Cpu).unwrap();
        prop_assert_eq!(back.dtype(), dtype);
        let a = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = back.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn any_wrong_length_is_refused(shape in shape_strategy(), delta in 1usize..9, longer in any::<bool>()) {
        let n: usize = shape.iter().product::<usize>() * 4;
        let len = if longer { n + delta } else { n.saturating_sub(delta) };
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let err = tensor::decode(&wire(pb::Dtype::F32, &shape, len), &Device::Cpu).unwrap_err();
        prop_assert_eq!(err, TensorCodecError::ByteLength { expected: n as u64, actual: len as u64 });
    }

    #[test]
    fn arbitrary_headers_never_panic(dtype in -3i32..10, shape in prop::collection::vec(any::<u64>(), 0..10), len in 0usize..256) {
        let w = pb::Tensor { dtype, shape, data: Bytes::from(vec![1u8; len]) };
        let _ = tensor::decode(&w, &Device::Cpu);
    }
}

#[test]
fn malformed_headers_get_typed_errors() {
    let big = u64::MAX / 2;
    let cases: Vec<(&str, pb::Tensor, TensorCodecError)> = vec![
        (
            "unspecified dtype",
            pb::Tensor {
                dtype: 0,
                shape: vec![2],
                data: Bytes::from(vec![0u8; 8]),
            },
            TensorCodecError::UnspecifiedDtype,
        ),
        (
            "unknown dtype",
            pb::Tensor {
                dtype: 99,
                shape: vec![2],
                data: Bytes::from(vec![0u8; 8]),
            },
            TensorCodecError::UnknownDtype(99),
        ),
        (
            "rank 0",
            wire(pb::Dtype::F32, &[], 4),
            TensorCodecError::Rank { rank: 0, max: 8 },
        ),
        (
            "rank 9",
            wire(pb::Dtype::U8, &[1; 9], 1),
            TensorCodecError::Rank { rank: 9, max: 8 },
        ),
        (
            "zero dim",
            wire(pb::Dtype::F32, &[3, 0, 2], 0),
            TensorCodecError::ZeroDim { axis: 1 },
        ),
        (
            "overflowing shape product",
            wire(pb::Dtype::F32, &[big, big, 4], 16),
            TensorCodecError::TooManyElements {
                shape: vec![big, big, 4],
                max: Limits::default().max_elements,
            },
        ),
        (
            "over the element cap",
            wire(pb::Dtype::U8, &[1 << 20, 65], 16),
            TensorCodecError::TooManyElements {
                shape: vec![1 << 20, 65],
                max: Limits::default().max_elements,
            },
        ),
        (
            "short buffer",
            wire(pb::Dtype::Bf16, &[2, 3], 11),
            TensorCodecError::ByteLength {
                expected: 12,
                actual: 11,
            },
        ),
        (
            "long buffer",
            wire(pb::Dtype::I64, &[2], 17),
            TensorCodecError::ByteLength {
                expected: 16,
                actual: 17,
            },
        ),
    ];
    for (name, w, want) in cases {
        assert_eq!(
            tensor::decode(&w, &Device::Cpu).unwrap_err(),
            want,
            "{name}"
        );
    }
}

#[test]
fn element_cap_is_configurable_and_inclusive() {
    let limits = Limits {
        max_rank: 2,
        max_elements: 6,
    };
    assert!(
        tensor::decode_with_limits(&wire(pb::Dtype::U8, &[2, 3], 6), &Device::Cpu, &limits).is_ok()
    );
    assert!(matches!(
        tensor::decode_with_limits(&wire(pb::Dtype::U8, &[7], 7), &Device::Cpu, &limits),
        Err(TensorCodecError::TooManyElements { .. })
    ));
    assert_eq!(
        tensor::decode_with_limits(&wire(pb::Dtype::U8, &[1, 1, 1], 1), &Device::Cpu, &limits)
            .unwrap_err(),
        TensorCodecError::Rank { rank: 3, max: 2 }
    );
}

#[test]
fn field_errors_become_invalid_argument_naming_the_field() {
    let err = tensor::decode_required(None, "prompt_embeds", &Device::Cpu, &Limits::default())
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "prompt_embeds: is required");

    let bad = wire(pb::Dtype::F32, &[2], 7);
    let status = tonic::Status::from(
        tensor::decode_required(Some(&bad), "inpaint.mask", &Device::Cpu, &Limits::default())
            .unwrap_err(),
    );
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("inpaint.mask: data has 7 bytes"),
        "{}",
        status.message()
    );
}

#[test]
fn unsupported_dtypes_are_refused_on_encode() {
    let t = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert_eq!(
        tensor::encode(&t).unwrap_err(),
        TensorCodecError::UnsupportedDtype(DType::U32)
    );
}

#[test]
fn non_contiguous_tensors_encode_in_logical_order() {
    let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap()
        .t()
        .unwrap();
    let back = tensor::decode(&tensor::encode(&t).unwrap(), &Device::Cpu).unwrap();
    assert_eq!(
        back.to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 3.0], vec![1.0, 4.0], vec![2.0, 5.0]]
    );
}

proptest! {
    /// The bit-level scan finds exactly what `is_finite` on the decoded values finds, in every
    /// float dtype, for one special value placed anywhere (across block boundaries too).
    #[test]
    fn first_non_finite_agrees_with_the_decoded_values(
        n in 1usize..10_000,
        at in any::<prop::sample::Index>(),
        special in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -0.0]),
        dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16]),
    ) {
        let mut values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        values[at.index(n)] = special;
        let t = Tensor::from_vec(values, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let decoded = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let want = decoded.iter().position(|v| !v.is_finite());
        prop_assert_eq!(tensor::first_non_finite(&tensor::encode(&t).unwrap()), want);
    }
}

#[test]
fn first_non_finite_ignores_integer_tensors() {
    assert_eq!(
        tensor::first_non_finite(&wire(pb::Dtype::U8, &[4], 4)),
        None
    );
    let mut t = wire(pb::Dtype::I64, &[1], 8);
    t.data = Bytes::from(u64::MAX.to_le_bytes().to_vec());
    assert_eq!(tensor::first_non_finite(&t), None);
}
