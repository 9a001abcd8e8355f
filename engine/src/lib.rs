//! Ferry's replication engine.
pub mod bundle;
pub mod changelog;
pub mod config;
pub mod disk;
pub mod error;
pub mod jobs;
pub mod lifecycle;
pub mod manifest;
pub mod model;
pub mod restore;
pub mod snapshot;
pub mod state;
pub mod target;
pub mod throttle;
pub mod upload;
pub use error::{Error, ErrorClass, Result};
