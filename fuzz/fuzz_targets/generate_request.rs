//! Public request validation on arbitrary protobuf bytes: whatever decodes as a
//! GenerateRequest is either refused naming a field or yields a request inside the limits;
//! nothing panics.

#![no_main]

use gateway::{
    config::Limits,
    validate::{ModelCaps, validate},
};
use klein_proto::pb;
use klein_runtime::bytesize::ByteSize;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::GenerateRequest::decode(data) else {
        return;
    };
    let limits = Limits {
        max_image_side: 512,
        max_image_pixels: 512 * 512,
        max_input_image_bytes: ByteSize(1 << 20),
        ..Limits::default()
    };
    let models = [ModelCaps {
        id: "tiny".into(),
        distilled: true,
        default_steps: 4,
        default_guidance: 1.0,
    }];
    match validate(req, &limits, &models) {
        Ok(v) => {
            assert!(v.width % 16 == 0 && v.height % 16 == 0);
            assert!(v.width <= limits.max_image_side && v.height <= limits.max_image_side);
            assert!(v.steps >= 1 && v.steps <= limits.max_steps);
            assert!(v.num_images >= 1 && v.num_images <= limits.max_num_images);
        }
        Err(e) => assert!(e.to_string().contains(':'), "unnamed error: {e}"),
    }
});
