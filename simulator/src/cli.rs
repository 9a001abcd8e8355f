//! The command line: flags, their defaults, and the parsers for sizes
//! ("64MiB"), size ranges ("4KiB..256KiB") and durations ("30s").

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::run::SimConfig;

/// Load simulation: protects N VMs in process, drives synthetic churn
/// through the embedded write path while timed replication cycles run,
/// then restores every VM's latest recovery point and compares it byte for
/// byte with the source disks.
///
/// Exit status: 0 when every VM is Protected and verified, 1 when one is
/// not, 2 when the simulation itself could not run.
#[derive(Debug, Parser)]
#[command(name = "ferry-sim", version)]
pub struct Args {
    /// VMs to protect.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub vms: u32,
    /// Raw disks per VM.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub disks_per_vm: u32,
    /// Size of each disk (B, KiB, MiB, GiB, TiB; K/M/G/T are binary too; KB/MB/GB decimal).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub disk_size: u64,
    /// Part of each disk filled with seeded random data before protection,
    /// in percent (the rest is sparse zeros); the initial copy moves it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub prefill: u8,
    /// How long churn runs (humantime: 30s, 2m, 1h).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Replication frequency of every VM (>= 1s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub frequency: Duration,
    /// Bytes per write: a range "MIN..MAX" (inclusive) or one size.
    #[arg(long, default_value = "4KiB..256KiB", value_parser = parse_size_range)]
    pub write_size: RangeInclusive<u64>,
    /// Ops per second per VM (writes, zero-writes and flushes); 0 = as fast as possible.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Share of ops that zero a range instead of writing data, in percent.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub zero_percent: u8,
    /// Share of ops that flush the disk, in percent.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub flush_percent: u8,
    /// Seed of the churn and the prefill: the same seed issues the same ops.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Folder for disks, engine state, target and restores. Must be empty or
    /// absent; it is kept. Default: a temporary folder, removed at the end.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Keep the temporary workdir (and restored images) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// How long to wait for every VM's initial replication.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub protect_timeout: Duration,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The run's configuration; `workdir` is the folder chosen by the caller.
    pub fn sim_config(&self, workdir: PathBuf) -> SimConfig {
        SimConfig {
            vms: self.vms as usize,
            disks_per_vm: self.disks_per_vm as usize,
            disk_size: self.disk_size,
            prefill_percent: self.prefill,
            duration: self.duration,
            frequency: self.frequency,
            write_size: self.write_size.clone(),
            rate: self.rate,
            zero_percent: self.zero_percent,
            flush_percent: self.flush_percent,
            seed: self.seed,
            workdir,
            keep_restored: self.keep || self.workdir.is_some(),
            protect_timeout: self.protect_timeout,
        }
    }
}

/// Parses "64MiB", "4 KiB", "512", "1G", "10MB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = (&s[..split], s[split..].trim());
    if digits.is_empty() {
        return Err(format!("{s:?}: expected a number followed by a unit such as KiB, MiB or GiB"));
    }
    let n: u64 = digits.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" | "Ki" => 1 << 10,
        "M" | "MiB" | "Mi" => 1 << 20,
        "G" | "GiB" | "Gi" => 1 << 30,
        "T" | "TiB" | "Ti" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

/// Parses "4KiB..256KiB" (also "..=") or a single size into an inclusive range.
pub fn parse_size_range(s: &str) -> Result<RangeInclusive<u64>, String> {
    let (lo, hi) = match s.split_once("..") {
        Some((lo, hi)) => (parse_size(lo)?, parse_size(hi.strip_prefix('=').unwrap_or(hi))?),
        None => {
            let v = parse_size(s)?;
            (v, v)
        }
    };
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        let cases = [
            ("512", 512),
            ("4KiB", 4096),
            ("4 KiB", 4096),
            ("64MiB", 64 << 20),
            ("64M", 64 << 20),
            ("1GiB", 1 << 30),
            ("2T", 2 << 40),
            ("10MB", 10_000_000),
            ("3kB", 3000),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        for bad in ["", "MiB", "12XB", "-1", "1.5MiB", "99999999999999999999", "17000000TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ranges_parse_and_must_be_ordered() {
        assert_eq!(parse_size_range("4KiB..256KiB"), Ok(4096..=256 << 10));
        assert_eq!(parse_size_range("4KiB..=8KiB"), Ok(4096..=8192));
        assert_eq!(parse_size_range("64KiB"), Ok(64 << 10..=64 << 10));
        for bad in ["256KiB..4KiB", "0..4KiB", "..4KiB", "4KiB..", "a..b"] {
            assert!(parse_size_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_documented_command_line_parses() {
        let a = Args::try_parse_from([
            "ferry-sim",
            "--vms",
            "3",
            "--disks-per-vm",
            "2",
            "--disk-size",
            "64MiB",
            "--duration",
            "30s",
            "--frequency",
            "1s",
            "--write-size",
            "4KiB..256KiB",
            "--rate",
            "0",
            "--seed",
            "9",
            "--json",
        ])
        .unwrap();
        assert_eq!((a.vms, a.disks_per_vm, a.disk_size, a.rate, a.seed), (3, 2, 64 << 20, 0, 9));
        assert_eq!((a.duration, a.frequency), (Duration::from_secs(30), Duration::from_secs(1)));
        assert_eq!(a.write_size, 4096..=256 << 10);
        assert!(a.json && !a.keep && a.workdir.is_none());
        assert!(Args::try_parse_from(["ferry-sim", "--vms", "0"]).is_err());
    }
}
