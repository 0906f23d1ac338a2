//! `predicted-ttft-scorer` through `epp proxy` over real simulators: the picker learns each
//! endpoint's prefill rate from the streamed responses it relays, sends cold requests to the
//! faster endpoint, and still sends a request to the slower one when that one holds its prefix
//! and the prefill it saves outweighs the speed difference.

mod common;

use std::time::Duration;

use common::*;
use epp_core::gateway::headers::SERVED;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false}
- type: predicted-ttft-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: predicted-ttft-scorer}, {pluginRef: max-score-picker}]
";

fn streamed(prompt: &str) -> serde_json::Value {
    serde_json::json!({"model": "sim-model", "prompt": prompt, "max_tokens": 3, "stream": true,
        "stream_options": {"include_usage": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_learns_prefill_rates_and_trades_cache_hits_against_them() {
    // sim 0 prefills at 0.5 ms per token, sim 1 at 0.02 ms.
    let mut sims = sims(2, |_| {}).await;
    let slow_cfg = epp_sim::SimConfig {
        name: "slow".into(),
        latency: epp_sim::LatencyModel {
            prefill_overhead_ms: 1.0,
            prefill_per_token_ms: 0.5,
            inter_token_ms: 1.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        },
        ..Default::default()
    };
    let slow = epp_sim::spawn(slow_cfg, loopback0()).await.unwrap();
    let fast = sims.remove(0);
    let (slow_addr, fast_addr) = (slow.addr().to_string(), fast.addr().to_string());
    let mut picker = picker_options(vec![slow_addr.clone(), fast_addr.clone()]);
    picker.config = epp_core::config::EndpointPickerConfig::from_yaml(CONFIG).unwrap();
    let mut opts = proxy_options(picker);
    opts.test_hooks = true;
    let p = epp_core::proxy::spawn(opts).await.unwrap();
    wait_healthy(&p, 2).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let send = |prompt: String, pin: Option<String>| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let pin: Vec<(&str, &str)> = match &pin {
                Some(a) => vec![("test-epp-endpoint-selection", a.as_str())],
                None => vec![],
            };
            let mut h = vec![("content-type", "application/json")];
            h.extend(pin);
            let r = request(
                &c,
                "POST",
                &url,
                &h,
                serde_json::to_vec(&streamed(&prompt)).unwrap(),
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.header(SERVED).unwrap().to_string()
        }
    };
    // Teach: 12 idle, uncached 256-token prompts pinned to each.
    for i in 0..12 {
        for a in [&slow_addr, &fast_addr] {
            send(
                format!("{a} teach {i} ")
                    .repeat(64)
                    .chars()
                    .take(1024)
                    .collect(),
                Some(a.clone()),
            )
            .await;
        }
    }
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    let rate = |a: &str| {
        sum(
            &m,
            "epp_backend_prefill_seconds_per_token",
            &[("backend", a)],
        )
    };
    let (rs, rf) = (rate(&slow_addr), rate(&fast_addr));
    // Learned from wall-clock TTFTs (loopback, two cores): within a factor of the truth.
    assert!((0.25e-3..1.0e-3).contains(&rs), "slow: {rs} s/token\n{m:?}");
    assert!(rf < 0.2e-3, "fast: {rf} s/token");
    assert!(rs > 4.0 * rf, "slow {rs} vs fast {rf}");
    // Cold requests go to the fast one.
    for i in 0..6 {
        let served = send(format!("cold {i} ").repeat(200), None).await;
        assert_eq!(served, fast_addr, "cold request {i}");
    }
    // A long prompt cached on the slow one only: the 16 uncached tokens there (8 ms) beat
    // prefilling all 4096 on the fast one (about 80 ms).
    let long = "z".repeat(4096 * 4);
    send(long.clone(), Some(slow_addr.clone())).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let served = send(format!("{long} and one more question"), None).await;
    assert_eq!(
        served, slow_addr,
        "the cached prefix on the slow endpoint should win"
    );
    p.stop().await;
    drop((slow, fast));
}
