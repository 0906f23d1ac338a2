//! One endpoint's KV-event stream: a SUB socket to its publisher, decoded batches out through a
//! bounded channel, in sequence order.
//!
//! The publisher numbers its messages from 0 per process. The subscriber keeps the last sequence
//! it delivered and the last one it saw live, and from them tells apart:
//! - the next message: delivered;
//! - a repeat (already delivered, e.g. by a replay that overtook the live stream): dropped;
//! - a gap (messages lost, or joining a stream already under way): the missing range is asked of
//!   the replay socket when one is configured, and reported with how much came back;
//! - a restart (the live sequence went back): reported, then the new stream is followed from its
//!   start.
//!
//! The connection is re-made with exponential backoff when it fails; the task ends on shutdown or
//! when the receiver is dropped. Every wait is bounded: connects, each replay answer, the channel
//! (backpressure: a slow reader slows the socket, whose peer then drops, which becomes a gap).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::decode::{decode_batch, DecodeError};
use super::event::KvMessage;
use super::frames::{self, ReplayFrame};
use crate::telemetry::Shutdown;

/// How to follow one publisher.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The publisher's PUB endpoint, `tcp://host:port`.
    pub endpoint: String,
    /// Its ROUTER replay endpoint, when it has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to; empty for every topic.
    pub topic_filter: String,
    /// Capacity of the channel of [`Update`]s.
    pub channel_capacity: usize,
    /// First and longest wait between connection attempts.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Longest wait for a connection to be made.
    pub connect_timeout: Duration,
    /// Longest wait for the next message of a replay answer.
    pub replay_idle_timeout: Duration,
}

impl SubscriberConfig {
    /// Defaults for `endpoint`: every topic, 1024 updates buffered, reconnect from 100 ms up to
    /// 5 s, 5 s to connect, 2 s between replay messages.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic_filter: String::new(),
            channel_capacity: 1024,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            replay_idle_timeout: Duration::from_secs(2),
        }
    }
}

/// What the subscriber reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The SUB socket is connected (again, after a reconnection).
    Connected,
    /// The connection failed or broke; a new one is attempted (after a backoff).
    Disconnected { reason: String },
    /// The next batch, live or from a replay.
    Batch { msg: KvMessage, replayed: bool },
    /// Sequences `from..=to` were missing; `recovered` of them came back from the replay socket
    /// (0 without one), `error` says why a replay stopped short.
    Gap {
        from: u64,
        to: u64,
        recovered: u64,
        error: Option<String>,
    },
    /// The live sequence went back from `previous` to `seq`: the publisher restarted, and what it
    /// published before is gone (its cache with it).
    Restarted { previous: u64, seq: u64 },
    /// A message that could not be decoded (its sequence, when that much was readable).
    Invalid {
        seq: Option<u64>,
        error: DecodeError,
    },
}

/// What to do with a live sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Deliver,
    Duplicate,
    /// `from..=to` are missing before this one.
    Missing {
        from: u64,
        to: u64,
    },
}

/// The sequence bookkeeping, apart from the sockets.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    delivered: Option<u64>,
    live: Option<u64>,
    /// The connection was re-made since the last live message.
    reconnected: bool,
}

impl SeqTracker {
    /// Classifies a live sequence number; the first value is the previous live sequence when this
    /// one went back (a restart), after which the stream is followed afresh.
    pub fn on_live(&mut self, seq: u64) -> (Option<u64>, Step) {
        let mut restarted = None;
        let reconnected = std::mem::take(&mut self.reconnected);
        match (self.live, self.delivered) {
            // Went back; or, after a reconnection, came back at the same number (a live message
            // is never sent twice, so that is a new publisher too).
            (Some(last), _) if seq < last || (reconnected && seq == last) => {
                restarted = Some(last);
                self.delivered = None;
            }
            (Some(last), _) if seq == last => return (None, Step::Duplicate),
            // Back after a reconnection and past the next expected message: a restarted
            // publisher that already sent more than we had seen looks the same as lost messages,
            // and mixing its stream with the old one would be wrong, so it is taken for a
            // restart (the share is rebuilt from its replay, which holds it from 0 if complete).
            (Some(last), Some(d)) if reconnected && seq > d + 1 => {
                restarted = Some(last);
                self.delivered = None;
            }
            _ => {}
        }
        self.live = Some(seq);
        let step = match self.delivered {
            None if seq == 0 => Step::Deliver,
            None => Step::Missing {
                from: 0,
                to: seq - 1,
            },
            Some(d) if seq <= d => Step::Duplicate,
            Some(d) if seq == d + 1 => Step::Deliver,
            Some(d) => Step::Missing {
                from: d + 1,
                to: seq - 1,
            },
        };
        (restarted, step)
    }

    /// The sequence the stream continues with.
    pub fn next_expected(&self) -> u64 {
        self.delivered.map_or(0, |d| d + 1)
    }

    /// Records `seq` as delivered.
    pub fn delivered(&mut self, seq: u64) {
        self.delivered = Some(seq);
    }

    /// The connection to the publisher was lost and made again: the next live message may be
    /// from a new process.
    pub fn reconnected(&mut self) {
        self.reconnected = true;
    }
}

/// Starts following `cfg.endpoint`; the task stops on `shutdown` or when the receiver is dropped.
pub fn spawn(
    cfg: SubscriberConfig,
    shutdown: Shutdown,
) -> (mpsc::Receiver<Update>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(cfg.channel_capacity.max(1));
    let stop = shutdown.wait();
    let handle = tokio::spawn(async move {
        let mut sub = Subscriber {
            cfg,
            tx,
            tracker: SeqTracker::default(),
            topic: String::new(),
        };
        tokio::select! {
            _ = stop => {}
            _ = sub.run() => {}
        }
    });
    (rx, handle)
}

/// A socket's connection events (what `Socket::monitor` returns).
trait Monitor: futures_util::Stream<Item = SocketEvent> + Unpin + Send {}
impl<T: futures_util::Stream<Item = SocketEvent> + Unpin + Send> Monitor for T {}

/// The receiver is gone: stop.
struct Closed;

struct Subscriber {
    cfg: SubscriberConfig,
    tx: mpsc::Sender<Update>,
    tracker: SeqTracker,
    /// The last live topic, given to replayed batches that come without one.
    topic: String,
}

impl Subscriber {
    async fn run(&mut self) {
        let mut backoff = self.cfg.reconnect_initial;
        loop {
            let reason = match self.connect().await {
                Ok((sock, monitor)) => {
                    backoff = self.cfg.reconnect_initial;
                    match self.follow(sock, monitor).await {
                        Ok(reason) => reason,
                        Err(Closed) => return,
                    }
                }
                Err(reason) => reason,
            };
            tracing::debug!(endpoint = %self.cfg.endpoint, %reason, "kv-event subscriber disconnected");
            self.tracker.reconnected();
            if self.send(Update::Disconnected { reason }).await.is_err() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    async fn send(&self, u: Update) -> Result<(), Closed> {
        self.tx.send(u).await.map_err(|_| Closed)
    }

    async fn connect(&self) -> Result<(SubSocket, impl Monitor), String> {
        let mut sock = SubSocket::new();
        // Connection events, including the socket's own reconnections after the publisher went
        // away (it re-subscribes by itself).
        let monitor = sock.monitor();
        let ep = &self.cfg.endpoint;
        match tokio::time::timeout(self.cfg.connect_timeout, sock.connect(ep)).await {
            Err(_) => return Err(format!("connecting to {ep} timed out")),
            Ok(Err(e)) => return Err(format!("connecting to {ep}: {e}")),
            Ok(Ok(())) => {}
        }
        sock.subscribe(&self.cfg.topic_filter)
            .await
            .map_err(|e| format!("subscribing on {ep}: {e}"))?;
        Ok((sock, monitor))
    }

    /// Reads the live stream until it fails; returns why.
    async fn follow(
        &mut self,
        mut sock: SubSocket,
        mut monitor: impl Monitor,
    ) -> Result<String, Closed> {
        loop {
            let received = tokio::select! {
                r = sock.recv() => r,
                ev = monitor.next() => {
                    match ev {
                        Some(SocketEvent::Connected(..)) => self.send(Update::Connected).await?,
                        Some(SocketEvent::Disconnected(_)) => {
                            self.tracker.reconnected();
                            self.send(Update::Disconnected {
                                reason: format!("{} closed the connection; reconnecting", self.cfg.endpoint),
                            })
                            .await?
                        }
                        Some(_) => {}
                        None => return Ok("the socket monitor closed".into()),
                    }
                    continue;
                }
            };
            let msg = match received {
                Ok(m) => m,
                Err(e) => return Ok(format!("receiving from {}: {e}", self.cfg.endpoint)),
            };
            let frames = msg.into_vec();
            let (topic, seq, payload) = match frames::split_live(&frames) {
                Ok(parts) => parts,
                Err(error) => {
                    self.send(Update::Invalid { seq: None, error }).await?;
                    continue;
                }
            };
            if self.topic != topic {
                self.topic = topic.to_string();
            }
            let (restarted, step) = self.tracker.on_live(seq);
            if let Some(previous) = restarted {
                tracing::info!(endpoint = %self.cfg.endpoint, previous, seq, "kv-event publisher restarted");
                self.send(Update::Restarted { previous, seq }).await?;
            }
            match step {
                Step::Duplicate => continue,
                Step::Deliver => {}
                Step::Missing { from, to } => self.fill(from, to).await?,
            }
            if seq < self.tracker.next_expected() {
                continue; // the replay delivered it already
            }
            self.deliver(seq, payload, false).await?;
        }
    }

    async fn deliver(&mut self, seq: u64, payload: &[u8], replayed: bool) -> Result<(), Closed> {
        self.tracker.delivered(seq);
        let update = match decode_batch(payload) {
            Ok(batch) => Update::Batch {
                msg: KvMessage {
                    topic: self.topic.clone(),
                    seq,
                    batch,
                },
                replayed,
            },
            Err(error) => Update::Invalid {
                seq: Some(seq),
                error,
            },
        };
        self.send(update).await
    }

    /// Asks the replay socket (if any) for `from..=to`, delivers what comes back in order, and
    /// reports the gap.
    async fn fill(&mut self, from: u64, to: u64) -> Result<(), Closed> {
        let start = self.tracker.next_expected();
        let error = match self.cfg.replay_endpoint.clone() {
            None => None,
            Some(ep) => self.replay(&ep, from, to).await?.err(),
        };
        let recovered = self
            .tracker
            .next_expected()
            .saturating_sub(start)
            .min(to - from + 1);
        if let Some(e) = &error {
            tracing::warn!(endpoint = %self.cfg.endpoint, from, to, recovered, error = %e, "kv-event replay incomplete");
        }
        self.send(Update::Gap {
            from,
            to,
            recovered,
            error,
        })
        .await
    }

    /// One replay exchange; the inner error says why it stopped short.
    async fn replay(&mut self, ep: &str, from: u64, to: u64) -> Result<Result<(), String>, Closed> {
        let mut dealer = DealerSocket::new();
        match tokio::time::timeout(self.cfg.connect_timeout, dealer.connect(ep)).await {
            Err(_) => return Ok(Err(format!("connecting to replay {ep} timed out"))),
            Ok(Err(e)) => return Ok(Err(format!("connecting to replay {ep}: {e}"))),
            Ok(Ok(())) => {}
        }
        let request = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&frames::replay_request(from)),
        ])
        .expect("two frames make a message");
        if let Err(e) = dealer.send(request).await {
            return Ok(Err(format!("sending the replay request to {ep}: {e}")));
        }
        loop {
            let msg = match tokio::time::timeout(self.cfg.replay_idle_timeout, dealer.recv()).await
            {
                Err(_) => return Ok(Err(format!("replay from {ep} went quiet"))),
                Ok(Err(e)) => return Ok(Err(format!("receiving the replay from {ep}: {e}"))),
                Ok(Ok(m)) => m,
            };
            let frames = msg.into_vec();
            match frames::parse_replay(&frames) {
                Err(e) => return Ok(Err(format!("replay answer from {ep}: {e}"))),
                Ok(ReplayFrame::End) => {
                    return Ok(if self.tracker.next_expected() > to {
                        Ok(())
                    } else {
                        Err(format!(
                            "the replay buffer of {ep} no longer holds sequence {}",
                            self.tracker.next_expected()
                        ))
                    });
                }
                Ok(ReplayFrame::Batch { seq, payload, .. }) => {
                    let expected = self.tracker.next_expected();
                    if seq < expected {
                        continue;
                    }
                    if seq > to {
                        // The live stream carries the rest.
                        return Ok(if expected > to {
                            Ok(())
                        } else {
                            Err(format!(
                                "the replay buffer of {ep} no longer holds sequence {expected}"
                            ))
                        });
                    }
                    if seq > expected {
                        return Ok(Err(format!(
                            "the replay buffer of {ep} no longer holds sequence {expected}"
                        )));
                    }
                    self.deliver(seq, payload, true).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_tells_next_repeat_gap_and_restart_apart() {
        let mut t = SeqTracker::default();
        assert_eq!(t.on_live(0), (None, Step::Deliver));
        t.delivered(0);
        assert_eq!(t.on_live(1), (None, Step::Deliver));
        t.delivered(1);
        assert_eq!(t.on_live(1), (None, Step::Duplicate));
        assert_eq!(t.on_live(5), (None, Step::Missing { from: 2, to: 4 }));
        // A replay delivered 2..=6 while the live 5 waited; the live 6 is then a repeat.
        for s in 2..=6 {
            t.delivered(s);
        }
        assert_eq!(t.on_live(6), (None, Step::Duplicate));
        assert_eq!(t.on_live(7), (None, Step::Deliver));
        t.delivered(7);
        // The publisher restarted.
        assert_eq!(t.on_live(0), (Some(7), Step::Deliver));
        t.delivered(0);
        assert_eq!(t.on_live(1), (None, Step::Deliver));
        // Restarted and already past its start when first seen.
        t.delivered(1);
        assert_eq!(t.on_live(0), (Some(1), Step::Deliver));
        let mut t = SeqTracker::default();
        assert_eq!(t.on_live(3), (None, Step::Missing { from: 0, to: 2 }));
        assert_eq!(t.next_expected(), 0);
    }

    #[test]
    fn a_jump_after_a_reconnection_is_a_restart() {
        let mut t = SeqTracker::default();
        for s in 0..=4 {
            assert_eq!(t.on_live(s), (None, Step::Deliver));
            t.delivered(s);
        }
        // Without a reconnection a jump is a gap.
        assert_eq!(t.on_live(7), (None, Step::Missing { from: 5, to: 6 }));
        for s in 5..=7 {
            t.delivered(s);
        }
        // Reconnected, and the next message is the one expected: the same stream.
        t.reconnected();
        assert_eq!(t.on_live(8), (None, Step::Deliver));
        t.delivered(8);
        // Reconnected to a publisher that restarted and has already sent 20 messages: the
        // whole new stream is asked for from 0, not 9..=19 of it.
        t.reconnected();
        assert_eq!(t.on_live(20), (Some(8), Step::Missing { from: 0, to: 19 }));
        assert_eq!(t.next_expected(), 0);
        // A publisher that sent one message, restarted, and sent one again: 0 after 0.
        let mut t = SeqTracker::default();
        assert_eq!(t.on_live(0), (None, Step::Deliver));
        t.delivered(0);
        assert_eq!(t.on_live(0), (None, Step::Duplicate));
        t.reconnected();
        assert_eq!(t.on_live(0), (Some(0), Step::Deliver));
    }
}
