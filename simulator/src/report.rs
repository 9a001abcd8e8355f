//! The run's summary: per-VM outcomes, totals, phase timings, and its two
//! renderings (a table for people, JSON for scripts and tests).

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use serde::Serialize;

const MIB: f64 = (1u64 << 20) as f64;

/// The settings the run used, echoed so a summary stands on its own.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigEcho {
    pub vms: usize,
    pub disks_per_vm: usize,
    pub disk_size: u64,
    pub prefill_percent: u8,
    pub duration_secs: f64,
    pub frequency_secs: f64,
    pub write_size_min: u64,
    pub write_size_max: u64,
    /// Ops per second per VM; 0 = as fast as possible.
    pub rate: u32,
    pub zero_percent: u8,
    pub flush_percent: u8,
    pub seed: u64,
    pub workdir: PathBuf,
}

/// Whether a VM's latest recovery point restored to exactly its disks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// "OK", "FAILED" or "SKIPPED" (VM not Protected: its latest point is known to lag).
    pub status: &'static str,
    /// The recovery point restored.
    pub point: Option<u64>,
    pub bytes_compared: u64,
    /// Why it failed or was skipped.
    pub detail: Option<String>,
}

impl Verification {
    pub fn ok(point: u64, bytes_compared: u64) -> Self {
        Verification { status: "OK", point: Some(point), bytes_compared, detail: None }
    }
    pub fn failed(point: Option<u64>, why: String) -> Self {
        Verification { status: "FAILED", point, bytes_compared: 0, detail: Some(why) }
    }
    pub fn skipped(why: String) -> Self {
        Verification { status: "SKIPPED", point: None, bytes_compared: 0, detail: Some(why) }
    }
    pub fn passed(&self) -> bool {
        self.status == "OK"
    }
}

/// Op latency percentiles in microseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
}

impl Latency {
    /// Percentiles of `samples` (sorted in place); zeros when empty.
    pub fn of(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Latency { p50: rank(0.50), p99: rank(0.99), max: samples[samples.len() - 1] }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub name: String,
    /// Lifecycle state at the end of the run.
    pub state: String,
    pub reason: Option<String>,
    pub ops: u64,
    pub data_writes: u64,
    pub zero_writes: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    /// The op that failed, if churn of this VM stopped early.
    pub churn_error: Option<String>,
    /// Data and zero writes: disk write + change-log append, no flush.
    pub write_latency_us: Latency,
    pub flush_latency_us: Latency,
    /// Recovery points on the target (initial, timed cycles, final).
    pub points: u64,
    pub base_points: u64,
    /// Points cut by timed cycles while churn ran.
    pub points_during_churn: u64,
    /// The point the final `replicate_now` cut (`None`: nothing left to replicate).
    pub final_point: Option<u64>,
    /// Sums over all points: uncompressed bytes, and bytes stored after zstd.
    pub bytes_logical_on_target: u64,
    pub bytes_stored_on_target: u64,
    /// Highest change-log space of a disk during churn, percent of its size (50% = resync).
    pub peak_log_percent: f64,
    pub left_protected_during_churn: Option<String>,
    pub failed_jobs: u64,
    pub verification: Verification,
}

impl VmReport {
    pub fn ok(&self) -> bool {
        self.state == "Protected" && self.churn_error.is_none() && self.verification.passed()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Phases {
    /// Disk creation, engine start, protection and initial replication.
    pub setup_secs: f64,
    pub churn_secs: f64,
    /// The final `replicate_now` of every VM.
    pub final_replication_secs: f64,
    pub verify_secs: f64,
    pub wall_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub ops: u64,
    pub data_writes: u64,
    pub zero_writes: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub mib_written: f64,
    pub points: u64,
    pub bytes_stored_on_target: u64,
    pub vms_verified: usize,
    pub vms_not_ok: usize,
    /// Data bytes written per second of churn, in MiB/s, and ops per second (all VMs).
    pub write_mib_per_sec: f64,
    pub ops_per_sec: f64,
    /// Worst per-VM p99 (each VM's samples are summarised separately).
    pub worst_write_p99_us: u32,
    pub worst_flush_p99_us: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: ConfigEcho,
    pub vms: Vec<VmReport>,
    pub totals: Totals,
    pub phases: Phases,
    /// Every VM Protected, churned without error and verified.
    pub ok: bool,
}

impl Summary {
    pub fn new(config: ConfigEcho, vms: Vec<VmReport>, phases: Phases) -> Self {
        let sum = |f: fn(&VmReport) -> u64| vms.iter().map(f).sum::<u64>();
        let bytes_written = sum(|v| v.bytes_written);
        let ops = sum(|v| v.ops);
        let churn = phases.churn_secs.max(f64::EPSILON);
        let totals = Totals {
            ops,
            data_writes: sum(|v| v.data_writes),
            zero_writes: sum(|v| v.zero_writes),
            flushes: sum(|v| v.flushes),
            bytes_written,
            bytes_zeroed: sum(|v| v.bytes_zeroed),
            mib_written: bytes_written as f64 / MIB,
            points: sum(|v| v.points),
            bytes_stored_on_target: sum(|v| v.bytes_stored_on_target),
            vms_verified: vms.iter().filter(|v| v.verification.passed()).count(),
            vms_not_ok: vms.iter().filter(|v| !v.ok()).count(),
            write_mib_per_sec: bytes_written as f64 / MIB / churn,
            ops_per_sec: ops as f64 / churn,
            worst_write_p99_us: vms.iter().map(|v| v.write_latency_us.p99).max().unwrap_or(0),
            worst_flush_p99_us: vms.iter().map(|v| v.flush_latency_us.p99).max().unwrap_or(0),
        };
        let ok = !vms.is_empty() && totals.vms_not_ok == 0;
        Summary { config, vms, totals, phases, ok }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let rate = if c.rate == 0 { "max".to_string() } else { format!("{}/s", c.rate) };
        writeln!(
            f,
            "ferry-sim: {} VMs x {} disks of {:.1} MiB, churn {:.1}s at {rate} per VM, writes {}..{} B, frequency {:.1}s, seed {}",
            c.vms,
            c.disks_per_vm,
            c.disk_size as f64 / MIB,
            c.duration_secs,
            c.write_size_min,
            c.write_size_max,
            c.frequency_secs,
            c.seed
        )?;
        writeln!(
            f,
            "{:<8} {:>8} {:>7} {:>7} {:>10} {:>6} {:>10} {:>8} {:>9} {:<14} verify",
            "vm", "writes", "zeroes", "flushes", "MiB wrtn", "points", "MiB stored", "peak log", "wr p99us", "state"
        )?;
        for v in &self.vms {
            let mut verify = v.verification.status.to_string();
            if let Some(p) = v.verification.point {
                let _ = write!(verify, " (point {p})");
            }
            if let Some(d) = &v.verification.detail {
                let _ = write!(verify, ": {d}");
            }
            writeln!(
                f,
                "{:<8} {:>8} {:>7} {:>7} {:>10.1} {:>6} {:>10.1} {:>7.1}% {:>9} {:<14} {verify}",
                v.name,
                v.data_writes,
                v.zero_writes,
                v.flushes,
                v.bytes_written as f64 / MIB,
                v.points,
                v.bytes_stored_on_target as f64 / MIB,
                v.peak_log_percent,
                v.write_latency_us.p99,
                v.state,
            )?;
            if let Some(e) = &v.churn_error {
                writeln!(f, "         churn stopped: {e}")?;
            }
            if let Some(s) = &v.left_protected_during_churn {
                writeln!(f, "         left Protected during churn: {s}")?;
            }
        }
        let t = &self.totals;
        let p = &self.phases;
        writeln!(
            f,
            "total: {} ops ({} writes, {} zero-writes, {} flushes), {:.1} MiB written, {:.1} MiB zeroed, {} points, {:.1} MiB stored on target",
            t.ops,
            t.data_writes,
            t.zero_writes,
            t.flushes,
            t.mib_written,
            t.bytes_zeroed as f64 / MIB,
            t.points,
            t.bytes_stored_on_target as f64 / MIB
        )?;
        writeln!(
            f,
            "throughput: {:.1} MiB/s, {:.0} ops/s during churn; worst VM p99 latency: write {} us, flush {} us",
            t.write_mib_per_sec, t.ops_per_sec, t.worst_write_p99_us, t.worst_flush_p99_us
        )?;
        writeln!(
            f,
            "time: setup {:.1}s, churn {:.1}s, final replication {:.1}s, verify {:.1}s, wall {:.1}s",
            p.setup_secs, p.churn_secs, p.final_replication_secs, p.verify_secs, p.wall_secs
        )?;
        write!(
            f,
            "result: {} ({} of {} VMs verified, {} not OK)",
            if self.ok { "OK" } else { "FAILED" },
            t.vms_verified,
            self.vms.len(),
            t.vms_not_ok
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_use_nearest_rank() {
        assert_eq!(Latency::of(&mut []), Latency::default());
        let mut s: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(Latency::of(&mut s), Latency { p50: 50, p99: 99, max: 100 });
        assert_eq!(Latency::of(&mut [7]), Latency { p50: 7, p99: 7, max: 7 });
    }

    fn vm(name: &str, state: &str, verification: Verification) -> VmReport {
        VmReport {
            name: name.into(),
            state: state.into(),
            reason: None,
            ops: 10,
            data_writes: 8,
            zero_writes: 1,
            flushes: 1,
            bytes_written: 2 << 20,
            bytes_zeroed: 4096,
            churn_error: None,
            write_latency_us: Latency { p50: 10, p99: 90, max: 100 },
            flush_latency_us: Latency { p50: 900, p99: 5000, max: 6000 },
            points: 3,
            base_points: 1,
            points_during_churn: 1,
            final_point: Some(3),
            bytes_logical_on_target: 3 << 20,
            bytes_stored_on_target: 1 << 20,
            peak_log_percent: 1.0,
            left_protected_during_churn: None,
            failed_jobs: 0,
            verification,
        }
    }

    fn phases() -> Phases {
        Phases { setup_secs: 1.0, churn_secs: 2.0, final_replication_secs: 0.1, verify_secs: 0.1, wall_secs: 3.2 }
    }

    fn echo() -> ConfigEcho {
        ConfigEcho {
            vms: 2,
            disks_per_vm: 1,
            disk_size: 8 << 20,
            prefill_percent: 0,
            duration_secs: 2.0,
            frequency_secs: 1.0,
            write_size_min: 4096,
            write_size_max: 65536,
            rate: 10,
            zero_percent: 5,
            flush_percent: 2,
            seed: 1,
            workdir: "/tmp/x".into(),
        }
    }

    #[test]
    fn the_run_is_ok_only_when_every_vm_is_protected_and_verified() {
        let good = Summary::new(echo(), vec![vm("a", "Protected", Verification::ok(3, 8 << 20)); 2], phases());
        assert!(good.ok);
        assert_eq!((good.totals.ops, good.totals.points, good.totals.vms_verified), (20, 6, 2));
        assert_eq!(good.totals.write_mib_per_sec, 2.0, "4 MiB over 2 s of churn");
        assert!(good.to_string().ends_with("result: OK (2 of 2 VMs verified, 0 not OK)"), "{good}");

        let skipped = vm("b", "ResyncRequired", Verification::skipped("VM is ResyncRequired".into()));
        let failed = vm("c", "Protected", Verification::failed(Some(3), "first differing byte at offset 7".into()));
        let mut broken = vm("d", "Protected", Verification::ok(3, 8 << 20));
        broken.churn_error = Some("write failed".into());
        for bad in [skipped, failed, broken] {
            let s = Summary::new(echo(), vec![vm("a", "Protected", Verification::ok(3, 1)), bad.clone()], phases());
            assert!(!s.ok, "{bad:?}");
            assert_eq!(s.totals.vms_not_ok, 1);
            assert!(s.to_string().contains(&bad.name), "{s}");
        }
        assert!(!Summary::new(echo(), vec![], phases()).ok, "no VM, nothing verified");
    }
}
