//! Retry wiring, end to end through the engine: the quick per-put retries
//! absorb transient target errors; a put that fails every quick try fails
//! the step, and the actor retries the step on the backoff schedule of
//! `ferry_engine::schedule::retry` (1, 2, 4, 8, 10 minutes after the first failure,
//! scaled), as the same recovery point under the same keys; a success
//! resets the schedule.
//!
//! Attempts are counted two ways: each attempt is a delta job (with its
//! start and end time), and the unreliable target counts the faults it
//! injected (one per failed put try).

mod support;

use std::time::Duration;

use ferry_engine::lifecycle::VmState;
use ferry_engine::model::JobStatus;
use ferry_engine::replica::manifest::{manifest_key, object_key};
use ferry_engine::target::unreliable::Faults;
use ferry_engine::PUT_TRIES;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_put_retries_absorb_transient_failures_under_the_same_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let a = random_disk(tmp.path(), "a", MIB, 1);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    // Up to PUT_TRIES - 1 failures of each put are absorbed inside the step.
    for fail_first in 1..PUT_TRIES {
        engine.set_faults(Faults { fail_first, ..Default::default() }).unwrap();
        let before = engine.injected_faults().unwrap();
        for k in 0..2u64 {
            let data = random_bytes(64 * KIB as usize, u64::from(fail_first) * 10 + k);
            engine.write("vm", "a", k * 256 * KIB, data).await.unwrap();
        }
        let seq = replicate(&engine, "vm").await;
        assert_eq!(seq, u64::from(fail_first) + 1);
        let m = stored_manifest(&root, "vm", generation, seq).unwrap();
        let puts = m.disks[0].objects.len() as u64 + 1; // the objects, then the manifest
        assert_eq!(puts, 3);
        // Each key failed exactly `fail_first` times and then went through: a
        // try under a new key would have failed again (its own first tries).
        assert_eq!(engine.injected_faults().unwrap() - before, u64::from(fail_first) * puts);
    }
    let jobs = engine.jobs().await.unwrap();
    assert!(jobs.iter().all(|j| j.status == JobStatus::Succeeded), "no step failed: {jobs:?}");
    let info = engine.vm("vm").await.unwrap();
    assert_eq!((info.state, info.reason), (VmState::Protected, None));
    engine.set_faults(Faults::default()).unwrap();
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_failing_every_quick_try_is_retried_by_the_actor_as_the_same_point_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    // Every key fails its first PUT_TRIES tries: one whole step's worth.
    engine.set_faults(Faults { fail_first: PUT_TRIES, ..Default::default() }).unwrap();
    engine.write("vm", "a", 0, random_bytes(4096, 3)).await.unwrap(); // a one-object point
    let e = engine.replicate_now("vm").await.unwrap_err();
    let object = object_key("vm", generation, "a", 2, 0);
    assert!(e.to_string().contains(&object), "{e}");
    // The actor's retry (30 ms later) puts the object on its fifth try and
    // fails on the manifest's fourth; the next retry commits. Only a retry
    // that reuses both keys (and so their try counts) gets this far.
    eventually("point 2 to commit", Duration::from_secs(30), || async {
        (engine.vm("vm").await.unwrap().last_point_seq == 2).then_some(())
    })
    .await;
    let jobs = delta_attempts(&engine, 2).await;
    let statuses: Vec<JobStatus> = jobs.iter().map(|j| j.status).collect();
    assert_eq!(statuses, vec![JobStatus::Failed, JobStatus::Failed, JobStatus::Succeeded], "{jobs:?}");
    assert!(jobs[0].error.as_deref().unwrap().contains(&object), "{:?}", jobs[0]);
    assert!(jobs[1].error.as_deref().unwrap().contains(&manifest_key("vm", generation, 2)), "{:?}", jobs[1]);
    assert_eq!(engine.injected_faults().unwrap(), 2 * u64::from(PUT_TRIES));
    let m = stored_manifest(&root, "vm", generation, 2).unwrap();
    assert_eq!(m.disks[0].objects.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), vec![object]);
    engine.set_faults(Faults::default()).unwrap();
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_target_is_retried_on_the_backoff_schedule_which_resets_after_a_success() {
    // 1 minute -> 600 ms: far longer than one failing attempt (its put
    // tries sleep 0.1 + 0.2 + 0.4 s), so the schedule shows.
    const SCALE: f64 = 0.01;
    const SLACK_MS: u64 = 750;
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let a = random_disk(tmp.path(), "a", MIB, 4);
    let cfg = config(tmp.path());
    let engine = open_engine_at(cfg, 1.0 / SCALE).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;

    engine.set_faults(Faults { down: true, ..Default::default() }).unwrap();
    engine.write("vm", "a", 0, random_bytes(4096, 5)).await.unwrap();
    assert!(engine.replicate_now("vm").await.unwrap_err().to_string().contains("target unavailable (outage)"));
    // The first failure and three retries (due 0.6, 1.2 and 2.4 s after it), all failing.
    wait_failed_attempts(&engine, 2, 4).await;
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected, "a recoverable failure changes no state");
    assert!(info.disks[0].pending_log_bytes > 0, "the backlog is kept");
    // The target comes back: the next retry (due 4.8 s after the first failure) commits.
    engine.set_faults(Faults::default()).unwrap();
    eventually("point 2 to commit", Duration::from_secs(30), || async {
        (engine.vm("vm").await.unwrap().last_point_seq == 2).then_some(())
    })
    .await;
    let jobs = delta_attempts(&engine, 2).await;
    let fails = failed(&jobs);
    assert!(fails >= 4 && jobs.len() == fails + 1, "{jobs:?}");
    assert_eq!(jobs.last().unwrap().status, JobStatus::Succeeded);
    assert_retry_spacing(&jobs, SCALE, SLACK_MS);
    // Every attempt was point 2, trying the same object key; each tried it PUT_TRIES times.
    let object = object_key("vm", generation, "a", 2, 0);
    for j in &jobs[..fails] {
        assert!(j.error.as_deref().unwrap().contains(&object), "{j:?}");
    }
    assert_eq!(engine.injected_faults().unwrap(), fails as u64 * u64::from(PUT_TRIES));
    let m = stored_manifest(&root, "vm", generation, 2).unwrap();
    assert_eq!(m.disks[0].objects[0].key, object);

    // A new outage starts a new streak: 0.6 s, then 1.2 s after its own
    // first failure. Had the old streak gone on, its next retries would be
    // due 6 s and 24 s after the old first failure.
    engine.set_faults(Faults { down: true, ..Default::default() }).unwrap();
    engine.write("vm", "a", 8192, random_bytes(4096, 6)).await.unwrap();
    assert!(engine.replicate_now("vm").await.is_err());
    wait_failed_attempts(&engine, 3, 3).await;
    engine.set_faults(Faults::default()).unwrap();
    eventually("point 3 to commit", Duration::from_secs(30), || async {
        (engine.vm("vm").await.unwrap().last_point_seq == 3).then_some(())
    })
    .await;
    let jobs = delta_attempts(&engine, 3).await;
    assert_eq!(jobs.last().unwrap().status, JobStatus::Succeeded, "{jobs:?}");
    assert_retry_spacing(&jobs, SCALE, SLACK_MS);
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}
