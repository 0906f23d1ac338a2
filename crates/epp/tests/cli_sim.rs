//! `epp sim` as a user runs it: bad flags are refused before binding with an error naming the
//! flag; several servers start, answer with their identity, and stop cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

fn epp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_epp"))
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--count", "0"], "--count"),
        (&["--block-size", "0"], "--block-size"),
        (&["--max-num-seqs", "0"], "--max-num-seqs"),
        (&["--num-gpu-blocks", "0"], "--num-gpu-blocks"),
        (&["--jitter", "1.5"], "--jitter"),
        (&["--error-rate", "2"], "--error-rate"),
        (&["--error-status", "200"], "--error-status"),
        (&["--inter-token-ms=-1"], "--inter-token-ms"),
        (&["--lora-modules", "a", "--max-loras", "0"], "--max-loras"),
        (&["--base-port", "65535", "--count", "2"], "--base-port"),
        (
            &[
                "--base-port",
                "65534",
                "--count",
                "2",
                "--data-parallel-size",
                "2",
            ],
            "invalid --base-port: 65534 + 2 servers × 2 ranks",
        ),
        (&["--data-parallel-size", "0"], "--data-parallel-size"),
        (&["--data-parallel-size", "1000"], "--data-parallel-size"),
        (&["--role", "mixed"], "--role"),
        (
            &["--kv-transfer-timeout-secs", "0"],
            "--kv-transfer-timeout-secs",
        ),
        (&["--kv-transfer-max-held", "0"], "--kv-transfer-max-held"),
        (
            &["--kv-transfer-ms-per-block=-1"],
            "--kv-transfer-ms-per-block",
        ),
        (&["--kv-transfer-host", "a b"], "--kv-transfer-host"),
        (
            &[
                "--base-port",
                "0",
                "--tokenizer",
                "/nonexistent/tokenizer.json",
            ],
            "invalid --tokenizer: cannot read /nonexistent/tokenizer.json",
        ),
    ];
    for (args, flag) in cases {
        let out = epp()
            .arg("sim")
            .args(["--host", "127.0.0.1"])
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A running `epp sim` and the stderr lines it has not yet been asked for.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

/// One `listening` log line: server name, data-parallel rank, address.
type Listening = (String, u64, String);

/// Start `epp sim` with `args` (JSON logs, loopback, ephemeral ports) and wait for `n`
/// `listening` lines.
fn start(args: &[&str], n: usize) -> (Running, Vec<Listening>) {
    let mut child = epp()
        .args(["--log-format", "json", "--log-level", "info", "sim"])
        .args(["--base-port", "0", "--host", "127.0.0.1"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut listening = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while listening.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("servers did not report listening addresses");
            }
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let field = |k: &str| v.get(k).or_else(|| v["fields"].get(k)).cloned();
        let msg = field("message");
        if msg
            .as_ref()
            .and_then(|m| m.as_str())
            .is_some_and(|m| m.starts_with("listening"))
        {
            let text = |k: &str| {
                field(k)
                    .and_then(|x| x.as_str().map(str::to_string))
                    .unwrap()
            };
            let rank = field("rank").and_then(|r| r.as_u64()).unwrap();
            listening.push((text("server"), rank, text("addr")));
        }
    }
    (Running { child, lines: rx }, listening)
}

/// SIGTERM, then a clean exit within 20 s with a `stopped` line; the ports are closed after.
fn stop(mut r: Running, addrs: &[Listening]) {
    let status = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = r.child.kill();
            panic!("epp sim did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    // The reader thread ends at EOF of the exited process's stderr.
    let rest: Vec<String> = r.lines.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no 'stopped' log line: {rest:?}"
    );
    for (_, _, addr) in addrs {
        assert!(TcpStream::connect(addr).is_err());
    }
}

fn post(addr: &str, path: &str, body: &str) -> String {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn serves_several_servers_and_stops_on_sigterm() {
    let (running, addrs) = start(
        &[
            "--count",
            "2",
            "--inter-token-ms",
            "0",
            "--prefill-overhead-ms",
            "0",
        ],
        2,
    );
    for (i, (server, rank, addr)) in addrs.iter().enumerate() {
        assert_eq!(server, &format!("sim-{i}"));
        assert_eq!(*rank, 0);
        let res = post(
            addr,
            "/v1/completions",
            r#"{"prompt":"hello","max_tokens":2}"#,
        );
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert!(res.contains(&format!("x-inference-pod: sim-{i}")), "{res}");
        let port = addr.rsplit(':').next().unwrap();
        assert!(res.contains(&format!("x-inference-port: {port}")), "{res}");
        assert!(res.contains("x-data-parallel-rank: 0"), "{res}");
        assert!(res.contains("\"completion_tokens\":2"), "{res}");
    }
    stop(running, &addrs);
}

#[test]
fn data_parallel_prefill_ranks_answer_with_their_engine() {
    let (running, addrs) = start(
        &[
            "--data-parallel-size",
            "2",
            "--role",
            "prefill",
            "--kv-transfer-timeout-secs",
            "60",
            "--inter-token-ms",
            "0",
            "--prefill-overhead-ms",
            "0",
        ],
        2,
    );
    let mut ranks: Vec<u64> = addrs.iter().map(|a| a.1).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1]);
    for (server, rank, addr) in &addrs {
        assert_eq!(server, "sim-0");
        let prefill = r#"{"prompt":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123","max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false}}"#;
        let res = post(addr, "/v1/completions", prefill);
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert!(
            res.contains(&format!("x-data-parallel-rank: {rank}")),
            "{res}"
        );
        let body: serde_json::Value =
            serde_json::from_str(res.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let params = &body["kv_transfer_params"];
        assert_eq!(params["remote_engine_id"], format!("sim-0_dp{rank}"));
        assert_eq!(params["remote_port"], port);
        assert_eq!(params["remote_host"], "127.0.0.1");
        // 68 bytes = 17 tokens: 1 full block of 16.
        assert_eq!(params["remote_block_ids"], serde_json::json!([0]));
        assert_eq!(body["usage"]["completion_tokens"], 1);
        // A prefill server refuses the decode phase.
        let decode = format!(
            r#"{{"prompt":"hi","max_tokens":1,"kv_transfer_params":{}}}"#,
            serde_json::json!({"do_remote_prefill": true, "remote_engine_id": "e",
                "remote_request_id": "r", "remote_block_ids": [0], "remote_host": "127.0.0.1",
                "remote_port": 1})
        );
        let res = post(addr, "/v1/completions", &decode);
        assert!(res.starts_with("HTTP/1.1 400"), "{res}");
        assert!(
            res.contains("\"param\":\"kv_transfer_params.do_remote_prefill\""),
            "{res}"
        );
    }
    stop(running, &addrs);
}
