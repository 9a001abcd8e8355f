//! One protected VM: its actor and the fence that orders changes to its
//! log chain.

mod actor;
mod fence;

pub use actor::*;
pub(crate) use fence::ChainFence;
