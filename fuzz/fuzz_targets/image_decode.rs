//! Input image and mask decoding on arbitrary bytes: never panics, never allocates past the
//! limits, and a decoded image respects the side limit.

#![no_main]

use gateway::image_io::{ImageLimits, decode, decode_mask};
use libfuzzer_sys::fuzz_target;

const LIMITS: ImageLimits = ImageLimits {
    max_bytes: 1 << 20,
    max_side: 512,
    max_alloc: 16 << 20,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode(data, "image", &LIMITS) {
        assert!(img.rgb.width() <= LIMITS.max_side && img.rgb.height() <= LIMITS.max_side);
        if let Some(alpha) = &img.alpha {
            assert_eq!(alpha.dimensions(), img.rgb.dimensions());
        }
    }
    if let Ok(mask) = decode_mask(data, "mask", &LIMITS) {
        assert!(mask.width() <= LIMITS.max_side && mask.height() <= LIMITS.max_side);
    }
});
