//! A real `redis-server` on loopback for the shared-state tests (`scripts/test` installs
//! Debian's `redis-server`; `EPP_REDIS_SERVER_BIN` points elsewhere). No persistence: a
//! restart on the same port starts empty, as a Redis that lost its data does.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// `(certificate, key)` PEM files: the server speaks TLS only, on `port`.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

fn binary() -> String {
    std::env::var("EPP_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts one on a free loopback port and waits (bounded) until it answers.
    pub async fn start() -> Self {
        let mut s = Self {
            port: free_port(),
            child: None,
            tls: None,
        };
        s.restart().await;
        s
    }

    /// Starts one that speaks TLS only (`rediss://`), with this certificate and key, and waits
    /// (bounded) until it answers a client that trusts `cert`.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let mut s = Self {
            port: free_port(),
            child: None,
            tls: Some((cert.to_path_buf(), key.to_path_buf())),
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let mut listen: Vec<String> = vec!["--port".into(), port.clone()];
        if let Some((cert, key)) = &self.tls {
            listen = vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.clone(),
            ];
            for (flag, f) in [
                ("--tls-cert-file", cert),
                ("--tls-key-file", key),
                ("--tls-ca-cert-file", cert),
            ] {
                listen.push(flag.into());
                listen.push(f.display().to_string());
            }
            listen.extend(["--tls-auth-clients".into(), "no".into()]);
        }
        let child = Command::new(binary())
            .args(&listen)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install redis-server (scripts/test does) or set EPP_REDIS_SERVER_BIN",
                    binary()
                )
            });
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut c) = self.connect().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    pub async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = match &self.tls {
            None => redis::Client::open(self.url())?,
            Some((cert, _)) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(cert).expect("certificate readable")),
                },
            )?,
        };
        client.get_multiplexed_async_connection().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
