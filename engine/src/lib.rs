//! Ferry's replication engine.
pub mod error;
pub mod nbd;
pub use error::{Error, ErrorClass, Result};
