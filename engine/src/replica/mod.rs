//! What lives on the target for a VM: extent bundles ([`bundle`]), the
//! recovery point manifests that are the commit records and the object keys
//! ([`manifest`]), and the replica's block hashes kept beside the daemon for
//! resync ([`hashes`]).

pub mod bundle;
pub mod hashes;
pub mod manifest;
