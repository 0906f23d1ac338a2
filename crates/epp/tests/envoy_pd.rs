//! Prefill/decode disaggregation behind a real Envoy: `epp serve` with llm-d's P/D config picks
//! a decode pod for each request and, for a long uncached prompt, a prefill pod, which reaches
//! the decode pod as `x-prefiller-host-port` (where llm-d's routing sidecar would read it). A
//! recording hop in front of each decode simulator shows what Envoy delivered: exactly one
//! value, ours, whatever the client sent under that name; nothing for a decode-only request.
//!
//! Needs Envoy (EPP_ENVOY_BIN; `scripts/test` installs it).

#[path = "support/envoy.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use epp_sim::{Role, SimConfig};
use parking_lot::Mutex;
use support::*;

/// Requests a recorder saw: the values of `x-prefiller-host-port` on each inference request.
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// An HTTP hop on `ip` that records inference requests' prefill headers and forwards every
/// request to `target` (the picker scrapes the simulator's /metrics through it too).
async fn recorder(ip: &str, target: SocketAddr) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = s2.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 16 << 20).await.unwrap();
            let path = parts.uri.path().to_string();
            if path.starts_with("/v1/") {
                seen.lock().push(
                    parts
                        .headers
                        .get_all("x-prefiller-host-port")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_string())
                        .collect(),
                );
            }
            let r = http(
                target,
                parts.method.as_str(),
                &path,
                &[("content-type", "application/json")],
                &body,
            )
            .await;
            axum::http::Response::builder()
                .status(r.status)
                .body(axum::body::Body::from(r.body))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

const PD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false}
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
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delivers_the_prefill_pick_to_the_decode_pod() {
    let mut servers = Vec::new();
    for (i, role) in [Role::Prefill, Role::Decode, Role::Decode]
        .into_iter()
        .enumerate()
    {
        let cfg = SimConfig {
            name: format!("sim-{i}"),
            role,
            ..Default::default()
        };
        let addr: SocketAddr = format!("127.0.0.{}:0", i + 1).parse().unwrap();
        servers.push(epp_sim::spawn(cfg, addr).await.unwrap());
    }
    let sims = Sims { servers };
    let (d1, seen1) = recorder("127.0.0.2", sims.addr(1)).await;
    let (d2, seen2) = recorder("127.0.0.3", sims.addr(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &file,
        format!(
            "endpoints:\n- address: {}\n  labels: {{llm-d.ai/role: prefill}}\n\
             - address: {d1}\n  labels: {{llm-d.ai/role: decode}}\n\
             - address: {d2}\n  labels: {{llm-d.ai/role: decode}}\n",
            sims.addr(0)
        ),
    )
    .unwrap();
    let picker = start_picker_over(
        &["--endpoints-file".into(), file.display().to_string()],
        3,
        None,
        &["--config-text", PD_CONFIG],
    )
    .await;
    let envoy = start_envoy(&picker, &sims, Variant::FailClosed).await;
    let post = |prompt: String| {
        let listener = envoy.listener;
        async move {
            let body = serde_json::to_vec(&serde_json::json!({
                "model": "sim-model", "prompt": prompt, "max_tokens": 2
            }))
            .unwrap();
            http(
                listener,
                "POST",
                "/v1/completions",
                &[
                    ("content-type", "application/json"),
                    ("x-prefiller-host-port", "6.6.6.6:1"),
                ],
                &body,
            )
            .await
        }
    };
    // Long and uncached: disaggregated.
    let r = post("abcd".repeat(256)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Short: decode-only.
    let r = post("hi".into()).await;
    assert_eq!(r.status, 200);
    let mut all: Vec<Vec<String>> = seen1.lock().clone();
    all.extend(seen2.lock().clone());
    all.sort();
    assert_eq!(
        all,
        vec![vec![], vec![sims.addr(0).to_string()]],
        "one request carried exactly our prefill pick, the other none"
    );
    let text = String::from_utf8(try_get(picker.metrics, "/metrics").await.unwrap().body).unwrap();
    for d in ["prefill-decode", "decode-only"] {
        let line = format!("llm_d_epp_disagg_decision_total{{plugin_name=\"disagg-profile-handler\",plugin_type=\"disagg-profile-handler\",model_name=\"sim-model\",decision_type=\"{d}\"}} 1");
        assert!(text.contains(&line), "{line}\n{text}");
    }
    drop(envoy);
}
