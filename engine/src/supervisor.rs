//! The supervisor actor: one per engine. It starts and stops the VM actors
//! and is the one place that knows them all. The host-wide upload limiter
//! lives in [`Host`] and is charged by every VM's uploads.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::error::{Error, Result};
use crate::host::Host;
use crate::state::VmRecord;
use crate::vm::{OpenedDisks, Stop, VmActor};

pub struct Supervisor {
    host: Arc<Host>,
    vms: BTreeMap<String, Addr<VmActor>>,
}

impl Supervisor {
    pub fn new(host: Arc<Host>) -> Self {
        Supervisor { host, vms: BTreeMap::new() }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Starts the actor of a VM whose disks are open and whose record is stored.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct StartVm {
    pub rec: VmRecord,
    pub opened: OpenedDisks,
}

impl Handler<StartVm> for Supervisor {
    type Result = Result<()>;
    fn handle(&mut self, msg: StartVm, _ctx: &mut Context<Self>) -> Result<()> {
        let name = msg.rec.spec.name.clone();
        if self.vms.contains_key(&name) {
            return Err(Error::AlreadyExists { what: "VM", name });
        }
        for d in &msg.opened.disks {
            // A failed-over VM's disks take no writes, from their first request on.
            if msg.rec.lifecycle.state == crate::vm::lifecycle::VmState::FailedOver {
                d.stop_writes();
            }
            self.host.disks.insert(d.clone());
        }
        let addr = VmActor::new(self.host.clone(), msg.rec, msg.opened).start();
        self.vms.insert(name, addr);
        Ok(())
    }
}

/// The address of a VM's actor.
#[derive(Message)]
#[rtype(result = "Option<Addr<VmActor>>")]
pub struct Lookup(pub String);

impl Handler<Lookup> for Supervisor {
    type Result = Option<Addr<VmActor>>;
    fn handle(&mut self, msg: Lookup, _ctx: &mut Context<Self>) -> Self::Result {
        self.vms.get(&msg.0).cloned()
    }
}

/// All VM actors, by name.
#[derive(Message)]
#[rtype(result = "Vec<(String, Addr<VmActor>)>")]
pub struct All;

impl Handler<All> for Supervisor {
    type Result = MessageResult<All>;
    fn handle(&mut self, _: All, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.vms.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// Stops a VM's actor (unprotect, or daemon shutdown with `unprotect: false`).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct StopVm {
    pub name: String,
    pub unprotect: bool,
}

impl Handler<StopVm> for Supervisor {
    type Result = ResponseFuture<Result<()>>;
    fn handle(&mut self, msg: StopVm, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(addr) = self.vms.remove(&msg.name) else {
            return Box::pin(async move { Err(Error::not_found("VM", msg.name)) });
        };
        // New NBD connections and embedded writes stop finding the disks now.
        self.host.disks.remove_vm(&msg.name);
        Box::pin(async move {
            addr.send(Stop { unprotect: msg.unprotect })
                .await
                .map_err(|e| Error::Internal(format!("VM actor did not answer: {e}")))?
        })
    }
}
