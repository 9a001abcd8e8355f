//! Generated code for Ferry's gRPC API, `ferry.v1` (see `proto/ferry/v1/ferry.proto`).
//! Nothing but generated code lives here.

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("ferry.v1");

    /// Encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");
}
