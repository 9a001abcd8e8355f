//! Ferry's replication engine.
pub mod changelog;
pub mod error;
pub mod lifecycle;
pub mod model;
pub mod state;
pub mod target;
pub use error::{Error, ErrorClass, Result};
