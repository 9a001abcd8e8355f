//! Engine scenarios: a VM with two disks is protected, written during the
//! initial copy and across delta cycles, and every recovery point restores
//! to exactly the disks as they were at that point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::lifecycle::VmState;
use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmSpec};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

struct Model {
    disks: BTreeMap<String, Vec<u8>>,
}

fn make_disk(dir: &Path, name: &str, size: u64, random_prefix: u64, rng: &mut impl Rng) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..random_prefix as usize]);
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Random writes, overlapping on purpose, plus a zeroed range; applied to the engine and the model.
async fn churn(engine: &Engine, vm: &str, model: &mut Model, rng: &mut impl Rng, n: usize) {
    for i in 0..n {
        let names: Vec<String> = model.disks.keys().cloned().collect();
        let name = &names[i % names.len()];
        let size = model.disks[name].len() as u64;
        let len = rng.random_range(1..=200_000u64).min(size);
        let offset = rng.random_range(0..=size - len);
        let disk = engine.disk(vm, name).unwrap();
        if i % 7 == 6 {
            disk.write_zeroes(offset, len, false).unwrap();
            model.disks.get_mut(name).unwrap()[offset as usize..(offset + len) as usize].fill(0);
        } else {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            engine.write(vm, name, offset, data.clone()).await.unwrap();
            model.disks.get_mut(name).unwrap()[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        }
    }
}

async fn assert_point_equals(engine: &Engine, vm: &str, seq: u64, expected: &BTreeMap<String, Vec<u8>>, out: &Path) {
    let dir = out.join(format!("p{seq}"));
    let restored = engine.restore(vm, PointSelector::Seq(seq), &dir).await.unwrap();
    assert_eq!(restored.len(), expected.len());
    for (name, want) in expected {
        let got = std::fs::read(dir.join(format!("{name}.img"))).unwrap();
        assert_eq!(got.len(), want.len(), "point {seq} disk {name}: size");
        if got != *want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!("point {seq} disk {name}: first differing byte at {first}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_recovery_point_restores_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (pa, a) = make_disk(tmp.path(), "a", 8 * MIB, 2 * MIB, &mut rng);
    let (pb, b) = make_disk(tmp.path(), "b", 6 * MIB, 2 * MIB, &mut rng);
    let mut model = Model { disks: BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)]) };
    let mut config = EngineConfig::new(tmp.path().join("data"));
    config.chunk_size = 256 << 10;
    // The writes below must land during the initial copy, whatever the
    // machine's speed: at the lowest limit (512 Kbps: 62 KiB/s after a
    // one-second burst) the copy's 4 MiB of random data (zeros are skipped)
    // take over a minute, far longer than 40 writes. The limit is lifted
    // once the test has looked.
    config.bandwidth = ferry_engine::throttle::BandwidthPolicy::flat(Some(ferry_engine::throttle::MIN_LIMIT_BPS));
    const COPY_FLOOR: Duration = Duration::from_secs(60);
    let engine = Engine::open(config).await.unwrap();
    let spec =
        VmSpec::new("vm1", vec![DiskSpec { name: "a".into(), path: pa }, DiskSpec { name: "b".into(), path: pb }])
            .with_frequency(Duration::from_secs(3600));
    let protected_at = std::time::Instant::now(); // the copy starts no earlier
    engine.protect(spec).await.unwrap();
    let mut expected = vec![(1u64, model.disks.clone())];

    // Wait for the snapshot, then write while the disks are being copied.
    loop {
        let s = engine.vm("vm1").await.unwrap().state;
        if s != VmState::EnablingProtection && s != VmState::Unprotected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    churn(&engine, "vm1", &mut model, &mut rng, 40).await;
    let info = engine.vm("vm1").await.unwrap();
    let took = protected_at.elapsed();
    assert!(took < COPY_FLOOR, "the writes took {took:?}: the throttled copy may have ended ({COPY_FLOOR:?} at least)");
    assert_eq!(info.state, VmState::InitialReplication, "the copy cannot have ended after {took:?}: {info:?}");
    assert!(info.disks.iter().any(|d| d.snapshot_bytes > 0), "copy-before-write saved blocks: {info:?}");
    engine.set_bandwidth_limit(None).unwrap();
    let p = engine.replicate_now("vm1").await.unwrap().expect("writes were made");
    expected.push((p.seq, model.disks.clone()));
    let info = engine.vm("vm1").await.unwrap();
    assert_eq!(info.state, VmState::Protected);
    assert!(info.disks.iter().all(|d| d.snapshot_bytes == 0), "snapshot released: {info:?}");
    for d in &info.disks {
        let side = format!("{}.ferry-snap", d.path.display());
        assert!(!Path::new(&side).exists(), "snapshot space reclaimed: {side}");
    }

    // Several delta cycles.
    for _ in 0..3 {
        churn(&engine, "vm1", &mut model, &mut rng, 30).await;
        let p = engine.replicate_now("vm1").await.unwrap().expect("writes were made");
        expected.push((p.seq, model.disks.clone()));
    }
    // A cycle with nothing written cuts no point.
    assert_eq!(engine.replicate_now("vm1").await.unwrap(), None);

    let points = engine.recovery_points("vm1").await.unwrap();
    assert_eq!(points.iter().map(|p| p.seq).collect::<Vec<_>>(), expected.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    assert!(points.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    for (seq, disks) in &expected {
        assert_point_equals(&engine, "vm1", *seq, disks, &tmp.path().join("restore")).await;
    }
    // Committed logs are deleted: only the active log remains beside each disk.
    for name in ["a", "b"] {
        let logs = ferry_engine::changelog::list_logs(&tmp.path().join(format!("{name}.img"))).unwrap();
        assert_eq!(logs.len(), 1, "{logs:?}");
    }
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protection_resumes_after_restart_with_nothing_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (pa, a) = make_disk(tmp.path(), "a", 16 * MIB, MIB, &mut rng);
    let mut model = Model { disks: BTreeMap::from([("a".to_string(), a)]) };
    let config = EngineConfig::new(tmp.path().join("data"));
    let spec =
        VmSpec::new("vm2", vec![DiskSpec { name: "a".into(), path: pa }]).with_frequency(Duration::from_secs(3600));
    {
        let engine = Engine::open(config.clone()).await.unwrap();
        engine.protect(spec).await.unwrap();
        engine.wait_protected("vm2", Duration::from_secs(60)).await.unwrap();
        churn(&engine, "vm2", &mut model, &mut rng, 20).await;
        engine.replicate_now("vm2").await.unwrap().unwrap();
        // Written and flushed but not yet replicated when the daemon stops.
        churn(&engine, "vm2", &mut model, &mut rng, 20).await;
        engine.flush("vm2", "a").await.unwrap();
        engine.shutdown().await.unwrap();
    }
    let engine = Engine::open(config).await.unwrap();
    let info = engine.vm("vm2").await.unwrap();
    assert_eq!(info.state, VmState::Protected, "{info:?}");
    assert!(info.disks[0].pending_log_bytes > 0, "the sealed log waits for upload: {info:?}");
    churn(&engine, "vm2", &mut model, &mut rng, 10).await;
    let p = engine.replicate_now("vm2").await.unwrap().unwrap();
    assert_point_equals(&engine, "vm2", p.seq, &model.disks, &tmp.path().join("restore")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_over_half_the_disk_require_a_resync_and_are_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (pa, _) = make_disk(tmp.path(), "a", 4 * MIB, 0, &mut rng);
    let mut config = EngineConfig::new(tmp.path().join("data"));
    config.auto_resync = ferry_engine::config::AutoResync::Manual; // stay in ResyncRequired to look at it
    let engine = Engine::open(config).await.unwrap();
    let spec = VmSpec::new("vm3", vec![DiskSpec { name: "a".into(), path: pa.clone() }])
        .with_frequency(Duration::from_secs(3600));
    engine.protect(spec).await.unwrap();
    engine.wait_protected("vm3", Duration::from_secs(60)).await.unwrap();
    // 2.5 MiB of writes into a 4 MiB disk: pending logs pass 50%.
    for i in 0..10u64 {
        engine.write("vm3", "a", (i % 4) * MIB, vec![i as u8; 256 << 10]).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = engine.vm("vm3").await.unwrap();
        let logs = ferry_engine::changelog::list_logs(&pa).unwrap();
        if info.state == VmState::ResyncRequired && logs.is_empty() {
            break info;
        }
        assert!(std::time::Instant::now() < deadline, "{info:?} {logs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reason = info.reason.as_deref().unwrap_or("");
    assert!(
        reason.starts_with("change logs of disk a reached ") && reason.ends_with(" bytes, 50% of its size"),
        "{info:?}"
    );
    // Writes go on (to the disk) without logs piling up while the VM waits for its resync.
    for i in 0..8u64 {
        engine.write("vm3", "a", (i * 512) << 10, vec![0xee; 512 << 10]).await.unwrap();
    }
    let info = engine.vm("vm3").await.unwrap();
    assert_eq!(info.disks[0].active_log_bytes + info.disks[0].pending_log_bytes, 0, "{info:?}");
    let e = engine.replicate_now("vm3").await.unwrap_err();
    assert!(e.to_string().contains("ResyncRequired"), "{e}");
    engine.shutdown().await.unwrap();
}
