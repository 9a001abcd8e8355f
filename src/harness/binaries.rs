//! `ferryd` and `ferryctl` for tests and benchmarks of the root package.
//!
//! `CARGO_BIN_EXE_*` exists only for the integration tests of the package
//! that defines the binaries (`ferry-agents`), so they are built here with
//! the caller's cargo and profile (a test in `debug`, a benchmark in
//! `release`) and found beside the caller's executable
//! (`target/<profile>/deps/<name>-<hash>` -> `target/<profile>/`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::process::run;

/// Paths of the two binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ferryd: PathBuf,
    pub ferryctl: PathBuf,
}

/// `target/<profile>`, derived from the running test or benchmark.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let deps = exe.parent().expect("deps folder");
    let dir = if deps.ends_with("deps") { deps.parent().expect("profile folder") } else { deps };
    dir.to_path_buf()
}

/// Builds `ferryd` and `ferryctl` in the caller's profile once per process
/// and returns their paths.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = profile_dir();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
        let mut cmd = Command::new(env!("CARGO"));
        crate::harness::process::scrub_cargo_env(&mut cmd);
        cmd.args(["build", "--bins", "-p", "ferry-agents"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        eprintln!("building ferryd and ferryctl ({profile})...");
        let out = run(&mut cmd, Duration::from_secs(1800));
        assert!(out.ok(), "building ferryd/ferryctl failed ({}):\n{}", out.status, out.stderr);
        let bins = Binaries { ferryd: dir.join("ferryd"), ferryctl: dir.join("ferryctl") };
        for bin in [&bins.ferryd, &bins.ferryctl] {
            assert!(bin.is_file(), "{} missing after the build", bin.display());
        }
        bins
    })
}
