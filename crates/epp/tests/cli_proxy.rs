//! `epp proxy` and `epp check-config` as users run them: bad configuration is refused before any
//! port is bound with a message naming the flag or field; SIGTERM lets in-flight streams finish;
//! `--log-format json` logs JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn epp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_epp"));
    c.env_remove("RUST_LOG");
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} never opened");
}

fn http(port: u16, req: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn check_config_accepts_valid_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 2\n").unwrap();
    let out = epp().arg("check-config").arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("valid; single-profile-handler runs profile \"default\" [scorer:queue-scorer*2, picker:max-score-picker] (of 1)"));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue\n").unwrap();
    let out = epp().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schedulingProfiles[0].plugins[0].pluginRef: no plugin named \"queue\""),
        "{err}"
    );
}

#[test]
fn bad_configuration_is_refused_before_binding() {
    let port = free_port();
    let metrics = free_port();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--endpoint".into(), "nohost".into()],
            "--endpoint: \"nohost\" is not host:port",
        ),
        (vec![], "no endpoints"),
        (
            vec![
                "--endpoint".into(),
                "127.0.0.1:1".into(),
                "--config-text".into(),
                "apiVersion: x\nkind: EndpointPickerConfig\n".into(),
            ],
            "--config-text: apiVersion",
        ),
        (
            vec![
                "--endpoint".into(),
                "127.0.0.1:1".into(),
                "--metrics-auth".into(),
                "token".into(),
            ],
            "--metrics-auth=token needs --metrics-token-file",
        ),
        (
            vec![
                "--endpoint".into(),
                "127.0.0.1:1".into(),
                "--endpoints-file".into(),
                "/nonexistent/eps.yaml".into(),
            ],
            "cannot read endpoints file /nonexistent/eps.yaml",
        ),
    ];
    for (args, needle) in cases {
        let out = epp()
            .arg("proxy")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
            .args(["--health-probe-bind-address", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        // Nothing was bound.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
        assert!(TcpListener::bind(("127.0.0.1", metrics)).is_ok());
    }
}

/// Run `epp` to completion, or kill it after 15 s (it then started although it should not
/// have): (exit code, stderr).
fn run_bounded(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (code, err)
}

#[test]
fn check_config_names_the_typed_parameter_and_refuses_duplicate_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let head = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";
    let typed = dir.path().join("typed.yaml");
    std::fs::write(&typed, format!("{head}plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: sixteen\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n")).unwrap();
    let out = epp().arg("check-config").arg(&typed).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid: plugins[0].parameters.blockSizeTokens: invalid type: string \"sixteen\", expected u64"),
        "{err}"
    );
    let dup = dir.path().join("dup.yaml");
    std::fs::write(&dup, format!("{head}plugins:\n- type: random-picker\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: random-picker\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n")).unwrap();
    let out = epp().arg("check-config").arg(&dup).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid: schedulingProfiles[1].name: duplicate profile name \"default\" (also schedulingProfiles[0])"),
        "{err}"
    );
}

#[test]
fn zero_upstream_timeout_and_a_host_name_for_serve_are_refused() {
    let (port, metrics) = (free_port(), free_port());
    let mut cmd = epp();
    cmd.arg("proxy")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
        .args(["--health-probe-bind-address", "127.0.0.1:0"])
        .args(["--endpoint", "127.0.0.1:1", "--upstream-timeout", "0s"]);
    let (code, err) = run_bounded(cmd);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid value '0s' for '--upstream-timeout <DURATION>': \"0s\": must be greater than 0"),
        "{err}"
    );
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());

    let (grpc, grpc_health) = (free_port(), free_port());
    let mut cmd = epp();
    cmd.arg("serve")
        .args(["--grpc-host", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &grpc_health.to_string()])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
        .args(["--health-probe-bind-address", "127.0.0.1:0"])
        .args(["--endpoint", "localhost:8000"]);
    let (code, err) = run_bounded(cmd);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--endpoint localhost:8000: epp serve needs ip:port"),
        "{err}"
    );
    assert!(TcpListener::bind(("127.0.0.1", grpc)).is_ok());
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_in_flight_streams_and_logs_json() {
    let sim_port = free_port();
    let _sim = Kill(
        epp()
            .args([
                "sim",
                "--host",
                "127.0.0.1",
                "--base-port",
                &sim_port.to_string(),
            ])
            .args(["--inter-token-ms", "20", "--prefill-overhead-ms", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(sim_port);
    let port = free_port();
    let mut proxy = Kill(
        epp()
            .args([
                "proxy",
                "--log-format",
                "json",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args([
                "--metrics-bind-address",
                "127.0.0.1:0",
                "--health-probe-bind-address",
                "127.0.0.1:0",
            ])
            .args([
                "--endpoint",
                &format!("127.0.0.1:{sim_port}"),
                "--scrape-interval",
                "20ms",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = proxy.0.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    wait_port(port);
    // Wait until the endpoint is routable (a request succeeds).
    let body = r#"{"model":"sim-model","prompt":"hello there","max_tokens":2}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http(port, &format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()));
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "proxy never routed: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A 40-token stream (~800 ms), then SIGTERM while it is in flight.
    let body = r#"{"model":"sim-model","prompt":"stream me","max_tokens":40,"stream":true}"#;
    let req = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    let streamer = std::thread::spawn(move || http(port, &req));
    std::thread::sleep(Duration::from_millis(250));
    let pid = proxy.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let resp = streamer.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("data: [DONE]"), "stream was cut: {resp}");
    assert_eq!(resp.matches("\"text\":").count(), 40, "every token arrived");
    let status = proxy.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let lines = logs.join().unwrap();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("proxy listening") && l.contains(&format!("127.0.0.1:{port}"))));
    assert!(lines.iter().any(|l| l.contains("picker runtime started")));
    assert!(lines.iter().any(|l| l.contains("SIGTERM")));
}

#[test]
fn a_central_kv_event_socket_is_checked_at_load_and_a_bind_failure_stops_the_start_up() {
    let config = |zmq: &str| {
        format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-producer\n  parameters:\n    kvEventsConfig: {{zmqEndpoint: \"{zmq}\", discoverPods: false}}\n- type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n"
        )
    };
    // The address's shape: refused when the configuration loads, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, config("ipc:///tmp/kv")).unwrap();
    let out = epp().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugins[0].parameters.kvEventsConfig.zmqEndpoint: \"ipc:///tmp/kv\" is not tcp://<host>:<port>"),
        "{err}"
    );
    // A port in use: the start-up stops, naming the field and the address, the proxy's port
    // never bound.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let zmq = taken.local_addr().unwrap().port();
    let (port, metrics) = (free_port(), free_port());
    let mut cmd = epp();
    cmd.arg("proxy")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
        .args(["--health-probe-bind-address", "127.0.0.1:0"])
        .args(["--endpoint", "127.0.0.1:1"])
        .args(["--config-text", &config(&format!("tcp://127.0.0.1:{zmq}"))]);
    let (code, err) = run_bounded(cmd);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "plugins[0].parameters.kvEventsConfig.zmqEndpoint: cannot bind tcp://127.0.0.1:{zmq}: "
        )),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");
    drop(taken);
}
