//! The flow-control workload (`epp bench --flow-control`): tenants and priority classes against
//! a pool driven to twice its capacity, through an in-process `epp proxy` with
//! `featureGates: [flowControl]` and fresh simulators.
//!
//! 1. **Unloaded**: premium requests alone at a fifth of the pool's capacity: the TTFT baseline.
//! 2. **Overload** (open loop, Poisson, 2× capacity): premium (objective `premium`, priority 10)
//!    at 0.1×, standard (no objective, priority 0) at 0.6×, batch (objective `batch`,
//!    priority −1, sheddable: its band holds few requests) at 1.3×. Premium TTFT p90 should stay
//!    near the baseline with none lost; what gets refused should be batch.
//! 3. **Fairness** (closed loop): two standard tenants, `tenant-a` with 10× the clients of
//!    `tenant-b`, both always backlogged; Jain's index of their completions, with flow control
//!    (round robin between flows) and, for contrast, without it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::stats::Percentiles;
use crate::workload::Prng;

/// Parameters of the run.
#[derive(Clone, Debug)]
pub struct FlowBench {
    pub backends: usize,
    /// Requests one simulator runs at once (the picker's `maxConcurrency` per endpoint).
    pub slots: usize,
    pub latency: epp_sim::LatencyModel,
    pub prompt_tokens: u32,
    pub output_len: u32,
    /// Length of each phase.
    pub phase: Duration,
    pub seed: u64,
    /// `priority-holdback-policy` with this `minCeiling` as the usage limit (batch's ceiling;
    /// standard's is halfway to 1.0, premium's 1.0); `None`: the static default.
    pub holdback_min_ceiling: Option<f64>,
}

impl Default for FlowBench {
    fn default() -> Self {
        Self {
            backends: 2,
            slots: 4,
            latency: epp_sim::LatencyModel {
                prefill_overhead_ms: 5.0,
                prefill_per_token_ms: 0.05,
                inter_token_ms: 10.0,
                inter_token_per_seq_ms: 0.0,
                jitter: 0.0,
            },
            prompt_tokens: 1024,
            output_len: 16,
            phase: Duration::from_secs(20),
            seed: 42,
            holdback_min_ceiling: None,
        }
    }
}

impl FlowBench {
    /// Seconds one request holds a slot.
    pub fn service_s(&self) -> f64 {
        let l = &self.latency;
        (l.prefill_overhead_ms
            + l.prefill_per_token_ms * f64::from(self.prompt_tokens)
            + l.inter_token_ms * f64::from(self.output_len))
            / 1000.0
    }
    /// Requests per second the pool completes at full use.
    pub fn capacity_rps(&self) -> f64 {
        (self.backends * self.slots) as f64 / self.service_s()
    }
}

/// One class's results in one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClassResult {
    pub sent: u64,
    pub ok: u64,
    /// Refusals by HTTP status.
    pub refused: BTreeMap<u16, u64>,
    /// Transport errors and timeouts.
    pub lost: u64,
    pub ttft: Percentiles,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowReport {
    pub capacity_rps: f64,
    pub service_s: f64,
    pub unloaded_premium: ClassResult,
    pub overload: BTreeMap<String, ClassResult>,
    /// Completions per tenant in the fairness phase's middle 80%, with flow control.
    pub fair_completions: BTreeMap<String, u64>,
    pub fair_jain: f64,
    /// The same without flow control (requests go straight to the servers' queues).
    pub unfair_completions: BTreeMap<String, u64>,
    pub unfair_jain: f64,
}

/// Jain's fairness index of `x`: 1 when equal, 1/n when one takes everything.
pub fn jain(x: &[f64]) -> f64 {
    let s: f64 = x.iter().sum();
    let q: f64 = x.iter().map(|v| v * v).sum();
    if q == 0.0 {
        return 0.0;
    }
    s * s / (x.len() as f64 * q)
}

#[derive(Clone, Copy, Debug)]
struct Class {
    name: &'static str,
    objective: Option<&'static str>,
    fairness: &'static str,
}

const PREMIUM: Class = Class {
    name: "premium (priority 10)",
    objective: Some("premium"),
    fairness: "premium",
};
const STANDARD: Class = Class {
    name: "standard (priority 0)",
    objective: None,
    fairness: "standard",
};
const BATCH: Class = Class {
    name: "batch (priority -1, sheddable)",
    objective: Some("batch"),
    fairness: "batch",
};

#[derive(Debug)]
struct Rec {
    /// Seconds since the phase started, at completion.
    done_s: f64,
    status: Option<u16>,
    ttft_s: Option<f64>,
}

fn flow_config(b: &FlowBench) -> String {
    let base = format!(
        r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
- type: round-robin-fairness-policy
- type: concurrency-detector
  parameters:
    maxConcurrency: {slots}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
flowControl:
  defaultRequestTTL: 30s
  defaultPriorityBand:
    fairnessPolicyRef: round-robin-fairness-policy
  defaultNegativePriorityBand:
    maxRequests: {shed}
  saturationDetector:
    pluginRef: concurrency-detector
"#,
        slots = b.slots,
        shed = b.slots * b.backends,
    );
    match b.holdback_min_ceiling {
        None => base,
        Some(m) => base.replacen(
            "- type: round-robin-fairness-policy\n",
            &format!(
                "- type: round-robin-fairness-policy\n- type: priority-holdback-policy\n  parameters:\n    minCeiling: {m}\n"
            ),
            1,
        ) + "  usageLimitPolicyPluginRef: priority-holdback-policy\n",
    }
}

const PLAIN_CONFIG: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#;

async fn start_proxy(
    endpoints: &[SocketAddr],
    yaml: &str,
) -> anyhow::Result<epp_core::proxy::ProxyHandle> {
    use epp_core::admission::Objective;
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let picker = epp_core::app::RuntimeOptions {
        discovery: Arc::new(epp_core::discovery::StaticDiscovery {
            endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
            file: None,
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        }),
        config: epp_core::config::EndpointPickerConfig::from_yaml(yaml)
            .map_err(|e| anyhow::anyhow!("invalid EndpointPickerConfig: {e}"))?,
        metrics_addr: None,
        health_addr: None,
        grace_period: Duration::from_secs(2),
        objectives: vec![
            Objective::parse("premium=10").map_err(anyhow::Error::msg)?,
            Objective::parse("batch=-1").map_err(anyhow::Error::msg)?,
        ],
        ..Default::default()
    };
    let p = epp_core::proxy::spawn(epp_core::proxy::ProxyOptions {
        listen: loopback(0),
        picker,
        ..Default::default()
    })
    .await?;
    // Until every endpoint is routable.
    for _ in 0..500 {
        if p.director.datastore().snapshot().routable().count() == endpoints.len() {
            return Ok(p);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the simulators did not become healthy")
}

/// One streamed completion; TTFT is the first body frame.
async fn send(
    client: &crate::http::HttpClient,
    url: &str,
    body: Bytes,
    class: Class,
    tenant: &str,
    t0: Instant,
) -> Rec {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", "application/json")
        .header("x-llm-d-inference-fairness-id", tenant);
    if let Some(o) = class.objective {
        b = b.header("x-llm-d-inference-objective", o);
    }
    let started = Instant::now();
    let Ok(req) = b.body(Full::new(body)) else {
        return Rec {
            done_s: t0.elapsed().as_secs_f64(),
            status: None,
            ttft_s: None,
        };
    };
    let fut = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut ttft = None;
        while let Some(f) = body.frame().await {
            let f = f.ok()?;
            if ttft.is_none() && f.data_ref().is_some_and(|d| !d.is_empty()) {
                ttft = Some(started.elapsed().as_secs_f64());
            }
        }
        Some((status, ttft))
    };
    let r = tokio::time::timeout(Duration::from_secs(90), fut)
        .await
        .ok()
        .flatten();
    Rec {
        done_s: t0.elapsed().as_secs_f64(),
        status: r.map(|x| x.0),
        ttft_s: r.and_then(|x| x.1),
    }
}

fn body(b: &FlowBench, i: u64) -> Bytes {
    let prompt = crate::workload::synth_text(&[b.seed, i], b.prompt_tokens);
    Bytes::from(
        serde_json::json!({
            "model": epp_sim::SimConfig::default().model,
            "prompt": prompt,
            "max_tokens": b.output_len,
            "stream": true,
        })
        .to_string(),
    )
}

fn summarize(recs: &[Rec]) -> ClassResult {
    let mut r = ClassResult {
        sent: recs.len() as u64,
        ..Default::default()
    };
    let mut ttft = Vec::new();
    for x in recs {
        match x.status {
            Some(200) => {
                r.ok += 1;
                if let Some(t) = x.ttft_s {
                    ttft.push(t);
                }
            }
            Some(s) => *r.refused.entry(s).or_default() += 1,
            None => r.lost += 1,
        }
    }
    r.ttft = Percentiles::from_values(ttft);
    r
}

/// Open-loop Poisson arrivals of each `(class, rate)` for `len`; every record per class.
async fn open_loop(
    b: &FlowBench,
    url: &str,
    classes: &[(Class, f64)],
    len: Duration,
) -> BTreeMap<&'static str, Vec<Rec>> {
    let client = crate::http::client();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (k, &(class, rate)) in classes.iter().enumerate() {
        let (client, url, b) = (client.clone(), url.to_string(), b.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Prng::new(&[b.seed, k as u64, 7]);
            let mut next = 0.0f64;
            let mut inflight = Vec::new();
            let mut i = 0u64;
            while next < len.as_secs_f64() {
                let at = t0 + Duration::from_secs_f64(next);
                tokio::time::sleep_until(at.into()).await;
                let body = body(&b, (k as u64) << 40 | i);
                let (client, url) = (client.clone(), url.clone());
                inflight.push(tokio::spawn(async move {
                    send(&client, &url, body, class, class.fairness, t0).await
                }));
                i += 1;
                next += -(1.0 - rng.next_f64()).ln() / rate;
            }
            let mut out = Vec::new();
            for h in inflight {
                if let Ok(r) = h.await {
                    out.push(r);
                }
            }
            (class.name, out)
        }));
    }
    let mut m = BTreeMap::new();
    for t in tasks {
        if let Ok((n, v)) = t.await {
            m.insert(n, v);
        }
    }
    m
}

/// Closed loop: `clients[i]` workers for tenant `tenants[i]`, for `len`; completions per tenant
/// within the middle 80% of the phase.
async fn closed_loop(
    b: &FlowBench,
    url: &str,
    tenants: &[(&'static str, usize)],
    len: Duration,
) -> BTreeMap<String, u64> {
    let client = crate::http::client();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for &(tenant, n) in tenants {
        for w in 0..n {
            let (client, url, b) = (client.clone(), url.to_string(), b.clone());
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                let mut i = 0u64;
                while t0.elapsed() < len {
                    let body = body(&b, (w as u64) << 32 | i);
                    let r = send(&client, &url, body, STANDARD, tenant, t0).await;
                    if r.status == Some(200) {
                        done.push(r.done_s);
                    }
                    i += 1;
                }
                (tenant, done)
            }));
        }
    }
    let (lo, hi) = (len.as_secs_f64() * 0.1, len.as_secs_f64() * 0.9);
    let mut m: BTreeMap<String, u64> = tenants.iter().map(|(t, _)| (t.to_string(), 0)).collect();
    for t in tasks {
        if let Ok((tenant, done)) = t.await {
            *m.entry(tenant.to_string()).or_default() +=
                done.iter().filter(|d| **d >= lo && **d < hi).count() as u64;
        }
    }
    m
}

/// Run the three phases.
pub async fn run(b: &FlowBench) -> anyhow::Result<FlowReport> {
    let base = epp_sim::SimConfig {
        max_num_seqs: b.slots,
        latency: b.latency,
        shutdown_grace: Duration::from_secs(2),
        ..epp_sim::SimConfig::default()
    };
    let sims = epp_sim::spawn_many(&base, "sim", [127, 0, 0, 1].into(), 0, b.backends).await?;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    let cap = b.capacity_rps();
    let mut report = FlowReport {
        capacity_rps: cap,
        service_s: b.service_s(),
        ..Default::default()
    };
    let p = start_proxy(&addrs, &flow_config(b)).await?;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let unloaded = open_loop(b, &url, &[(PREMIUM, 0.2 * cap)], b.phase / 2).await;
    report.unloaded_premium = summarize(unloaded.get(PREMIUM.name).map_or(&[][..], |v| v));
    let over = open_loop(
        b,
        &url,
        &[
            (PREMIUM, 0.1 * cap),
            (STANDARD, 0.6 * cap),
            (BATCH, 1.3 * cap),
        ],
        b.phase,
    )
    .await;
    report.overload = over
        .iter()
        .map(|(k, v)| (k.to_string(), summarize(v)))
        .collect();
    let k = b.slots * b.backends;
    let tenants = [("tenant-a", 10 * k), ("tenant-b", k)];
    report.fair_completions = closed_loop(b, &url, &tenants, b.phase).await;
    p.stop().await;
    let plain = start_proxy(&addrs, PLAIN_CONFIG).await?;
    let url = format!("http://{}/v1/completions", plain.proxy_addr);
    report.unfair_completions = closed_loop(b, &url, &tenants, b.phase).await;
    plain.stop().await;
    let j = |m: &BTreeMap<String, u64>| jain(&m.values().map(|v| *v as f64).collect::<Vec<_>>());
    report.fair_jain = j(&report.fair_completions);
    report.unfair_jain = j(&report.unfair_completions);
    drop(sims);
    Ok(report)
}

/// The report as text.
pub fn render(b: &FlowBench, r: &FlowReport) -> String {
    let ms = |s: f64| s * 1000.0;
    let mut out = format!(
        "flow control: {} simulators × {} slots, {:.0} ms per request → capacity {:.1} req/s\n\n",
        b.backends,
        b.slots,
        ms(r.service_s),
        r.capacity_rps
    );
    out += &match b.holdback_min_ceiling {
        Some(m) => format!("usage limit: priority-holdback-policy, minCeiling {m}\n\n"),
        None => "usage limit: static-usage-limit-policy (1.0)\n\n".to_string(),
    };
    out += &format!(
        "{:<32} {:>6} {:>6} {:>10} {:>6} {:>10} {:>10}\n",
        "class", "sent", "ok", "refused", "lost", "TTFT p50", "TTFT p90"
    );
    let row = |name: &str, c: &ClassResult| {
        format!(
            "{:<32} {:>6} {:>6} {:>10} {:>6} {:>7.1} ms {:>7.1} ms\n",
            name,
            c.sent,
            c.ok,
            c.refused.values().sum::<u64>(),
            c.lost,
            ms(c.ttft.p50),
            ms(c.ttft.p90)
        )
    };
    out += &row("unloaded: premium", &r.unloaded_premium);
    for (k, c) in &r.overload {
        out += &row(&format!("2x: {k}"), c);
    }
    let base = r.unloaded_premium.ttft.p90;
    if let Some(p) = r.overload.get(PREMIUM.name) {
        out += &format!(
            "\npremium TTFT p90 under 2x load: {:.2}x its unloaded value; premium lost or refused: {}\n",
            if base > 0.0 { p.ttft.p90 / base } else { 0.0 },
            p.lost + p.refused.values().sum::<u64>()
        );
    }
    out += &format!(
        "fairness (tenant-a 10x the clients of tenant-b, both backlogged): completions {:?}, Jain {:.3} with flow control; {:?}, Jain {:.3} without\n",
        r.fair_completions, r.fair_jain, r.unfair_completions, r.unfair_jain
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index() {
        assert!((jain(&[5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[10.0, 0.0]) - 0.5).abs() < 1e-12);
        let ten_to_one = jain(&[10.0, 1.0]);
        assert!((ten_to_one - 121.0 / 202.0).abs() < 1e-12);
    }

    #[test]
    fn the_holdback_variant_configures_priority_holdback() {
        use epp_core::admission::usage_limit::{Domain, Limit};
        let settings = |b: &FlowBench| {
            let cfg = epp_core::config::EndpointPickerConfig::from_yaml(&flow_config(b)).unwrap();
            epp_core::admission::settings::FlowSettings::from_config(&cfg).unwrap()
        };
        let plain = settings(&FlowBench::default());
        assert_eq!(plain.usage_limit.limit, Limit::Static { threshold: 1.0 });
        let hb = settings(&FlowBench {
            holdback_min_ceiling: Some(0.75),
            ..Default::default()
        });
        assert_eq!(
            hb.usage_limit.limit,
            Limit::Holdback {
                min: 0.75,
                max: 1.0,
                domain: Domain::Rank
            }
        );
    }

    #[test]
    fn capacity_from_the_latency_model() {
        let b = FlowBench::default();
        // 5 + 0.05 × 1024 + 10 × 16 = 216.2 ms; 8 slots.
        assert!((b.service_s() - 0.2162).abs() < 1e-9);
        assert!((b.capacity_rps() - 8.0 / 0.2162).abs() < 1e-9);
    }
}
