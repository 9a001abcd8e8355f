//! Persistent state in an embedded transactional store (redb).
//!
//! Tables: `vms` (name -> [`VmRecord`] as JSON), `points` ((vm, seq) ->
//! [`RecoveryPoint`]), `jobs` (id -> [`Job`]), `meta` (counters).
//!
//! Consistency: a recovery point enters the index in the same transaction
//! that advances the VM's `last_point_seq`, and only after its manifest is
//! durable on the target; so the index never names a point the target lacks.
//! Every method is blocking (redb fsyncs on commit): async callers run them
//! on the blocking pool.

pub mod jobs;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Job, JobId, RecoveryPoint, UnixMillis, VmSpec};
use crate::vm::lifecycle::Lifecycle;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const POINTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("points");
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Jobs kept in the store; older finished ones are dropped.
pub const JOBS_KEPT: usize = 1000;

/// Everything the daemon must remember about a protected VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    /// Protection start (ms); names this protection's objects on the target.
    pub generation: u64,
    pub lifecycle: Lifecycle,
    /// Highest committed recovery point (0 = none yet).
    pub last_point_seq: u64,
    /// Snapshot time of the base (first) point.
    pub protected_since_ms: UnixMillis,
    /// The id of the key the replica is encrypted with (hex); `None`:
    /// written without encryption. A daemon started with another key (or
    /// none, or one where there was none) refuses to go on with it.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Folders this VM's failovers restored its disks into (the VM may run
    /// from any of them): no other restore writes there while the record
    /// lasts. Written by the failover's job, never by the actor.
    #[serde(default)]
    pub failover_restored: Vec<std::path::PathBuf>,
}

#[derive(Clone)]
pub struct StateStore {
    db: Arc<Database>,
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Io(io) => Error::io("state store", io),
        other => Error::Internal(format!("state store: {other}")),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("encode state: {e}")))
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::corrupt(format!("state {what}"), e.to_string()))
}

impl StateStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // redb creates its file with the umask's mode: make it private first.
        if !path.exists() {
            crate::paths::private_options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(format!("create state store {}", path.display()), e))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::FailedPrecondition(format!(
                "state store {} is in use by another process (is ferryd already running?)",
                path.display()
            )),
            other => db_err(other),
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(VMS).map_err(db_err)?;
            tx.open_table(POINTS).map_err(db_err)?;
            tx.open_table(JOBS).map_err(db_err)?;
            tx.open_table(META).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(StateStore { db: Arc::new(db) })
    }

    /// Inserts a new VM; fails if the name is taken.
    pub fn insert_vm(&self, rec: &VmRecord) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            if t.get(rec.spec.name.as_str()).map_err(db_err)?.is_some() {
                return Err(Error::AlreadyExists { what: "VM", name: rec.spec.name.clone() });
            }
            t.insert(rec.spec.name.as_str(), to_json(rec)?.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn put_vm(&self, rec: &VmRecord) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.insert(rec.spec.name.as_str(), to_json(rec)?.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let v = t.get(name).map_err(db_err)?;
        v.map(|g| from_json("vm", g.value())).transpose()
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            out.push(from_json("vm", v.value())?);
        }
        Ok(out)
    }

    /// Removes a VM and its recovery-point index in one transaction.
    pub fn delete_vm(&self, name: &str) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.remove(name).map_err(db_err)?;
            let mut p = tx.open_table(POINTS).map_err(db_err)?;
            let keys: Vec<u64> = p
                .range((name, 0u64)..=(name, u64::MAX))
                .map_err(db_err)?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<std::result::Result<_, _>>()
                .map_err(db_err)?;
            for seq in keys {
                p.remove((name, seq)).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Changes a VM's record in one transaction (read, modify, write), so
    /// concurrent updates of different fields never undo each other.
    pub fn update_vm(&self, name: &str, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let rec = {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            let mut rec: VmRecord = match t.get(name).map_err(db_err)? {
                Some(g) => from_json("vm", g.value())?,
                None => return Err(Error::not_found("VM", name)),
            };
            f(&mut rec);
            t.insert(name, to_json(&rec)?.as_slice()).map_err(db_err)?;
            rec
        };
        tx.commit().map_err(db_err)?;
        Ok(rec)
    }

    /// Commits a recovery point and advances the VM's `last_point_seq`, atomically.
    pub fn commit_point(&self, point: &RecoveryPoint) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            let mut rec: VmRecord = match t.get(point.vm.as_str()).map_err(db_err)? {
                Some(g) => from_json("vm", g.value())?,
                None => return Err(Error::not_found("VM", point.vm.clone())),
            };
            rec.last_point_seq = rec.last_point_seq.max(point.seq);
            t.insert(point.vm.as_str(), to_json(&rec)?.as_slice()).map_err(db_err)?;
            let mut p = tx.open_table(POINTS).map_err(db_err)?;
            p.insert((point.vm.as_str(), point.seq), to_json(point)?.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn list_points(&self, vm: &str) -> Result<Vec<RecoveryPoint>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(POINTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.range((vm, 0u64)..=(vm, u64::MAX)).map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            out.push(from_json("recovery point", v.value())?);
        }
        Ok(out)
    }

    pub fn next_job_id(&self) -> Result<JobId> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut m = tx.open_table(META).map_err(db_err)?;
            let id = m.get("next_job_id").map_err(db_err)?.map(|g| g.value()).unwrap_or(1);
            m.insert("next_job_id", id + 1).map_err(db_err)?;
            id
        };
        tx.commit().map_err(db_err)?;
        Ok(id)
    }

    pub fn put_job(&self, job: &Job) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(JOBS).map_err(db_err)?;
            t.insert(job.id, to_json(job)?.as_slice()).map_err(db_err)?;
            let len = t.len().map_err(db_err)? as usize;
            if len > JOBS_KEPT {
                let old: Vec<u64> = t
                    .iter()
                    .map_err(db_err)?
                    .take(len - JOBS_KEPT)
                    .map(|r| r.map(|(k, _)| k.value()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(db_err)?;
                for id in old {
                    t.remove(id).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn list_jobs(&self) -> Result<Vec<Job>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(JOBS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            out.push(from_json("job", v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DiskSpec, JobKind, JobStatus, PointKind};

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec::new(name, vec![DiskSpec { name: "d".into(), path: "/x/d.img".into() }]),
            generation: 5,
            lifecycle: Lifecycle::default(),
            last_point_seq: 0,
            protected_since_ms: 0,
            key_id: None,
            failover_restored: Vec::new(),
        }
    }

    #[test]
    fn vms_points_and_jobs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = StateStore::open(&path).unwrap();
            s.insert_vm(&rec("a")).unwrap();
            s.insert_vm(&rec("b")).unwrap();
            let e = s.insert_vm(&rec("a")).unwrap_err();
            assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
            let p = RecoveryPoint {
                vm: "a".into(),
                seq: 1,
                time_ms: 10,
                manifest_key: "k".into(),
                bytes_logical: 1,
                bytes_stored: 1,
                kind: PointKind::Base,
            };
            s.commit_point(&p).unwrap();
            s.insert_vm(&rec("ab")).unwrap();
            s.commit_point(&RecoveryPoint { vm: "ab".into(), ..p.clone() }).unwrap();
            let e = s.commit_point(&RecoveryPoint { vm: "zz".into(), ..p.clone() }).unwrap_err();
            assert!(matches!(e, Error::NotFound { .. }), "{e}");
            s.update_vm("a", |r| r.generation = 9).unwrap();
            let id = s.next_job_id().unwrap();
            assert_eq!(s.next_job_id().unwrap(), id + 1);
            s.put_job(&Job {
                id,
                vm: "a".into(),
                kind: JobKind::TestFailover,
                status: JobStatus::Running,
                bytes_done: 0,
                bytes_total: 9,
                started_ms: 1,
                ended_ms: None,
                error: None,
                detail: String::new(),
            })
            .unwrap();
        }
        let s = StateStore::open(&path).unwrap();
        let a = s.get_vm("a").unwrap().unwrap();
        assert_eq!((a.last_point_seq, a.generation), (1, 9), "update_vm keeps what commit_point wrote");
        assert_eq!(s.list_points("a").unwrap().len(), 1, "points of 'ab' must not show under 'a'");
        assert_eq!(s.list_jobs().unwrap().len(), 1);
        s.delete_vm("a").unwrap();
        assert!(s.get_vm("a").unwrap().is_none());
        assert!(s.list_points("a").unwrap().is_empty());
        assert_eq!(s.list_points("ab").unwrap().len(), 1);
        assert_eq!(s.list_vms().unwrap().len(), 2); // b and ab
    }
}
