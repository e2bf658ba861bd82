//! Generated gRPC types and stubs for `proto/tre/v1`. Nothing hand-written
//! lives here. Only tre-gateway and tre-cli may depend on this crate: proto
//! types stop at the protocol boundary.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]

pub mod v1 {
    tonic::include_proto!("tre.v1");
}

/// The encoded descriptors of `proto/tre/v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tre_descriptor");
