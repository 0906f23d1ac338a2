//! `epp doctor` against the real thing: `epp proxy` in front of three `epp sim`
//! servers, and a real Prometheus scraping it with the shipped static configs.
//!
//! - a healthy setup (token auth, right token, traffic): exit 0, every line ✓;
//! - the wrong token, for doctor and for Prometheus: exit 1, ✗ lines naming the 401 and the fix;
//! - a wrong job label in Prometheus' scrape config: exit 1, ✗ lines naming the job that has
//!   the data; and with `--job` set to it, the shipped alerts are the ones left failing;
//! - no traffic yet: warnings, exit 0;
//! - an unreachable picker and bad flags.
//!
//! `cargo test -p epp --test doctor_e2e`. Needs `prometheus` (EPP_PROMETHEUS_BIN or PATH;
//! `scripts/test` installs it). Everything binds 127.0.0.1.

#[path = "support/monitoring.rs"]
mod common;

#[path = "support/doctor.rs"]
mod support;

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use support::*;

/// Load: 2 senders, each pausing this long between requests.
const LOAD_PAUSE: Duration = Duration::from_millis(25);

/// Waits until `expr` returns data in Prometheus.
fn wait_for(prom: &Prometheus, expr: &str, procs: &Procs) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while prom.query(expr).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{expr} never returned data; targets {:?}\n{}\n{}",
            prom.targets(),
            prom.log(),
            procs.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Dashboard queries and alerts in the shipped assets (what doctor checks by default).
fn shipped_counts() -> (usize, usize) {
    (dashboard_queries(&json(DASHBOARD)).len(), alerts().len())
}

#[test]
fn healthy_setup_passes() {
    let token = "doctor-e2e-token";
    let (procs, proxy, metrics) = start_stack(
        &[
            "--metrics-auth=token",
            "--metrics-token-file={dir}/picker.token",
        ],
        &[("picker.token", &format!("{token}\n"))],
    );
    let _load = start_load(proxy, 2, LOAD_PAUSE);
    let mut cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &metrics.to_string());
    let file = credentials_file(&cfg);
    // With the shipped alerts loaded.
    cfg["rule_files"] = vec![serde_yaml::Value::from("epp-alerts.rules.yaml")].into();
    let rules = read(RULES);
    let prom = start_prometheus(
        &cfg,
        &[
            (&file, &format!("{token}\n")),
            ("epp-alerts.rules.yaml", &rules),
        ],
    );
    let token_file = procs.dir.path().join("picker.token");
    let args = vec![
        format!("--metrics-url=http://{metrics}/metrics"),
        format!("--token-file={}", token_file.display()),
        format!("--prometheus-url=http://{}", prom.addr),
    ];
    // Rates need a few scrapes with traffic: retry (bounded) until everything is green.
    wait_for(&prom, &format!("up{{job=\"{JOB}\"}} == 1"), &procs);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, out) = loop {
        let (code, out) = doctor(&args);
        let clean = code == 0 && !out.lines().any(|l| l.starts_with("! "));
        if clean || Instant::now() > deadline {
            break (code, out);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 0, "{out}\n{}", procs.logs());
    let not_ok: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("✗") || l.starts_with("! ") || l.starts_with("- "))
        .collect();
    assert!(not_ok.is_empty(), "{not_ok:?}\n{out}");
    assert!(out.contains(&format!(
        "✓ picker auth: 200 OK with the token from --token-file {}\n",
        token_file.display()
    )));
    assert!(out.contains("✓ picker exposition: parses:"), "{out}");
    assert!(
        out.contains("✓ picker identity: epp_build_info: epp version"),
        "{out}"
    );
    let (metrics_line, _) = line_and_next(&out, "✓ picker metrics for the dashboard and alerts:");
    let counts: Vec<&str> = metrics_line.split_whitespace().collect();
    assert!(
        metrics_line.contains(" metric names they use are exposed")
            && counts.windows(3).any(|w| w[1] == "of" && w[0] == w[2]),
        "every metric present: {metrics_line}"
    );
    assert!(
        out.contains(&format!(
            "✓ Prometheus target: up{{job=\"{JOB}\"}} = 1 for {metrics}\n"
        )),
        "{out}"
    );
    let (dashboards, alerts) = shipped_counts();
    assert!(
        out.contains(&format!(
            "✓ Prometheus alert rules: all {alerts} alerts of {RULES} are loaded\n"
        )),
        "{out}"
    );
    assert_eq!(
        lines_starting(&out, "✓ dashboard panel ").len(),
        dashboards,
        "{out}"
    );
    assert_eq!(lines_starting(&out, "✓ alert ").len(), alerts, "{out}");
    assert!(
        out.trim_end().ends_with("checks passed"),
        "summary line: {out}"
    );
}

#[test]
fn wrong_token_is_explained() {
    let (procs, _proxy, metrics) = start_stack(
        &[
            "--metrics-auth=token",
            "--metrics-token-file={dir}/picker.token",
        ],
        &[("picker.token", "the-right-token\n")],
    );
    // Prometheus scrapes with the wrong token too.
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &metrics.to_string());
    let file = credentials_file(&cfg);
    let prom = start_prometheus(&cfg, &[(&file, "a-wrong-token\n")]);
    wait_for(&prom, &format!("up{{job=\"{JOB}\"}} == 0"), &procs);

    let (code, out) = doctor(&[
        format!("--metrics-url=http://{metrics}/metrics"),
        "--token=a-wrong-token".to_string(),
        format!("--prometheus-url=http://{}", prom.addr),
    ]);
    assert_eq!(code, 1, "{out}");
    let (auth, fix) = line_and_next(&out, "✗ picker auth:");
    assert!(
        auth.starts_with("✗ picker auth: 401 Unauthorized with the token from --token; the picker says: missing or invalid bearer token"),
        "{auth}"
    );
    assert!(
        fix.starts_with("    fix: ") && fix.contains("--metrics-token-file"),
        "{fix}"
    );
    assert!(out.contains("- picker exposition: skipped"), "{out}");
    let (target, fix) = line_and_next(&out, "✗ Prometheus target:");
    assert!(
        target.contains(&format!("up{{job=\"{JOB}\"}} = 0 for {metrics}"))
            && target.contains("401"),
        "{target}"
    );
    assert!(fix.contains("credentials_file"), "{fix}");
    // Every dashboard query but `sum(up{job=...})` is empty because of that, and says so.
    let (dashboards, _) = shipped_counts();
    let failed = lines_starting(&out, "✗ dashboard panel ");
    assert_eq!(failed.len(), dashboards - 1, "{out}");
    assert!(
        failed
            .iter()
            .all(|l| l.contains("the job's target is down")),
        "{failed:#?}"
    );

    // Without any token: the fix names the flags.
    let (code, out) = doctor(&[format!("--metrics-url=http://{metrics}/metrics")]);
    assert_eq!(code, 1, "{out}");
    let (auth, fix) = line_and_next(&out, "✗ picker auth:");
    assert!(
        auth.starts_with("✗ picker auth: 401 Unauthorized without a token; the picker says: missing or invalid bearer token"),
        "{auth}"
    );
    assert!(fix.contains("--token-file"), "{fix}");

    // With the right token the picker side is fine.
    let (_, out) = doctor(&[
        format!("--metrics-url=http://{metrics}/metrics"),
        "--token=the-right-token".into(),
    ]);
    assert!(
        out.contains("✓ picker auth: 200 OK with the token from --token\n"),
        "{out}"
    );
}

#[test]
fn wrong_job_label_is_named() {
    let (procs, proxy, metrics) = start_stack(&["--metrics-auth=none"], &[]);
    let _load = start_load(proxy, 2, LOAD_PAUSE);
    let mut cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    // The seed's job name.
    cfg["scrape_configs"][0]["job_name"] = "llm-d-epp".into();
    let prom = start_prometheus(&cfg, &[]);
    wait_for(&prom, "epp_build_info{job=\"llm-d-epp\"}", &procs);
    let base = vec![
        format!("--metrics-url=http://{metrics}/metrics"),
        format!("--prometheus-url=http://{}", prom.addr),
    ];

    // https:// against the plain-HTTP metrics port: the mismatch is named.
    let (code, out) = doctor(&[format!("--metrics-url=https://{metrics}/metrics")]);
    assert_eq!(code, 1, "{out}");
    let (tls, fix) = line_and_next(&out, "✗ picker TLS:");
    assert!(tls.contains("does not speak TLS"), "{tls}");
    assert!(
        fix.contains(&format!("use http://{metrics}/metrics")),
        "{fix}"
    );

    let (code, out) = doctor(&base);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✓ picker auth: 200 OK without a token"),
        "{out}"
    );
    let (target, fix) = line_and_next(&out, "✗ Prometheus target:");
    assert_eq!(
        target,
        format!(
            "✗ Prometheus target: no target has job=\"{JOB}\": the job label is wrong; the picker is scraped as job=\"llm-d-epp\""
        ),
        "{out}"
    );
    assert!(
        fix.contains("--job llm-d-epp") && fix.contains(&format!("rename the scrape job to {JOB}")),
        "{fix}"
    );
    let (panel, fix) = line_and_next(&out, "✗ dashboard panel \"Request rate\" [A]:");
    assert!(
        panel.contains(&format!(
            "job label is wrong: epp_requests_total has series under job=\"llm-d-epp\" but not job=\"{JOB}\""
        )),
        "{panel}"
    );
    assert!(fix.contains("--job llm-d-epp"), "{fix}");

    // Following the advice: the dashboard works with --job, and the shipped alerts (which
    // select job="llm-d-gaie-epp") are what is left.
    let mut with_job = base.clone();
    with_job.push("--job=llm-d-epp".into());
    let (code, out) = doctor(&with_job);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "✓ Prometheus target: up{{job=\"llm-d-epp\"}} = 1 for {metrics}\n"
        )),
        "{out}"
    );
    assert!(
        lines_starting(&out, "✗ dashboard panel ").is_empty(),
        "{out}"
    );
    let (alert, fix) = line_and_next(&out, "✗ alert EPPTargetDown (before its threshold):");
    assert!(
        alert.contains(&format!(
            "job label is wrong: up has series under job=\"llm-d-epp\" but not job=\"{JOB}\""
        )),
        "{alert}"
    );
    assert!(
        fix.contains("the shipped alerts select") && fix.contains("make-prometheusrule.sh"),
        "{fix}"
    );
}

#[test]
fn unreachable_picker_and_bad_flags() {
    let port = free_port();
    let (code, out) = doctor(&[format!("--metrics-url=http://127.0.0.1:{port}/metrics")]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker connect:");
    assert!(
        line.contains(&format!("127.0.0.1:{port}: connection refused")),
        "{line}"
    );
    assert!(fix.contains("--metrics-bind-address"), "{fix}");

    // A port that accepts connections but never answers: the timeout is named.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = std::thread::spawn(move || {
        // Read (and ignore) the request until doctor gives up and closes the connection.
        if let Some(Ok(mut s)) = silent.incoming().next() {
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let (code, text) = doctor_in(
        &checkout(),
        &[format!("--metrics-url=http://{silent_addr}/metrics")],
        "1s",
    );
    assert_eq!(code, 1, "{text}");
    let (line, fix) = line_and_next(&text, "✗ picker HTTP:");
    assert!(
        line.contains("connected, but no response within 1s"),
        "{line}"
    );
    assert!(fix.contains("--timeout"), "{fix}");
    holder.join().unwrap();

    // Same for Prometheus; outside a checkout the built-in dashboard and rules are used.
    let elsewhere = tempfile::tempdir().unwrap();
    let (code, out) = doctor_in(
        elsewhere.path(),
        &[format!("--prometheus-url=http://127.0.0.1:{port}")],
        "3s",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("built-in copy of {DASHBOARD}")),
        "{out}"
    );
    let (line, fix) = line_and_next(&out, "✗ Prometheus connect:");
    assert!(line.contains("connection refused"), "{line}");
    assert!(fix.contains("--web.listen-address"), "{fix}");

    // Neither URL, or a bad one: usage errors (exit 2).
    assert_eq!(doctor(&[]).0, 2);
    let (code, out) = doctor(&["--metrics-url=ftp://x/metrics".into()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not http or https"), "{out}");
    let (code, out) = doctor(&[
        "--metrics-url=http://127.0.0.1:1/metrics".into(),
        "--dashboard=/nonexistent/dashboard.json".into(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("--dashboard /nonexistent/dashboard.json: cannot read"),
        "{out}"
    );
}

#[test]
fn no_traffic_yet_is_a_warning_not_a_failure() {
    let (procs, _proxy, metrics) = start_stack(&["--metrics-auth=none"], &[]);
    let cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    let prom = start_prometheus(&cfg, &[]);
    // A few scrapes, so that rates over the picker's pre-created series exist.
    wait_for(
        &prom,
        &format!("count_over_time(up{{job=\"{JOB}\"}}[1m]) >= 3"),
        &procs,
    );
    let (code, out) = doctor(&[
        format!("--metrics-url=http://{metrics}/metrics"),
        format!("--prometheus-url=http://{}", prom.addr),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.lines().any(|l| l.starts_with("✗")), "{out}");
    let (line, hint) = line_and_next(&out, "! picker metric epp_requests_total:");
    assert!(
        line.contains("no traffic yet") && line.contains("has handled no request yet"),
        "{line}"
    );
    assert!(hint.starts_with("    hint: send requests"), "{hint}");
    let (line, _) = line_and_next(&out, "! dashboard panel \"Request rate\" [A]:");
    assert!(
        line.contains("no data: no traffic yet: epp_requests_total"),
        "{line}"
    );
    assert!(
        out.contains("✓ dashboard panel \"Routable backends\" [A]: 1 series"),
        "{out}"
    );
    let (line, hint) = line_and_next(&out, "! Prometheus alert rules:");
    assert!(
        line.contains(&format!("none of the {} alerts", shipped_counts().1)),
        "{line}"
    );
    assert!(
        hint.contains("rule_files") && hint.contains("prometheusrule.yaml"),
        "{hint}"
    );
    assert!(out.contains("warnings"), "{out}");
}
