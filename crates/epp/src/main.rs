//! `epp`: the one binary users run. Each subcommand lives in `cmd/<name>.rs` and only
//! translates flags into the library crates' configuration types.

mod cmd;

use clap::{Parser, Subcommand};
use cmd::common::LogFormatArg;
use epp_core::telemetry::init_logging;

#[derive(Parser, Debug)]
#[command(
    name = "epp",
    version,
    about = "Endpoint Picker for LLM inference: an Envoy ext_proc picker, an OpenAI-compatible proxy, and tools",
    propagate_version = true
)]
struct Cli {
    /// Log level or filter directive (e.g. `info`, `debug`, `epp_core=debug,info`).
    /// When absent, `RUST_LOG` is used; when both are absent, `info` (`warn` for `bench` and
    /// `demo`, whose report would drown in their simulators' and pickers' start/stop lines).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    /// Log output format (default: text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,

    /// llm-d-router's log verbosity: 0-2 info, 3-4 debug, 5 and up trace (below
    /// `--log-level` and `--zap-log-level`).
    #[arg(short = 'v', long = "v", global = true, value_name = "N")]
    verbosity: Option<u8>,

    /// llm-d-router's (controller-runtime zap) log encoding: `json` or `console`; same as
    /// `--log-format json|text`.
    #[arg(long, global = true, value_name = "ENCODER", value_parser = ["json", "console"])]
    zap_encoder: Option<String>,

    /// llm-d-router's zap level: `debug`, `info`, `error`, or a verbosity number (as `-v`).
    #[arg(long, global = true, value_name = "LEVEL")]
    zap_log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Envoy ext_proc endpoint picker (the Gateway API Inference Extension protocol).
    Serve(cmd::serve::Args),
    /// Run the picker as a standalone OpenAI-compatible HTTP proxy.
    Proxy(cmd::proxy::Args),
    /// Run one or more simulated vLLM model servers.
    Sim(cmd::sim::Args),
    /// Benchmark routing policies side by side against fresh simulators.
    Bench(cmd::bench::Args),
    /// One-command demo: simulators + picker + workload, round-robin vs the default profile.
    Demo(cmd::demo::Args),
    /// Check a running picker (and optionally Prometheus) and explain every failure.
    Doctor(cmd::doctor::Args),
    /// Validate an EndpointPickerConfig file and name the exact field at fault.
    CheckConfig(cmd::check_config::Args),
}

/// The log filter used when neither `--log-level` nor `RUST_LOG` is given. `bench` and `demo`
/// print a report; the simulators and pickers they start and stop in-process log each of
/// those at INFO, so by default they show warnings and errors only (`--log-level info` brings
/// the lifecycle lines back). Every server command keeps `info`: its effective configuration
/// and listening addresses.
fn default_log_level(command: &Command) -> &'static str {
    match command {
        Command::Bench(_) | Command::Demo(_) => "warn",
        _ => "info",
    }
}

/// `--log-level`, else `None` when `RUST_LOG` is set (init_logging reads it), else the
/// command's default.
/// A controller-runtime verbosity as a level: llm-d-router logs its defaults at 2, verbose
/// at 3, debug at 4, trace at 5.
fn verbosity_level(v: u8) -> &'static str {
    match v {
        0..=2 => "info",
        3..=4 => "info,epp=debug,epp_core=debug,epp_sim=debug,epp_doctor=debug",
        _ => "info,epp=trace,epp_core=trace,epp_sim=trace,epp_doctor=trace",
    }
}

/// `--zap-log-level` as a level.
fn zap_level(s: &str) -> Result<&'static str, String> {
    match s {
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warn" => Ok("warn"),
        "error" | "dpanic" | "panic" | "fatal" => Ok("error"),
        n => n
            .parse::<u8>()
            .map(verbosity_level)
            .map_err(|_| format!("--zap-log-level {n:?}: use debug, info, error or a number")),
    }
}

fn log_level(cli: &Cli) -> Option<String> {
    let rust_log_set = std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty());
    let go_level = match (&cli.zap_log_level, cli.verbosity) {
        (Some(z), _) => zap_level(z).ok().map(str::to_string),
        (None, Some(v)) => Some(verbosity_level(v).to_string()),
        (None, None) => None,
    };
    match cli.log_level.clone().or(go_level) {
        Some(l) => Some(l),
        None if rust_log_set => None,
        None => Some(default_log_level(&cli.command).to_string()),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(cmd::goflags::normalize::<Cli>(std::env::args_os()));
    if let Some(Err(e)) = cli.zap_log_level.as_deref().map(zap_level) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let format = match (cli.log_format, cli.zap_encoder.as_deref()) {
        (Some(f), _) => f,
        (None, Some("json")) => LogFormatArg::Json,
        _ => LogFormatArg::Text,
    };
    if let Err(e) = init_logging(log_level(&cli).as_deref(), format.into()) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => cmd::serve::run(a).await,
            Command::Proxy(a) => cmd::proxy::run(a).await,
            Command::Sim(a) => cmd::sim::run(a).await,
            Command::Bench(a) => cmd::bench::run(a).await,
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Doctor(a) => cmd::doctor::run(a).await,
            Command::CheckConfig(a) => cmd::check_config::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bench_and_demo_default_to_warnings() {
        let level = |argv: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("epp").chain(argv.iter().copied()))
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            default_log_level(&cli.command)
        };
        assert_eq!(level(&["demo"]), "warn");
        assert_eq!(level(&["bench"]), "warn");
        // The servers log their configuration and addresses at start-up.
        assert_eq!(level(&["sim"]), "info");
        assert_eq!(level(&["proxy", "--endpoint", "127.0.0.1:8001"]), "info");
        assert_eq!(level(&["serve", "--endpoint", "127.0.0.1:8001"]), "info");
        // An explicit --log-level always wins.
        let cli = Cli::try_parse_from(["epp", "--log-level", "debug", "demo"]).unwrap();
        assert_eq!(log_level(&cli).as_deref(), Some("debug"));
    }
}
