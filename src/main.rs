//! The `outrider` command: `run`, `check`, `demo`, `overlay` and `status`. Owns process concerns only — argument
//! parsing, logging, signals, exit codes; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outrider::app::App;
use outrider::config::Config;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "outrider", version, about = "A sidecar proxy with client-side load balancing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The YAML config file; reloaded on SIGHUP and when it changes.
        #[arg(long, short, env = "OUTRIDER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (exit 0 if valid, 1 if not).
    Check {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Run the embedded quickstart config with three demo instances behind it.
    Demo,
    /// Read or change a service's live overlay in etcd (weights, draining, load balancing,
    /// timeouts, retries, ...). `set` validates before it writes.
    Overlay {
        #[command(subcommand)]
        action: OverlayCmd,
    },
    /// Show a running Outrider's services and endpoints: state, request rate, success rate
    /// and latency (read from its admin API).
    Status {
        /// The admin API's address (host:port).
        #[arg(long, env = "OUTRIDER_ADMIN", default_value = "127.0.0.1:9901")]
        admin: String,
        /// Refresh until interrupted.
        #[arg(long, short)]
        watch: bool,
        /// How often `--watch` refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print JSON for scripts (the dashboard's data without its chart series).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OverlayCmd {
    /// Print the service's overlay.
    Get {
        service: String,
        /// The config file whose etcd settings and overlay_prefix to use.
        #[arg(long, short, env = "OUTRIDER_CONFIG")]
        config: PathBuf,
    },
    /// Change the service's overlay, e.g. `--weight 10.1.2.3:8080=0 --set retries.max_attempts=3`.
    Set {
        service: String,
        #[arg(long, short, env = "OUTRIDER_CONFIG")]
        config: PathBuf,
        /// ADDR=WEIGHT; 0 drains the endpoint. Repeatable.
        #[arg(long = "weight")]
        weights: Vec<String>,
        /// PATH=VALUE (VALUE is YAML), e.g. load_balancing=least_request. Repeatable.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// PATH to remove, so the file's value applies again. Repeatable.
        #[arg(long = "unset")]
        unsets: Vec<String>,
        /// Start from this YAML/JSON document instead of the current overlay.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Delete the service's overlay: the file's values apply again.
    Delete {
        service: String,
        #[arg(long, short, env = "OUTRIDER_CONFIG")]
        config: PathBuf,
    },
}

async fn overlay(cmd: OverlayCmd) -> anyhow::Result<()> {
    use outrider::overlay_cli::OverlayAction;
    let (config, service, action) = match cmd {
        OverlayCmd::Get { service, config } => (config, service, OverlayAction::Get),
        OverlayCmd::Delete { service, config } => (config, service, OverlayAction::Delete),
        OverlayCmd::Set { service, config, weights, sets, unsets, from } => {
            (config, service, OverlayAction::Set { weights, sets, unsets, from })
        }
    };
    println!("{}", outrider::overlay_cli::overlay(&config, &service, action).await?);
    Ok(())
}

async fn status(admin: &str, watch: bool, interval: std::time::Duration, json: bool) -> anyhow::Result<()> {
    use outrider::status_cli;
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    let colour = terminal && std::env::var_os("NO_COLOR").is_none();
    loop {
        let overview = status_cli::fetch(admin).await?;
        let text = if json {
            serde_json::to_string_pretty(&status_cli::for_scripts(overview))? + "\n"
        } else {
            status_cli::render(&overview, colour)
        };
        let mut stdout = std::io::stdout().lock();
        if watch && terminal && !json {
            write!(stdout, "\x1b[2J\x1b[H")?; // clear the screen, cursor home
        }
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        if !watch {
            return Ok(());
        }
        drop(stdout);
        tokio::time::sleep(interval).await;
        if !terminal {
            println!();
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => return check(&file),
        Command::Run { config } => runtime().and_then(|rt| rt.block_on(run(config))),
        Command::Demo => runtime().and_then(|rt| rt.block_on(demo())),
        Command::Overlay { action } => runtime().and_then(|rt| rt.block_on(overlay(action))),
        Command::Status { admin, watch, interval, json } => {
            runtime().and_then(|rt| rt.block_on(status(&admin, watch, interval, json)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outrider: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One worker per core this process may run on (cgroup/affinity aware); a single-core
/// sidecar gets the single-threaded scheduler, which needs no cross-thread wake-ups.
/// `OUTRIDER_WORKER_THREADS` overrides the count.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = std::env::var("OUTRIDER_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut builder = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build().context("cannot start the tokio runtime")
}

fn check(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            let json = serde_json::to_string_pretty(&config.to_json()).unwrap_or_default();
            println!("{json}");
            eprintln!("{}: valid (hash {})", file.display(), config.hash());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    outrider::telemetry::init_logging(&config.logging);
    let app = App::start(config, Some(path.clone())).await?;
    outrider::watch::spawn(app.clone(), path).context("cannot watch the config file")?;
    serve_until_signalled(app).await
}

async fn demo() -> anyhow::Result<()> {
    let config = Config::parse(outrider::demo::QUICKSTART)?;
    outrider::telemetry::init_logging(&config.logging);
    let instances = outrider::demo::start_instances(&config).await.context("cannot start demo instances")?;
    let app = App::start(config, None).await?;
    let listener = app.listener_addr("hello").await.context("quickstart has no `hello` listener")?;
    tracing::info!(?instances, "demo instances up");
    eprintln!("\nTry:  for i in 1 2 3 4; do curl -s http://{listener}/; done");
    eprintln!("      curl -s http://{}/upstreams\n", app.admin_addr());
    serve_until_signalled(app).await
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
async fn serve_until_signalled(app: App) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut signals = 0;
    loop {
        tokio::select! {
            () = app.finished() => return Ok(()),
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals += 1;
        if signals > 1 {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
        tracing::info!("signal received: graceful shutdown");
        app.shutdown(true);
    }
}
