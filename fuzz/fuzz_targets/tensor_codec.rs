//! The tensor codec on arbitrary wire tensors: `check` and `decode_with_limits` agree, never
//! panic, never allocate more than the data they were given, and whatever decodes encodes
//! back to the same dtype, shape and bytes.

#![no_main]

use candle_core::Device;
use klein_proto::{pb, tensor};
use libfuzzer_sys::{
    arbitrary::{self, Arbitrary},
    fuzz_target,
};

/// A wire tensor's fields and the limits it is checked against, as the fuzzer builds them.
#[derive(Debug, Arbitrary)]
struct Input {
    dtype: i32,
    shape: Vec<u64>,
    data: Vec<u8>,
    max_rank: u8,
    max_elements: u32,
}

fuzz_target!(|input: Input| {
    let wire = pb::Tensor {
        dtype: input.dtype,
        shape: input.shape,
        data: input.data.into(),
    };
    let limits = tensor::Limits {
        max_rank: usize::from(input.max_rank % 10),
        max_elements: u64::from(input.max_elements),
    };
    let checked = tensor::check(&wire, &limits);
    let decoded = tensor::decode_with_limits(&wire, &Device::Cpu, &limits);
    assert_eq!(
        checked.is_ok(),
        decoded.is_ok(),
        "check and decode disagree"
    );
    if let Ok(t) = decoded {
        let back = tensor::encode(&t).expect("a decoded tensor encodes");
        assert_eq!(back, wire, "the round trip changed the tensor");
    }
});
