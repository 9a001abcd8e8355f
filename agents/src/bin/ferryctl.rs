use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = ferry_agents::cli::Args::parse();
    match ferry_agents::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryctl: {e:#}");
            std::process::ExitCode::from(ferry_agents::cli::exit_code(&e))
        }
    }
}
