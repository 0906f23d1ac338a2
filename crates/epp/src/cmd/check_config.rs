//! `epp check-config FILE`: validate an EndpointPickerConfig without starting anything.

use std::path::PathBuf;
use std::process::ExitCode;

use epp_core::config::EndpointPickerConfig;
use epp_core::datalayer::DataLayer;
use epp_core::scheduler::Scheduler;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The EndpointPickerConfig YAML file to check (`-` reads standard input).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", args.file.display()))?
    };
    let shown = args.file.display();
    let cfg = match EndpointPickerConfig::from_yaml(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{shown}: invalid: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let checked =
        Scheduler::from_config(&cfg).and_then(|s| DataLayer::from_config(&cfg).map(|d| (s, d)));
    match checked {
        Ok((s, d)) => {
            for w in cfg.deprecations() {
                eprintln!("{shown}: deprecated: {w}");
            }
            println!(
                "{shown}: valid; {}; parsers: {}; metrics: {}",
                s.describe(),
                s.parsers().describe(),
                d.describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{shown}: invalid: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
