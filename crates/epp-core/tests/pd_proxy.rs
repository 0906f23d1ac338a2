//! Prefill/decode disaggregation through `epp proxy`, end to end over loopback: one prefill and
//! two decode simulators speaking vLLM's NIXL-connector protocol, the proxy making the prefill
//! call itself and handing its `kv_transfer_params` to the decode.

mod common;

use std::time::Duration;

use common::*;
use epp_core::discovery::StaticDiscovery;
use epp_sim::{Faults, Role, SimServer};

const BLOCK: usize = 16;

/// llm-d's sim-pd sample: disaggregate when at least 16 prompt tokens are uncached on the
/// decode pick (16-token blocks, no auto-tuning).
const PD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false, maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
";

struct Pool {
    prefill: SimServer,
    decode: Vec<SimServer>,
    proxy: epp_core::proxy::ProxyHandle,
    _dir: tempfile::TempDir,
}

async fn pool(prefill_timeout: Duration, tweak_prefill: impl Fn(&mut epp_sim::SimConfig)) -> Pool {
    let mut prefill = sims(1, |c| {
        c.name = "prefill-0".into();
        c.role = Role::Prefill;
        c.block_size = BLOCK;
        tweak_prefill(c);
    })
    .await;
    let decode = sims(2, |c| {
        c.role = Role::Decode;
        c.block_size = BLOCK;
        // Computing the prompt costs clearly more than reading it from the prefill pod.
        c.latency.prefill_per_token_ms = 0.2;
    })
    .await;
    let prefill = prefill.remove(0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    let mut text = format!(
        "endpoints:\n- address: {}\n  labels: {{llm-d.ai/role: prefill}}\n",
        prefill.addr()
    );
    for d in &decode {
        text += &format!(
            "- address: {}\n  labels: {{llm-d.ai/role: decode}}\n",
            d.addr()
        );
    }
    std::fs::write(&file, text).unwrap();
    let mut picker = picker_options(vec![]);
    picker.discovery = std::sync::Arc::new(StaticDiscovery {
        endpoints: vec![],
        file: Some(file),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    });
    picker.config = epp_core::config::EndpointPickerConfig::from_yaml(PD_CONFIG).unwrap();
    let mut opts = proxy_options(picker);
    opts.prefill_timeout = prefill_timeout;
    let proxy = epp_core::proxy::spawn(opts).await.unwrap();
    wait_healthy(&proxy, 3).await;
    Pool {
        prefill,
        decode,
        proxy,
        _dir: dir,
    }
}

fn cached(v: &serde_json::Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

fn sim_metric(s: &SimServer, name: &str) -> f64 {
    let m = parse_exposition(&s.metrics_text());
    sum(&m, name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_are_prefilled_on_the_prefill_pod_and_decoded_from_its_blocks() {
    let p = pool(Duration::from_secs(10), |_| {}).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy.proxy_addr);
    // 64 tokens of prompt (4 bytes each): 4 full blocks, all uncached.
    let long = text(1, 256);
    let r = post_json(&c, &url, &completion(&long, "", 5)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let full = prompt_tokens / BLOCK as u64 * BLOCK as u64;
    assert!(full >= 64, "{v}");
    // Every full block came from the prefill pod: the decode reports them cached.
    assert_eq!(cached(&v), full, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let served = r
        .header(epp_core::gateway::headers::SERVED)
        .unwrap()
        .to_string();
    assert!(
        p.decode.iter().any(|d| d.addr().to_string() == served),
        "{served}"
    );
    assert_eq!(
        sim_metric(&p.prefill, "epp_sim:kv_transfer_prefills_total"),
        1.0
    );
    // The decode read the blocks and released them at the prefill pod.
    assert_eq!(
        sim_metric(&p.prefill, "epp_sim:kv_transfer_held_blocks"),
        0.0
    );
    let transferred: f64 = p
        .decode
        .iter()
        .map(|d| sim_metric(d, "epp_sim:kv_transfer_blocks_total"))
        .sum();
    assert_eq!(transferred as u64, full / BLOCK as u64);

    // Streamed, with usage in the last chunk: the client's stream is kept end to end.
    let long2 = text(2, 256);
    let mut body = completion(&long2, "", 4);
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post_json(&c, &url, &body).await;
    assert_eq!(r.status, 200);
    let sse = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let usage: serde_json::Value = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk");
    assert!(cached(&usage) >= 64, "{usage}");
    assert_eq!(
        sim_metric(&p.prefill, "epp_sim:kv_transfer_prefills_total"),
        2.0
    );

    // A short prompt decodes alone.
    let r = post_json(&c, &url, &completion("hi", "", 3)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sim_metric(&p.prefill, "epp_sim:kv_transfer_prefills_total"),
        2.0
    );

    let m = scrape(&c, p.proxy.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_pd_prefill_requests_total",
            &[("outcome", "transferred")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "llm_d_epp_disagg_decision_total",
            &[("decision_type", "prefill-decode")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "llm_d_epp_disagg_decision_total",
            &[("decision_type", "decode-only")]
        ),
        1.0
    );
    p.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_prefill_costs_only_time_the_decode_computes_the_prompt() {
    // The prefill pod answers every inference request with 500.
    let p = pool(Duration::from_millis(400), |_| {}).await;
    p.prefill
        .faults()
        .set(Faults {
            error_rate: 1.0,
            error_status: 500,
            ..Faults::default()
        })
        .unwrap();
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy.proxy_addr);
    let r = post_json(&c, &url, &completion(&text(3, 256), "", 3)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(cached(&r.json()), 0, "nothing came from the prefill pod");
    let m = scrape(&c, p.proxy.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_pd_prefill_requests_total",
            &[("outcome", "error_status")]
        ),
        1.0
    );
    // Slow: past --prefill-timeout the decode goes ahead alone.
    p.prefill
        .faults()
        .set(Faults {
            added_latency_ms: 3000.0,
            ..Faults::default()
        })
        .unwrap();
    let started = std::time::Instant::now();
    let r = post_json(&c, &url, &completion(&text(4, 256), "", 3)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cached(&r.json()), 0);
    let m = scrape(&c, p.proxy.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_pd_prefill_requests_total",
            &[("outcome", "timeout")]
        ),
        1.0
    );
    // Neither refusal counted against a decode pod, and every request was answered.
    assert_eq!(
        sum(&m, "epp_requests_total", &[("status", "200")]),
        2.0,
        "{m:?}"
    );
    p.proxy.stop().await;
}

/// Poll `f` until it holds (at most 5 s).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn aborted(s: &SimServer) -> f64 {
    let m = parse_exposition(&s.metrics_text());
    sum(
        &m,
        "vllm:request_success_total",
        &[("finished_reason", "abort")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_the_prefill_and_the_decode() {
    // A prefill that takes 3 s, then (second request) a decode that streams for seconds.
    let p = pool(Duration::from_secs(10), |c| {
        c.latency.prefill_overhead_ms = 3000.0
    })
    .await;
    let url = format!("http://{}/v1/completions", p.proxy.proxy_addr);
    let c = client();
    let body = serde_json::to_vec(&completion(&text(5, 256), "", 3)).unwrap();
    let req = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    // Gone during the prefill.
    let gone = tokio::time::timeout(Duration::from_millis(400), c.request(req)).await;
    assert!(gone.is_err(), "the prefill should still be running");
    eventually("the prefill pod sees the abort", || {
        aborted(&p.prefill) == 1.0
    })
    .await;
    assert_eq!(
        sim_metric(&p.prefill, "epp_sim:kv_transfer_prefills_total"),
        0.0
    );

    // Gone mid-decode: a fast prefill, a long streamed decode.
    let q = pool(Duration::from_secs(10), |_| {}).await;
    let url = format!("http://{}/v1/completions", q.proxy.proxy_addr);
    let mut body = completion(&text(6, 256), "", 2000);
    body["stream"] = true.into();
    let req = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(&body).unwrap(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    use http_body_util::BodyExt;
    let first = tokio::time::timeout(Duration::from_secs(5), b.frame())
        .await
        .unwrap();
    assert!(first.is_some());
    drop(b);
    eventually("the decode pod sees the abort", || {
        q.decode.iter().map(aborted).sum::<f64>() == 1.0
    })
    .await;
    assert_eq!(
        sim_metric(&q.prefill, "epp_sim:kv_transfer_prefills_total"),
        1.0
    );
    p.proxy.stop().await;
    q.proxy.stop().await;
}
