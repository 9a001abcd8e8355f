//! Ferry's replication engine.
pub mod changelog;
pub mod error;
pub use error::{Error, ErrorClass, Result};
