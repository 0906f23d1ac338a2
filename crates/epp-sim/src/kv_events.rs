//! KV-cache events, published as vLLM publishes them (`--kv-events-config` with the `zmq`
//! publisher): a ZeroMQ PUB socket sending `[topic, seq, payload]`, sequence numbers from 0 per
//! process, and an optional ROUTER replay socket answering `[start_seq]` with the buffered
//! batches from that sequence on and an end marker.
//!
//! The engine hands over one batch of events per scheduling step through a bounded queue
//! ([`KvEventSink::publish`] never blocks it: a full queue drops the batch and logs it); one task
//! numbers, encodes, buffers (`buffer_steps` batches, vLLM's default 10 000) and sends them, and
//! answers replay requests. The simulator binds both endpoints (it is the server side), or, with
//! `connect` (`--zmq-endpoint`), connects its PUB socket to a central SUB socket the picker
//! binds, as vLLM does with a non-wildcard endpoint and llm-d-inference-sim with
//! `--zmq-endpoint`: it (re)connects in the background, with backoff; batches wait in the queue
//! while it is not connected (beyond the queue's bound they are dropped, and the picker sees the
//! gap in the sequence).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use epp_core::kvevents::{encode_batch, EventBatch, EventForm, KvEvent, END_SEQ};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's default replay buffer length, in batches (`buffer_steps`).
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;
/// Batches waiting to be published at most; more are dropped (vLLM's queue blocks instead).
const QUEUE_BATCHES: usize = 10_000;

/// Where and how to publish. Off when `endpoint` is `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvEventsConfig {
    /// PUB endpoint to bind, `tcp://host:port` (port 0: an ephemeral port).
    pub endpoint: Option<String>,
    /// A central SUB endpoint to connect the PUB socket to instead (`--zmq-endpoint`).
    pub connect: Option<String>,
    /// Topic of every message; `None`: `kv@<server name>@<model>` (bound), or
    /// `kv@<host:port>@<model>` (connected).
    pub topic: Option<String>,
    /// ROUTER endpoint to bind for replay requests.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Event encoding: positional arrays or `"type"`-tagged maps.
    pub format: EventForm,
}

impl KvEventsConfig {
    /// Events are published (bound or connected).
    pub fn is_on(&self) -> bool {
        self.endpoint.is_some() || self.connect.is_some()
    }

    /// Off, with vLLM's defaults for the rest.
    pub fn off() -> Self {
        Self {
            buffer_steps: DEFAULT_BUFFER_STEPS,
            ..Self::default()
        }
    }
}

/// The engine's end: queue a step's events for publishing.
#[derive(Debug, Clone)]
pub struct KvEventSink {
    tx: mpsc::Sender<Vec<KvEvent>>,
}

impl KvEventSink {
    /// Queues one batch; never waits. A full queue (a stalled subscriber) drops it.
    pub fn publish(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        if self.tx.try_send(events).is_err() {
            tracing::warn!("kv-events queue full or closed: batch dropped");
        }
    }
}

/// Control of a running publisher (tests and tools).
#[derive(Debug, Clone)]
pub struct KvEventsHandle {
    /// The bound PUB endpoint (ephemeral port resolved), or the central endpoint connected to.
    pub endpoint: String,
    /// The bound replay endpoint.
    pub replay_endpoint: Option<String>,
    pub topic: String,
    drop_live: Arc<AtomicU64>,
}

impl KvEventsHandle {
    /// Fault: the next `n` batches get their sequence numbers and enter the replay buffer but are
    /// not sent on the PUB socket, as if the network lost them.
    pub fn drop_next_live(&self, n: u64) {
        self.drop_live.store(n, Ordering::SeqCst);
    }
}

/// Binds the sockets (or leaves the connection to the task) and starts the publishing task; it
/// stops when `stop` turns true. `default_topic` is the bound default, `connect_topic` the one of
/// connect mode.
pub(crate) async fn start(
    cfg: &KvEventsConfig,
    default_topic: String,
    connect_topic: String,
    rank: i64,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<(KvEventSink, KvEventsHandle)>> {
    let mut pub_sock = PubSocket::new();
    let (bound, default_topic) = match (&cfg.endpoint, &cfg.connect) {
        (Some(endpoint), _) => {
            let b = pub_sock
                .bind(endpoint)
                .await
                .with_context(|| format!("cannot bind --kv-events-endpoint {endpoint}"))?;
            (b.to_string(), default_topic)
        }
        (None, Some(central)) => (central.clone(), connect_topic),
        (None, None) => return Ok(None),
    };
    let mut router = None;
    let mut replay_bound = None;
    if let Some(ep) = &cfg.replay_endpoint {
        let mut r = RouterSocket::new();
        let b = r
            .bind(ep)
            .await
            .with_context(|| format!("cannot bind --kv-events-replay-endpoint {ep}"))?;
        replay_bound = Some(b.to_string());
        router = Some(r);
    }
    let topic = cfg.topic.clone().unwrap_or(default_topic);
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    let drop_live = Arc::new(AtomicU64::new(0));
    let monitor = cfg.connect.is_some().then(|| pub_sock.monitor().boxed());
    let task = Publisher {
        pub_sock,
        connect: cfg.connect.clone().map(|ep| Connect {
            endpoint: ep,
            connected: false,
            monitor,
            next_attempt: tokio::time::Instant::now(),
            backoff: CONNECT_BACKOFF_MIN,
        }),
        router,
        topic: Bytes::from(topic.clone()),
        form: cfg.format,
        buffer: VecDeque::new(),
        buffer_steps: cfg.buffer_steps.max(1),
        next_seq: 0,
        drop_live: drop_live.clone(),
        rank,
    };
    tokio::spawn(task.run(rx, stop));
    Ok(Some((
        KvEventSink { tx },
        KvEventsHandle {
            endpoint: bound,
            replay_endpoint: replay_bound,
            topic,
            drop_live,
        },
    )))
}

/// Connect mode: first and longest wait between connection attempts, and the longest attempt.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a connection is made, how long to let the picker's subscription reach the PUB socket
/// (ZeroMQ drops what a PUB socket sends before it knows the subscription).
const SUBSCRIPTION_SETTLE: Duration = Duration::from_millis(100);

/// The connection to a central SUB socket.
struct Connect {
    endpoint: String,
    connected: bool,
    monitor: Option<Monitor>,
    next_attempt: tokio::time::Instant,
    backoff: Duration,
}

/// The PUB socket's connection events.
type Monitor = futures_util::stream::BoxStream<'static, zeromq::SocketEvent>;

struct Publisher {
    pub_sock: PubSocket,
    connect: Option<Connect>,
    router: Option<RouterSocket>,
    topic: Bytes,
    form: EventForm,
    /// `(seq, payload)` of the last `buffer_steps` batches.
    buffer: VecDeque<(u64, Bytes)>,
    buffer_steps: usize,
    next_seq: u64,
    drop_live: Arc<AtomicU64>,
    /// The engine's data-parallel rank, in every batch.
    rank: i64,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Vec<KvEvent>>, mut stop: watch::Receiver<bool>) {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        loop {
            // Connect mode: (re)connect when due; batches wait in the queue meanwhile.
            if let Some(c) = self.connect.as_mut() {
                if !c.connected && tokio::time::Instant::now() >= c.next_attempt {
                    let attempt =
                        tokio::time::timeout(CONNECT_TIMEOUT, self.pub_sock.connect(&c.endpoint));
                    let r = tokio::select! {
                        _ = &mut stopped => break,
                        r = attempt => r,
                    };
                    match r {
                        Ok(Ok(())) => {
                            c.connected = true;
                            c.backoff = CONNECT_BACKOFF_MIN;
                            tracing::info!(endpoint = %c.endpoint, "kv-events: connected to the central socket");
                            tokio::time::sleep(SUBSCRIPTION_SETTLE).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(endpoint = %c.endpoint, error = %e, "kv-events: connecting to the central socket");
                        }
                        Err(_) => {
                            tracing::debug!(endpoint = %c.endpoint, "kv-events: connecting to the central socket timed out");
                        }
                    }
                    if !c.connected {
                        c.next_attempt = tokio::time::Instant::now() + c.backoff;
                        c.backoff = (c.backoff * 2).min(CONNECT_BACKOFF_MAX);
                    }
                }
            }
            let waiting = self.connect.as_ref().is_some_and(|c| !c.connected);
            let retry_at = self
                .connect
                .as_ref()
                .map_or_else(tokio::time::Instant::now, |c| c.next_attempt);
            let mut monitor = self.connect.as_mut().and_then(|c| c.monitor.take());
            let disconnected = async {
                match monitor.as_mut() {
                    Some(m) => loop {
                        match m.next().await {
                            Some(zeromq::SocketEvent::Disconnected(_)) => return true,
                            Some(_) => continue,
                            None => return false,
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            let request = async {
                match self.router.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let mut lost = None;
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep_until(retry_at), if waiting => {}
                d = disconnected => lost = Some(d),
                batch = rx.recv(), if !waiting => match batch {
                    Some(events) => self.publish(events).await,
                    None => break,
                },
                req = request => match req {
                    Ok(msg) => self.answer_replay(msg).await,
                    Err(e) => tracing::debug!(error = %e, "kv-events replay socket"),
                },
            }
            if let Some(c) = self.connect.as_mut() {
                match lost {
                    Some(true) => {
                        // The central socket went away: a new PUB socket connects afresh (the
                        // sequence goes on: the picker sees what was lost as a gap).
                        tracing::info!(endpoint = %c.endpoint, "kv-events: the central socket closed the connection; reconnecting");
                        self.pub_sock = PubSocket::new();
                        c.monitor = Some(self.pub_sock.monitor().boxed());
                        c.connected = false;
                        c.next_attempt = tokio::time::Instant::now() + c.backoff;
                    }
                    Some(false) => {}
                    None => c.monitor = monitor,
                }
            }
        }
    }

    async fn publish(&mut self, events: Vec<KvEvent>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let batch = EventBatch {
            ts,
            events,
            data_parallel_rank: Some(self.rank),
        };
        let payload = Bytes::from(encode_batch(&batch, self.form));
        if self.buffer.len() == self.buffer_steps {
            self.buffer.pop_front();
        }
        self.buffer.push_back((seq, payload.clone()));
        let dropped = self
            .drop_live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if dropped {
            return;
        }
        let msg = frames(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ]);
        if let Err(e) = self.pub_sock.send(msg).await {
            tracing::warn!(seq, error = %e, "kv-events publish failed");
        }
    }

    /// `[identity, "", start_seq]` → every buffered batch from `start_seq` on as
    /// `[identity, "", topic, seq, payload]`, then `[identity, "", "", -1, ""]`.
    async fn answer_replay(&mut self, msg: ZmqMessage) {
        let frames_in = msg.into_vec();
        let (id, start) = match frames_in.as_slice() {
            [id, delim, start] if delim.is_empty() && start.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(start);
                (id.clone(), u64::from_be_bytes(b))
            }
            other => {
                tracing::warn!(frames = other.len(), "invalid kv-events replay request");
                return;
            }
        };
        let Some(router) = self.router.as_mut() else {
            return;
        };
        for (seq, payload) in self.buffer.iter().filter(|(s, _)| *s >= start) {
            let out = frames(vec![
                id.clone(),
                Bytes::new(),
                self.topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ]);
            if router.send(out).await.is_err() {
                return;
            }
        }
        let end = frames(vec![
            id,
            Bytes::new(),
            Bytes::new(),
            Bytes::from_static(&END_SEQ),
            Bytes::new(),
        ]);
        let _ = router.send(end).await;
    }
}

fn frames(v: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(v).expect("a message has at least one frame")
}
