//! Generated gRPC types and stubs for `proto/tre/v1`. Nothing hand-written
//! lives here. Only tre-gateway and tre-cli may depend on this crate: proto
//! types stop at the protocol boundary.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]

pub mod v1 {
    tonic::include_proto!("tre.v1");
}
