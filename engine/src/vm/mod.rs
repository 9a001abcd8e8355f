//! One protected VM: its decisions in a pure core, the restart decision,
//! the I/O tasks that carry out the core's commands, and the actor that
//! routes messages between them.
//!
//! | module | what lives there |
//! | --- | --- |
//! | [`lifecycle`] | the VM state machine and its recorded transitions (pure; table-tested) |
//! | `core` | every decision about a VM: lifecycle, point numbers, epochs, backlog, retries, waiters (pure; table and property tests) |
//! | `restart` | how a VM starts from its persisted record and the logs found (pure) |
//! | `open` | scanning and opening a VM's disks per that decision |
//! | `tasks` | the I/O behind each command, and the one commit path |
//! | `fence` | the epoch fence around a VM's log chain |
//! | `actor` | the actix actor: routes messages, carries out commands |

mod actor;
pub(crate) mod core;
mod fence;
pub mod lifecycle;
mod open;
pub(crate) mod restart;
mod tasks;

pub use actor::{DiskInfo, VmInfo};
pub(crate) use actor::{FailOver, GetInfo, Operator, ReplicaDamaged, ReplicateNow, Stop, VmActor};
pub(crate) use fence::ChainFence;
pub(crate) use open::{open_vm, OpenedDisks};
