use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = ferry_agents::daemon::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    match ferry_agents::daemon::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
