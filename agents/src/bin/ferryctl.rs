use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`ferryctl list | head -1`), as Unix
    // tools do, instead of panicking in println!.
    // SAFETY: a process-wide signal disposition, set before anything is printed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = ferry_agents::cli::Args::parse();
    match ferry_agents::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryctl: {e:#}");
            std::process::ExitCode::from(ferry_agents::cli::exit_code(&e))
        }
    }
}
