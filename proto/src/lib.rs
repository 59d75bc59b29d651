//! The `klein.v1` wire contract shared by every klein-serve service.
//!
//! # Layout
//! - [`pb`]: prost messages and tonic clients/servers generated from `klein/v1/*.proto`
//!   (protox at build time; no `protoc` needed). `bytes` fields are [`bytes::Bytes`].
//! - [`tensor`]: the one codec between [`pb::Tensor`] and [`candle_core::Tensor`]; it validates
//!   dtype, rank, shape and byte length before allocating anything.
//! - [`lora`]: the rules of a request's LoRA list, the same in the gateway and the denoiser.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!("klein-proto assumes a little-endian host: tensors travel as raw LE bytes");

/// Generated `klein.v1` messages, clients and servers.
#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
pub mod pb {
    tonic::include_proto!("klein.v1");
}

pub mod lora;
pub mod tensor;

/// Encoded `FileDescriptorSet` of every `klein.v1` file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("klein_descriptor");

/// Largest gRPC message (either direction) every klein service and client accepts: 64 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
