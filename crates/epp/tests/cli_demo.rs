//! `epp demo` and `epp bench` as a user runs them, with the smallest settings: by default the
//! report is all they print, without a log line for each simulator and picker they start and
//! stop in-process; `--log-level info` (or `RUST_LOG`) brings those lines back.

use std::process::{Command, Output};

/// Runs `epp args` with `RUST_LOG` set to `rust_log`, or unset.
fn epp(rust_log: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    match rust_log {
        Some(l) => cmd.env("RUST_LOG", l),
        None => cmd.env_remove("RUST_LOG"),
    };
    cmd.args(args).output().expect("running epp")
}

/// One simulated backend without simulated latency, no progress bars.
const FAST_SIMS: &[&str] = &[
    "--backends",
    "1",
    "--prefill-per-token-ms",
    "0",
    "--prefill-overhead-ms",
    "0",
    "--inter-token-ms",
    "0",
    "--no-progress",
];

/// Well under a second of load per policy.
fn small_demo() -> Vec<&'static str> {
    [&["demo", "--duration", "0.3", "--rate", "20"], FAST_SIMS].concat()
}

/// Log lines of the in-process simulators and pickers (all at INFO).
const LIFECYCLE: &[&str] = &["picker runtime started", "proxy listening", "proxy stopped"];

/// A successful run's stdout (which holds the result table) and stderr.
fn report(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("requests ok / issued"), "{stdout}");
    (stdout, stderr)
}

/// No INFO line at all on stderr, in particular none of the simulators' and pickers'.
fn assert_no_lifecycle_logs(stderr: &str) {
    assert!(!stderr.contains("INFO"), "{stderr}");
    for line in LIFECYCLE {
        assert!(!stderr.contains(line), "{line:?} in\n{stderr}");
    }
    assert!(!stderr.contains("sim-0"), "{stderr}");
}

#[test]
fn demo_prints_its_report_without_lifecycle_logs_by_default() {
    let (stdout, stderr) = report(&epp(None, &small_demo()));
    // The report: both policies, the table and the targets.
    assert!(stdout.contains("[round-robin] done"), "{stdout}");
    assert!(stdout.contains("[default] done"), "{stdout}");
    assert!(stdout.contains("routing-quality targets:"), "{stdout}");
    assert_no_lifecycle_logs(&stderr);

    // Asked for, with --log-level or RUST_LOG, they are all there.
    let with_flag = [&["--log-level", "info"], &small_demo()[..]].concat();
    for out in [epp(None, &with_flag), epp(Some("info"), &small_demo())] {
        let (_, stderr) = report(&out);
        for line in LIFECYCLE {
            assert!(stderr.contains(line), "{line:?} not in\n{stderr}");
        }
        assert!(stderr.contains("sim-0"), "{stderr}");
    }
}

#[test]
fn bench_prints_its_report_without_lifecycle_logs_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().display().to_string();
    let bench = [
        "bench",
        "--policies",
        "default",
        "--requests",
        "2",
        "--num-groups",
        "1",
        "--num-prompts-per-group",
        "2",
        "--out",
        &out_dir,
    ];
    let (stdout, stderr) = report(&epp(None, &[&bench[..], FAST_SIMS].concat()));
    assert!(stdout.contains("wrote "), "{stdout}");
    // Its own progress notes stay on stderr; the log lines do not.
    assert!(stderr.contains("policy default: proxy"), "{stderr}");
    assert_no_lifecycle_logs(&stderr);
}
