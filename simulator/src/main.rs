//! `ferry-sim`: load simulation of the Ferry engine with synthetic churn.
//!
//! Modules: [`cli`] (flags and their parsers), [`churn`] (the pure, seeded
//! op generator), [`run`] (set up, protect, churn, replicate, verify) and
//! [`report`] (the summary, as a table or JSON).

mod churn;
mod cli;
mod report;
mod run;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = cli::Args::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(simulate(&args)));
    match outcome {
        Ok(summary) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary).expect("the summary is plain data"));
            } else {
                println!("{summary}");
            }
            if summary.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ferry-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn simulate(args: &cli::Args) -> anyhow::Result<report::Summary> {
    let workdir = run::Workdir::prepare(args.workdir.as_deref(), args.keep)?;
    let summary = run::run(&args.sim_config(workdir.path().to_path_buf())).await;
    if workdir.is_kept() {
        eprintln!("ferry-sim: workdir kept at {}", workdir.path().display());
    }
    summary
}
