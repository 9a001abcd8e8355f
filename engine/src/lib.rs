//! Ferry's replication engine.
pub mod error;
pub use error::{Error, ErrorClass, Result};
