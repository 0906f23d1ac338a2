//! The load driver: sends a [`Workload`] to an OpenAI-compatible base URL, open-loop (Poisson
//! arrivals at a rate) or closed-loop (N workers), bounded by a request count and/or a duration,
//! and records per-request timing, token usage and the serving backend.
//!
//! Every request streams (`stream: true`, `stream_options.include_usage`) so that time to first
//! token can be measured as the arrival of the first chunk carrying content, and inter-token
//! latency as the gaps between the arrivals of later content chunks. A stop signal (Ctrl-C
//! in the CLI) ends the run at once and returns the requests completed so far.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::http::{client, normalize_base_url, HttpClient, HttpError};
use crate::sse::{SseData, SseParser};
use crate::workload::{Api, Workload};

/// Response header in which the picker (proxy mode, or a gateway) names the serving endpoint.
pub const SERVED_HEADER: &str = "x-gateway-destination-endpoint-served";
/// Response header in which the simulator names itself.
pub const POD_HEADER: &str = "x-inference-pod";

/// How requests are issued.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LoadMode {
    /// Poisson arrivals at `rate` requests per second, whatever the server's speed.
    OpenLoop { rate: f64 },
    /// `concurrency` workers, each sending its next request when the last one finished.
    ClosedLoop { concurrency: usize },
}

/// Parameters of one load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// OpenAI base URL (`http://host:port`, optionally with `/v1`).
    pub base_url: String,
    /// The `model` field sent with every request.
    pub model: String,
    pub mode: LoadMode,
    /// Stop issuing after this many requests.
    pub max_requests: Option<u64>,
    /// Stop issuing after this long.
    pub duration: Option<Duration>,
    /// Seed of the arrival process (open loop).
    pub seed: u64,
    /// Per-request limit, headers to last byte.
    pub request_timeout: Duration,
    /// After the issuing phase ends, how long in-flight requests may still finish.
    pub drain_timeout: Duration,
    /// Open loop: arrivals beyond this many in-flight requests are dropped and counted.
    pub max_in_flight: usize,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Shown in front of the progress bar.
    pub label: String,
    /// More base URLs (picker replicas): request `i` goes to the `i mod n`-th of
    /// `[base_url] + extra_base_urls`, a round-robin splitter on the client side.
    pub extra_base_urls: Vec<String>,
}

impl LoadConfig {
    /// A closed-loop config with conservative defaults.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            extra_base_urls: Vec::new(),
            model: model.into(),
            mode: LoadMode::ClosedLoop { concurrency: 8 },
            max_requests: Some(100),
            duration: None,
            seed: 0,
            request_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            max_in_flight: 4096,
            progress: false,
            label: String::new(),
        }
    }
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("a load run needs a bound: a request count, a duration, or both")]
    Unbounded,
    #[error("invalid load parameter: {0}")]
    Invalid(&'static str),
}

/// What happened to one request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    /// Seconds from the start of the run to sending.
    pub start_s: f64,
    /// Seconds to the first chunk with content (streaming) or the full body (non-streaming).
    pub ttft_s: Option<f64>,
    /// Seconds to the last byte.
    pub e2e_s: f64,
    /// Inter-token latencies of a streamed response, in seconds: the gaps between the arrivals
    /// of successive chunks carrying content (empty when not streamed or one chunk only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub itl_s: Vec<f64>,
    /// HTTP status, if a response head arrived.
    pub status: Option<u16>,
    /// Error kind, `None` on success: `http_<status>`, `connect`, `timeout`, `stream`,
    /// `client_backlog`, `drain_timeout`.
    pub error: Option<String>,
    /// Value of `x-gateway-destination-endpoint-served`.
    pub served: Option<String>,
    /// Value of `x-inference-pod`.
    pub pod: Option<String>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Whether the response carried a `usage` object.
    pub usage: bool,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// The result of a load run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Every issued request, in completion order (failed ones included).
    pub records: Vec<RequestRecord>,
    /// Requests issued (indices `0..issued` of the workload).
    pub issued: u64,
    /// Wall time from the first send to the last completion (or the stop).
    pub elapsed_s: f64,
    /// The stop signal ended the run early.
    pub interrupted: bool,
}

/// Runs `workload` against `cfg.base_url` until a bound is reached or `stop` turns true.
pub async fn run_load(
    cfg: &LoadConfig,
    workload: Arc<Workload>,
    mut stop: watch::Receiver<bool>,
) -> Result<RunOutcome, DriverError> {
    if cfg.max_requests.is_none() && cfg.duration.is_none() {
        return Err(DriverError::Unbounded);
    }
    match cfg.mode {
        LoadMode::OpenLoop { rate } if !(rate.is_finite() && rate > 0.0) => {
            return Err(DriverError::Invalid("rate must be a positive number"))
        }
        LoadMode::ClosedLoop { concurrency: 0 } => {
            return Err(DriverError::Invalid("concurrency must be at least 1"))
        }
        _ => {}
    }
    let mut bases = vec![normalize_base_url(&cfg.base_url)?];
    for u in &cfg.extra_base_urls {
        bases.push(normalize_base_url(u)?);
    }
    let http = client();
    let ctx = Arc::new(Ctx {
        http,
        bases,
        model: cfg.model.clone(),
        timeout: cfg.request_timeout,
        workload,
    });

    let bar = progress_bar(cfg);
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let max = cfg.max_requests.unwrap_or(u64::MAX);
    let mut arrivals = crate::workload::Prng::new(&[cfg.seed, 0xA11]);
    let mut next_arrival = start;
    let mut set: JoinSet<RequestRecord> = JoinSet::new();
    let mut records = Vec::new();
    let mut issued = 0u64;
    let mut issuing = true;
    let mut interrupted = *stop.borrow();
    let mut stop_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut errors = 0u64;

    if let LoadMode::OpenLoop { rate } = cfg.mode {
        next_arrival = start + exp_gap(&mut arrivals, rate);
    }

    while !interrupted {
        if issued >= max || deadline.is_some_and(|d| Instant::now() >= d) {
            issuing = false;
        }
        if let (true, LoadMode::ClosedLoop { concurrency }) = (issuing, cfg.mode) {
            while set.len() < concurrency && issued < max {
                spawn_one(&mut set, &ctx, issued, start);
                issued += 1;
            }
        }
        if !issuing && set.is_empty() {
            break;
        }
        let open_rate = match cfg.mode {
            LoadMode::OpenLoop { rate } if issuing => Some(rate),
            _ => None,
        };
        tokio::select! {
            joined = set.join_next(), if !set.is_empty() => {
                if let Some(Ok(rec)) = joined {
                    if !rec.ok() { errors += 1; }
                    records.push(rec);
                    bar.inc(u64::from(cfg.max_requests.is_some()));
                }
            }
            _ = tokio::time::sleep_until(next_arrival), if open_rate.is_some() => {
                if set.len() >= cfg.max_in_flight {
                    errors += 1;
                    records.push(RequestRecord {
                        index: issued,
                        start_s: start.elapsed().as_secs_f64(),
                        error: Some("client_backlog".into()),
                        ..RequestRecord::default()
                    });
                } else {
                    spawn_one(&mut set, &ctx, issued, start);
                }
                issued += 1;
                next_arrival += exp_gap(&mut arrivals, open_rate.unwrap_or(1.0));
            }
            _ = sleep_until_opt(deadline), if issuing && deadline.is_some() => {
                issuing = false;
            }
            changed = stop.changed(), if stop_open => {
                match changed {
                    Ok(()) => interrupted = *stop.borrow(),
                    Err(_) => stop_open = false,
                }
            }
            _ = tick.tick() => {}
        }
        if cfg.max_requests.is_none() {
            if let Some(d) = cfg.duration {
                bar.set_position(start.elapsed().min(d).as_secs());
            }
        }
        bar.set_message(format!(
            "done {} err {errors} in flight {}",
            records.len(),
            set.len()
        ));
    }

    if interrupted {
        set.abort_all();
    } else if !set.is_empty() {
        // Issuing ended on its bound: let in-flight requests finish, within limits.
        let drain_end = Instant::now() + cfg.drain_timeout;
        while !set.is_empty() {
            tokio::select! {
                joined = set.join_next() => {
                    if let Some(Ok(rec)) = joined { records.push(rec); }
                }
                _ = tokio::time::sleep_until(drain_end) => break,
                changed = stop.changed(), if stop_open => {
                    match changed {
                        Ok(()) if *stop.borrow() => { interrupted = true; break; }
                        Ok(()) => {}
                        Err(_) => stop_open = false,
                    }
                }
            }
        }
        let left = set.len();
        set.abort_all();
        for _ in 0..left {
            records.push(RequestRecord {
                error: Some("drain_timeout".into()),
                ..RequestRecord::default()
            });
        }
    }
    while set.join_next().await.is_some() {}
    let elapsed_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(RunOutcome {
        records,
        issued,
        elapsed_s,
        interrupted,
    })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn exp_gap(rng: &mut crate::workload::Prng, rate: f64) -> Duration {
    let u = rng.next_f64();
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

fn progress_bar(cfg: &LoadConfig) -> ProgressBar {
    use std::io::IsTerminal;
    if !cfg.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, unit) = match (cfg.max_requests, cfg.duration) {
        (Some(n), _) => (n, "req"),
        (None, Some(d)) => (d.as_secs().max(1), "s"),
        (None, None) => (0, ""),
    };
    let bar = ProgressBar::new(len);
    let template =
        format!("{{prefix:>14}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(cfg.label.clone());
    bar
}

struct Ctx {
    http: HttpClient,
    /// Replicas, served round-robin by request index.
    bases: Vec<String>,
    model: String,
    timeout: Duration,
    workload: Arc<Workload>,
}

fn spawn_one(set: &mut JoinSet<RequestRecord>, ctx: &Arc<Ctx>, index: u64, run_start: Instant) {
    let ctx = Arc::clone(ctx);
    set.spawn(async move { send_one(&ctx, index, run_start).await });
}

/// Builds the JSON body actually sent: the workload's body plus model and streaming options.
pub fn wire_body(body: &Value, model: &str) -> Value {
    let mut body = body.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.insert("model".into(), Value::from(model));
        obj.insert("stream".into(), Value::Bool(true));
        obj.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    body
}

async fn send_one(ctx: &Ctx, index: u64, run_start: Instant) -> RequestRecord {
    let req = ctx.workload.request(index);
    let body = wire_body(&req.body, &ctx.model);
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut rec = RequestRecord {
        index,
        start_s: run_start.elapsed().as_secs_f64(),
        ..RequestRecord::default()
    };
    let t0 = Instant::now();
    let res = tokio::time::timeout(ctx.timeout, exchange(ctx, req.api, bytes, t0, &mut rec)).await;
    rec.e2e_s = t0.elapsed().as_secs_f64();
    match res {
        Ok(Ok(())) => {}
        Ok(Err(kind)) => rec.error = Some(kind),
        Err(_) => rec.error = Some("timeout".into()),
    }
    rec
}

/// Sends one request and reads the whole response into `rec`; `Err` carries the error kind.
async fn exchange(
    ctx: &Ctx,
    api: Api,
    body: Bytes,
    t0: Instant,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    let base = &ctx.bases[(rec.index % ctx.bases.len() as u64) as usize];
    let request = http::Request::post(format!("{}{}", base, api.path()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Full::new(body))
        .map_err(|_| "request".to_owned())?;
    let resp = ctx
        .http
        .request(request)
        .await
        .map_err(|_| "connect".to_owned())?;
    let status = resp.status().as_u16();
    rec.status = Some(status);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    rec.served = header(SERVED_HEADER);
    rec.pod = header(POD_HEADER);
    let is_sse = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    if !(200..300).contains(&status) {
        // Drain (bounded by the request timeout) so the connection can be reused.
        while let Some(Ok(_)) = body.frame().await {}
        return Err(format!("http_{status}"));
    }
    if !is_sse {
        let bytes = body
            .collect()
            .await
            .map_err(|_| "stream".to_owned())?
            .to_bytes();
        rec.ttft_s = Some(t0.elapsed().as_secs_f64());
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| "stream".to_owned())?;
        apply_usage(&v, rec);
        return Ok(());
    }
    let mut parser = SseParser::new();
    let mut chunks = 0u64;
    let mut done = false;
    let mut last_content: Option<Instant> = None;
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Err(_)) => return Err("stream".into()),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for ev in parser.push(&data) {
            match ev {
                SseData::Done => done = true,
                SseData::Json(text) => {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        return Err("stream".into());
                    };
                    if v.get("error").is_some() {
                        return Err("stream".into());
                    }
                    if rec.ttft_s.is_none() && has_content(&v) {
                        rec.ttft_s = Some(t0.elapsed().as_secs_f64());
                    }
                    if has_content(&v) {
                        chunks += 1;
                        let now = Instant::now();
                        if let Some(prev) = last_content.replace(now) {
                            rec.itl_s.push((now - prev).as_secs_f64());
                        }
                    }
                    apply_usage(&v, rec);
                }
            }
        }
    }
    if let Some(SseData::Done) = parser.finish() {
        done = true;
    }
    if !rec.usage {
        rec.output_tokens = chunks;
    }
    if !done && !rec.usage {
        return Err("stream".into());
    }
    Ok(())
}

/// Whether a streamed chunk (chat or completions) carries generated text.
fn has_content(v: &Value) -> bool {
    v["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let s = c["delta"]["content"]
                .as_str()
                .or_else(|| c["text"].as_str())
                .or_else(|| c["delta"]["reasoning_content"].as_str());
            s.is_some_and(|s| !s.is_empty())
        })
    })
}

fn apply_usage(v: &Value, rec: &mut RequestRecord) {
    let u = &v["usage"];
    if !u.is_object() {
        return;
    }
    rec.usage = true;
    rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
    rec.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
    rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
}

/// Error counts by kind.
pub fn error_counts(records: &[RequestRecord]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in records {
        if let Some(e) = &r.error {
            *m.entry(e.clone()).or_insert(0) += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_detection_covers_chat_and_completions() {
        assert!(!has_content(
            &json!({"choices":[{"delta":{"role":"assistant","content":""}}]})
        ));
        assert!(has_content(
            &json!({"choices":[{"delta":{"content":"hi"}}]})
        ));
        assert!(has_content(&json!({"choices":[{"text":"x","index":0}]})));
        assert!(!has_content(
            &json!({"choices":[], "usage": {"prompt_tokens": 3}})
        ));
    }

    #[test]
    fn usage_is_read_with_cached_tokens() {
        let mut r = RequestRecord::default();
        apply_usage(&json!({"usage": null}), &mut r);
        assert!(!r.usage);
        apply_usage(
            &json!({"usage": {"prompt_tokens": 100, "completion_tokens": 7,
                    "prompt_tokens_details": {"cached_tokens": 64}}}),
            &mut r,
        );
        assert!(r.usage);
        assert_eq!(
            (r.prompt_tokens, r.cached_tokens, r.output_tokens),
            (100, 64, 7)
        );
    }

    #[test]
    fn wire_body_adds_model_and_streaming() {
        let b = wire_body(&json!({"prompt": "p", "max_tokens": 3}), "m");
        assert_eq!(
            b,
            json!({"prompt": "p", "max_tokens": 3, "model": "m", "stream": true,
                   "stream_options": {"include_usage": true}})
        );
    }
}
