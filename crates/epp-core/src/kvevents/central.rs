//! The central KV-event socket (llm-d's `kvEventsConfig.zmqEndpoint`): one SUB socket the picker
//! **binds**, which every engine **connects** to and publishes on (vLLM's `ZmqEventPublisher`
//! connects when its endpoint names a host rather than `*`, `::` or `0.0.0.0`).
//!
//! Many publishers share the socket, each numbering its own messages from 0, so nothing here
//! follows sequences: every message goes out with its topic (`kv@<pod>@<model>`, which says whose
//! it is) and its sequence, and the reader keeps one sequence per topic. There is no replay in
//! this mode (a publisher that connects out has no ROUTER the picker could reach).
//!
//! The task ends on shutdown or when the receiver is dropped. A peer that sends garbage does not
//! stop the socket; every wait is bounded (the channel gives backpressure: a slow reader slows
//! the socket, whose peers then drop messages, which become gaps).

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};

use super::decode::{decode_batch, DecodeError};
use super::event::EventBatch;
use super::frames;
use crate::telemetry::Shutdown;

/// Why a central endpoint cannot be used, before anything binds.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return Err(format!(
            "{endpoint:?} is not tcp://<host>:<port> (only tcp endpoints can be bound; use tcp://*:5557 or tcp://0.0.0.0:5557 for every interface)"
        ));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{endpoint:?} has no port (tcp://<host>:<port>)"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => {
            return Err(format!(
                "port {port:?} of {endpoint:?} is not in 1..65535 (the engines must know it to connect)"
            ))
        }
    }
    let ok_host = host == "*"
        || host.parse::<std::net::Ipv4Addr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !ok_host {
        return Err(format!(
            "host {host:?} of {endpoint:?} is not *, an IPv4 address, a [bracketed] IPv6 address or a host name"
        ));
    }
    Ok(())
}

/// The address handed to the socket: libzmq's `*` (every interface) is `0.0.0.0`.
pub fn bind_address(endpoint: &str) -> String {
    match endpoint.strip_prefix("tcp://*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
    }
}

/// A bound central socket, subscribed, not yet read.
pub struct CentralSocket {
    sock: SubSocket,
    monitor: BoxStream<'static, SocketEvent>,
    /// The configured endpoint (as written).
    pub endpoint: String,
    /// What was bound (the ephemeral port resolved, `*` as `0.0.0.0`).
    pub bound: String,
}

impl std::fmt::Debug for CentralSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CentralSocket")
            .field("endpoint", &self.endpoint)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// Binds `endpoint` (validated by [`validate_endpoint`]) and subscribes to `topic_filter`.
/// The error names the endpoint.
pub async fn bind(endpoint: &str, topic_filter: &str) -> Result<CentralSocket, String> {
    validate_endpoint(endpoint)?;
    let mut sock = SubSocket::new();
    let monitor = sock.monitor().boxed();
    let addr = bind_address(endpoint);
    let bound = match tokio::time::timeout(Duration::from_secs(10), sock.bind(&addr)).await {
        Err(_) => return Err(format!("binding {endpoint} timed out")),
        Ok(Err(e)) => return Err(format!("cannot bind {endpoint}: {e}")),
        Ok(Ok(b)) => b.to_string(),
    };
    sock.subscribe(topic_filter)
        .await
        .map_err(|e| format!("subscribing to {topic_filter:?} on {endpoint}: {e}"))?;
    Ok(CentralSocket {
        sock,
        monitor,
        endpoint: endpoint.to_string(),
        bound,
    })
}

/// What the central socket reports, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum CentralUpdate {
    /// A message: its topic, its sequence (the publisher's own), its decoded batch or why it
    /// could not be decoded.
    Message {
        topic: String,
        seq: u64,
        batch: Result<EventBatch, DecodeError>,
    },
    /// Frames that are not `[topic, seq, payload]`: nobody can be told apart.
    Malformed { error: DecodeError },
    /// A publisher connected (its address as seen here).
    PeerConnected { peer: String },
    /// A publisher's connection closed: a publisher may be restarting.
    PeerDisconnected,
    /// Receiving failed (the socket stays bound).
    RecvError { error: String },
}

/// Reads `central` until `shutdown` or until the receiver is dropped.
pub fn spawn(
    central: CentralSocket,
    capacity: usize,
    shutdown: Shutdown,
) -> (mpsc::Receiver<CentralUpdate>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stop = shutdown.wait();
    let handle = tokio::spawn(async move {
        tokio::select! {
            _ = stop => {}
            _ = read(central, tx) => {}
        }
    });
    (rx, handle)
}

async fn read(central: CentralSocket, tx: mpsc::Sender<CentralUpdate>) {
    let CentralSocket {
        mut sock,
        mut monitor,
        endpoint,
        ..
    } = central;
    let mut errors_in_a_row = 0u32;
    loop {
        let update = tokio::select! {
            ev = monitor.next() => match ev {
                Some(SocketEvent::Accepted(peer, _)) => CentralUpdate::PeerConnected {
                    peer: peer.to_string(),
                },
                Some(SocketEvent::Disconnected(_)) => CentralUpdate::PeerDisconnected,
                Some(_) => continue,
                // The monitor is gone; the messages still flow.
                None => {
                    monitor = futures_util::stream::pending().boxed();
                    continue;
                }
            },
            r = sock.recv() => match r {
                Ok(m) => {
                    errors_in_a_row = 0;
                    let frames_in = m.into_vec();
                    match frames::split_live(&frames_in) {
                        Err(error) => CentralUpdate::Malformed { error },
                        Ok((topic, seq, payload)) => CentralUpdate::Message {
                            topic: topic.to_string(),
                            seq,
                            batch: decode_batch(payload),
                        },
                    }
                }
                Err(e) => {
                    // One peer's failure (it is dropped); back off a little if it repeats.
                    errors_in_a_row = errors_in_a_row.saturating_add(1);
                    if errors_in_a_row > 1 {
                        tokio::time::sleep(Duration::from_millis(
                            (10u64 << errors_in_a_row.min(6)).min(500),
                        ))
                        .await;
                    }
                    tracing::debug!(%endpoint, error = %e, "central kv-event socket: receive failed");
                    CentralUpdate::RecvError { error: e.to_string() }
                }
            },
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_before_binding() {
        for ok in [
            "tcp://*:5557",
            "tcp://0.0.0.0:5557",
            "tcp://127.0.0.1:1",
            "tcp://[::]:5557",
            "tcp://epp.ns.svc:5557",
        ] {
            assert_eq!(validate_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("ipc:///tmp/kv", "only tcp endpoints"),
            ("tcp://0.0.0.0", "has no port"),
            ("tcp://0.0.0.0:0", "not in 1..65535"),
            ("tcp://0.0.0.0:70000", "not in 1..65535"),
            ("tcp://0.0.0.0:x", "not in 1..65535"),
            ("tcp://:5557", "is not *"),
            ("tcp://a b:5557", "is not *"),
            ("tcp://::1:5557", "is not *"),
        ] {
            let e = validate_endpoint(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(bind_address("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(bind_address("tcp://[::]:5557"), "tcp://[::]:5557");
    }
}
