//! epp as a drop-in for llm-d-router's EPP:
//!
//! - the image started with exactly the argument list llm-d-router's Helm chart renders for a
//!   pool-less (standalone) install: no subcommand, Go-style flags, the chart's config file;
//!   pods are found through a Kubernetes API (the in-test server that speaks the real REST and
//!   watch JSON; no cluster can run here), the kubelet's gRPC probe service
//!   (`inference-extension`) turns SERVING, and an ext_proc request is routed to a pod;
//! - every sample `EndpointPickerConfig` llm-d-router ships, and the configs its chart renders,
//!   either load and route, or are refused with the precise message asserted here.
//!
//! `cargo test -p epp --test llmd_dropin`. Everything binds 127.0.0.0/8.

#[path = "../../epp-core/tests/k8s_fake/mod.rs"]
mod k8s_fake;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, HttpBody, HttpHeaders, ProcessingRequest,
};
use envoy_types::pb::google::protobuf::value::Kind;
use k8s_fake::{pod, FakeApi, Res};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm-d-router")
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port free on both loopback addresses (two "pods" listen on the same target port).
fn port_free_on(ips: &[&str]) -> u16 {
    for _ in 0..50 {
        let p = free_port();
        if ips.iter().all(|ip| TcpListener::bind((*ip, p)).is_ok()) {
            return p;
        }
    }
    panic!("no port free on {ips:?}");
}

fn wait_port(ip: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect((ip, port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{ip}:{port} never opened");
}

/// The values of the llm-d-router chart this test renders (`router.*`).
struct ChartValues {
    match_labels: BTreeMap<String, String>,
    target_ports: Vec<u16>,
    plugins_config_file: String,
    grpc_health_port: u16,
    /// `router.epp.flags`
    flags: BTreeMap<String, String>,
    tracing: bool,
    prometheus_auth: bool,
    replicas: u32,
}

/// The EPP container's `args` as `config/charts/routerlib/templates/_deployment.yaml` renders
/// them without an InferencePool (`router.inferencePool.create: false`), `config_dir` standing
/// for the ConfigMap's `/config` mount.
fn render_standalone_args(v: &ChartValues, config_dir: &Path) -> Vec<String> {
    let mut a = vec![
        "--endpoint-selector".to_string(),
        v.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        "--endpoint-target-ports".to_string(),
        v.target_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--zap-encoder".to_string(),
        "json".to_string(),
        "--config-file".to_string(),
        config_dir
            .join(&v.plugins_config_file)
            .display()
            .to_string(),
    ];
    if v.replicas > 1 {
        a.push("--ha-enable-leader-election".into());
    }
    a.push("--grpc-health-port".into());
    a.push(v.grpc_health_port.to_string());
    // Helm ranges over a map in key order; the chart renders `--key=value`.
    for (k, val) in &v.flags {
        a.push(format!("--{k}={val}"));
    }
    a.push(if v.tracing {
        "--tracing=true".into()
    } else {
        "--tracing=false".into()
    });
    if !v.prometheus_auth {
        a.push("--metrics-endpoint-auth=false".into());
    }
    a
}

async fn health_status(port: u16, service: &str) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut c = HealthClient::new(channel);
    let r = c
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rendered_standalone_args_start_the_picker_and_it_routes() {
    let ips = ["127.0.0.2", "127.0.0.3"];
    let target = port_free_on(&ips);
    let mut sims = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let child = Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(["sim", "--host", ip, "--base-port", &target.to_string()])
            .args(["--name-prefix", &format!("vllm-{i}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sims.push(Kill(child));
    }
    for ip in ips {
        wait_port(ip, target);
    }

    let api = FakeApi::start();
    for (i, ip) in ips.iter().enumerate() {
        api.apply(
            Res::Pods,
            "llm-d",
            pod(&format!("vllm-{i}"), ip, true, &[("app", "vllm-qwen3")]),
        );
    }
    // A pod of another app in the namespace is not selected.
    api.apply(
        Res::Pods,
        "llm-d",
        pod("other", "127.0.0.4", true, &[("app", "other")]),
    );

    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::copy(
        fixtures().join("chart-default-plugins.yaml"),
        config_dir.join("default-plugins.yaml"),
    )
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: epp, user: {{token: epp-sa-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: epp, namespace: llm-d}}}}]\n\
             current-context: fake\n",
            api.url()
        ),
    )
    .unwrap();

    let (grpc, health, metrics, probes) = (free_port(), free_port(), free_port(), free_port());
    // Ports a test must not take fixed go through `router.epp.flags`, as a user sets them.
    let values = ChartValues {
        match_labels: BTreeMap::from([("app".to_string(), "vllm-qwen3".to_string())]),
        target_ports: vec![target],
        plugins_config_file: "default-plugins.yaml".into(),
        grpc_health_port: health,
        flags: BTreeMap::from([
            ("emit-endpoint-scores".to_string(), "true".to_string()),
            ("grpc-port".to_string(), grpc.to_string()),
            (
                "health-probe-bind-address".to_string(),
                format!("127.0.0.1:{probes}"),
            ),
            ("metrics-port".to_string(), metrics.to_string()),
            ("v".to_string(), "2".to_string()),
        ]),
        tracing: false,
        prometheus_auth: false,
        replicas: 1,
    };
    let args = render_standalone_args(&values, &config_dir);
    assert_eq!(
        &args[..6],
        &[
            "--endpoint-selector",
            "app=vllm-qwen3",
            "--endpoint-target-ports",
            &target.to_string(),
            "--zap-encoder",
            "json"
        ]
    );
    let log_path = dir.path().join("epp.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // The chart's container has no subcommand: the image's entrypoint gets the flags.
    let epp = Kill(
        Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(&args)
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", &kubeconfig)
            .env("NAMESPACE", "llm-d")
            .env("POD_NAME", "epp-0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let show = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // The kubelet's probes (single replica): gRPC `inference-extension` on the health port.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if health_status(health, "inference-extension").await == Some(1)
            && health_status(health, "readiness").await == Some(1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", show());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The chart's Envoy health-checks the ext_proc cluster on the ext_proc port itself.
    assert_eq!(
        health_status(grpc, "envoy.service.ext_proc.v3.ExternalProcessor").await,
        Some(1),
        "{}",
        show()
    );

    // One request through the ext_proc protocol lands on a selected pod, with its score.
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let body = br#"{"model":"meta-llama/Llama-3.1-8B-Instruct","prompt":"hello","max_tokens":4}"#;
    let msgs = vec![
        ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![
                        header(":method", "POST"),
                        header(":path", "/v1/completions"),
                        header(":authority", "gw"),
                        header("content-type", "application/json"),
                    ],
                }),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        },
    ];
    let mut stream = client
        .process(futures_util::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no ext_proc answer")
        .unwrap()
        .unwrap();
    let Some(processing_response::Response::RequestHeaders(h)) = &first.response else {
        panic!("{first:?}\n{}", show());
    };
    let set = &h
        .response
        .as_ref()
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers;
    let dest = set
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == "x-gateway-destination-endpoint")
        .map(|h| String::from_utf8_lossy(&h.raw_value).to_string())
        .expect("destination header");
    let pods: Vec<String> = ips.iter().map(|ip| format!("{ip}:{target}")).collect();
    assert!(pods.contains(&dest), "{dest} not in {pods:?}");
    let lb = &first.dynamic_metadata.as_ref().unwrap().fields["envoy.lb"];
    let Some(Kind::StructValue(lb)) = &lb.kind else {
        panic!("{lb:?}")
    };
    let Some(Kind::StructValue(scores)) = &lb.fields["x-gateway-destination-endpoint-scores"].kind
    else {
        panic!("{lb:?}")
    };
    let score = match &scores.fields[&dest].kind {
        Some(Kind::NumberValue(n)) => *n,
        other => panic!("{other:?}"),
    };
    assert!(score > 0.0, "{score}");

    // `--zap-encoder json`: every log line is a JSON object.
    let text = show();
    assert!(text.lines().count() >= 3, "{text}");
    for line in text.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(
        text.contains("\"secure_serving\":false") && text.contains("outside a Kubernetes cluster"),
        "{text}"
    );
    drop(epp);
    drop(sims);
}

/// What loading one config must give: `Ok` (it loads and routes) or the exact error.
fn expected() -> BTreeMap<&'static str, Result<(), &'static str>> {
    const UNSUPPORTED: &str = "epp does not support it; supported types: ";
    // The llm-d placeholder host `<vllm-service>.<namespace>` is not a URL.
    const BURST_URL: &str = "plugins[0].parameters.vllm.url: \"http://<vllm-service>.<namespace>.svc.cluster.local:8000\" is not a URL";
    let refused = |prefix: &'static str| -> Result<(), &'static str> { Err(prefix) };
    let mut m = BTreeMap::from([
        ("chart-default-plugins.yaml", Ok(())),
        ("chart-default-plugins-sglang.yaml", Ok(())),
        ("chart-default-plugins-triton.yaml", Ok(())),
        ("chart-payload-agnostic.yaml", Ok(())),
        ("epp-config.yaml", Ok(())),
        ("epp-estimate-prefix-cache-config.yaml", Ok(())),
        ("sim-epp-config.yaml", Ok(())),
        ("epp-burst-prefix-cache-config.yaml", refused(BURST_URL)),
        // The precise producer without a token producer: requests are scored by the approximate
        // index (no token ids), counted in epp_precise_prefix_fallback_total{reason="no_token_ids"}.
        ("sim-epp-no-hit-lru.yaml", Ok(())),
        // Prefill/decode disaggregation and data-parallel ranks (routed in detail below).
        ("pd-epp-config.yaml", Ok(())),
        ("sim-pd-epp-config.yaml", Ok(())),
        ("dp-epp-config.yaml", Ok(())),
        // Encode disaggregation is not implemented: refused by name.
        (
            "sim-e-p-d-epp-config.yaml",
            refused("plugins[4].parameters.deciders.encode: encode disaggregation is not supported by epp (prefill/decode is)"),
        ),
        ("epp-precise-prefix-cache-config.yaml", Ok(())),
        // The central KV-event socket the engines connect to (kvEventsConfig.zmqEndpoint),
        // beside the per-endpoint subscriptions (discoverPods defaults to true); followed end to
        // end with real simulators below.
        ("sim-epp-kvcache-config.yaml", Ok(())),
        ("sim-epp-tokenizer-vllm-http-config.yaml", Ok(())),
    ]);
    // Unknown plugin types: the field, the type, and the list of what is supported.
    for (file, at) in [
        (
            "pd-topology-epp-config.yaml",
            "plugins[6].type: unknown plugin type \"topology-extractor\": ",
        ),
        (
            "sim-e-pd-epp-config.yaml",
            "plugins[3].type: unknown plugin type \"always-disagg-multimodal-decider\": ",
        ),
        (
            "sim-epp-gpu-config.yaml",
            "plugins[0].type: unknown plugin type \"dcgm-data-source\": ",
        ),
        // The token-producer's vLLM render backend loads; what stops these is the next plugin.
        (
            "epp-mm-embeddings-cache-config.yaml",
            "plugins[4].type: unknown plugin type \"mm-embeddings-cache-producer\": ",
        ),
        // The flow-control samples: the flow controller, its utilization-detector and its
        // default policies load; what stops each is the one plugin epp does not implement.
        (
            "probabilistic-admitter-epp-config.yaml",
            "plugins[0].type: unknown plugin type \"probabilistic-admitter\": ",
        ),
        (
            "sim-program-aware-config.yaml",
            "plugins[0].type: unknown plugin type \"program-aware-fairness\": ",
        ),
        (
            "soft-reflective-ceiling-epp-config.yaml",
            "plugins[3].type: unknown plugin type \"soft-reflective-ceiling-policy\": ",
        ),
    ] {
        m.insert(
            file,
            Err(Box::leak(format!("{at}{UNSUPPORTED}").into_boxed_str())),
        );
    }
    m
}

fn load(path: &Path) -> Result<epp_core::scheduler::Scheduler, String> {
    let text = std::fs::read_to_string(path).unwrap();
    let cfg =
        epp_core::config::EndpointPickerConfig::from_yaml(&text).map_err(|e| e.to_string())?;
    let s = epp_core::scheduler::Scheduler::from_config(&cfg).map_err(|e| e.to_string())?;
    epp_core::datalayer::DataLayer::from_config(&cfg).map_err(|e| e.to_string())?;
    epp_core::admission::FlowSettings::from_config(&cfg).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Route one chat request over two decode endpoints with `scheduler`; the pick's address.
fn route_one(scheduler: epp_core::scheduler::Scheduler) -> Result<String, String> {
    use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
    use epp_core::director::{Director, RouteRequest};
    use epp_core::gateway::{GatewayPolicy, InboundHeaders};
    use epp_core::request::ApiMethod;
    let ds = DatastoreWriter::new(HealthConfig::default());
    let director = Director::build(&ds, scheduler);
    let eps: Vec<EndpointSpec> = ["10.0.0.1:8000", "10.0.0.2:8000"]
        .iter()
        .map(|a| {
            let mut e = EndpointSpec::new(*a);
            e.labels.insert("llm-d.ai/role".into(), "decode".into());
            e
        })
        .collect();
    ds.set_endpoints(eps);
    for a in ["10.0.0.1:8000", "10.0.0.2:8000"] {
        ds.record_scrape(a, Ok(ModelServerMetrics::default()));
    }
    ds.mark_synced();
    let none: Vec<(String, Vec<u8>)> = Vec::new();
    let headers = InboundHeaders::read(none.as_slice(), GatewayPolicy::default());
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}]}"#;
    // A runtime: the vLLM render backend of some configs makes (failing) HTTP calls.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let routed = rt
        .block_on(director.route(RouteRequest {
            method: Some(ApiMethod::ChatCompletions),
            body,
            subset: None,
            headers: &headers,
        }))
        .map_err(|e| format!("{} {}", e.status, e.message))?;
    let addr = routed.targets[0].address().to_string();
    routed.tracker.finish(200);
    Ok(addr)
}

#[test]
fn llm_d_sample_configs_load_and_route_or_are_refused_precisely() {
    let want = expected();
    let mut seen = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 23, "{files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let Some(expect) = want.get(name) else {
            panic!(
                "{name}: no expectation; got {:?}",
                load(f).map(|s| s.describe())
            );
        };
        seen.push(name.to_string());
        match (expect, load(f)) {
            (Ok(()), Ok(s)) => {
                let pick = route_one(s).unwrap_or_else(|e| panic!("{name}: does not route: {e}"));
                assert!(pick.starts_with("10.0.0."), "{name}: {pick}");
            }
            (Ok(()), Err(e)) => panic!("{name}: should load, got: {e}"),
            (Err(msg), Ok(s)) => panic!(
                "{name}: should be refused ({msg}), loaded: {}",
                s.describe()
            ),
            (Err(msg), Err(e)) => assert!(e.contains(msg), "{name}:\n  got  {e}\n  want {msg}"),
        }
    }
    for k in want.keys() {
        assert!(seen.iter().any(|s| s == k), "{k}: fixture missing");
    }
}

/// A director over `scheduler` and the given `(address, role)` endpoints, all healthy.
fn director_over(
    scheduler: epp_core::scheduler::Scheduler,
    eps: &[(&str, &str)],
) -> epp_core::director::Director {
    use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
    let ds = DatastoreWriter::new(HealthConfig::default());
    let director = epp_core::director::Director::build(&ds, scheduler);
    ds.set_endpoints(
        eps.iter()
            .map(|(a, role)| {
                let mut e = EndpointSpec::new(*a);
                e.labels.insert("llm-d.ai/role".into(), role.to_string());
                e
            })
            .collect(),
    );
    for (a, _) in eps {
        ds.record_scrape(a, Ok(ModelServerMetrics::default()));
    }
    ds.mark_synced();
    // The datastore writer lives as long as the director's readers need it.
    std::mem::forget(ds);
    director
}

fn route_chat(
    rt: &tokio::runtime::Runtime,
    director: &epp_core::director::Director,
    prompt: &str,
) -> epp_core::director::Routed {
    use epp_core::director::RouteRequest;
    use epp_core::gateway::{GatewayPolicy, InboundHeaders};
    use epp_core::request::ApiMethod;
    let none: Vec<(String, Vec<u8>)> = Vec::new();
    let headers = InboundHeaders::read(none.as_slice(), GatewayPolicy::default());
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": prompt}]
    }))
    .unwrap();
    rt.block_on(director.route(RouteRequest {
        method: Some(ApiMethod::ChatCompletions),
        body: &body,
        subset: None,
        headers: &headers,
    }))
    .unwrap()
}

/// The value of the sample `name{labels}` in an exposition (0 when absent).
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_pd_samples_disaggregate_long_uncached_prompts_and_decode_the_rest_alone() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for file in ["pd-epp-config.yaml", "sim-pd-epp-config.yaml"] {
        let scheduler = load(&fixtures().join(file)).unwrap();
        let director = director_over(
            scheduler,
            &[
                ("10.0.0.1:8000", "decode"),
                ("10.0.0.2:8000", "prefill"),
                ("10.0.0.3:8000", "decode"),
            ],
        );
        // 256 tokens (the estimate: 4 bytes each), none cached: over nonCachedTokens 16. Once
        // cached, what is left past the last full block (64 tokens with pd-epp-config's
        // auto-tuned block size, 16 with sim-pd's) is the chat template's few bytes: under 16.
        let long = "abcd".repeat(256);
        let r = route_chat(&rt, &director, &long);
        let decode = r.targets[0].address().to_string();
        assert!(
            decode == "10.0.0.1:8000" || decode == "10.0.0.3:8000",
            "{file}: {decode}"
        );
        let prefill = r.prefill.clone().expect("a prefill pick");
        assert_eq!(prefill.address(), "10.0.0.2:8000", "{file}");
        assert_eq!(
            r.upstream_headers(),
            vec![("x-prefiller-host-port", "10.0.0.2:8000".to_string())],
            "{file}"
        );
        // The prefill pod is busy until the decode's first byte.
        assert_eq!(prefill.inflight(), 1, "{file}");
        let mut tracker = r.tracker;
        tracker.first_byte();
        assert_eq!(prefill.inflight(), 0, "{file}");
        tracker.finish(200);
        // The same prompt again: the decode pod now holds it, so it decodes alone.
        let again = route_chat(&rt, &director, &long);
        assert_eq!(again.targets[0].address(), decode, "{file}");
        assert!(
            again.prefill.is_none(),
            "{file}: a cached prompt was disaggregated"
        );
        assert!(again.upstream_headers().is_empty());
        again.tracker.finish(200);
        // A short prompt never is.
        let short = route_chat(&rt, &director, "hi");
        assert!(short.prefill.is_none(), "{file}");
        short.tracker.finish(200);
        let text = director.metrics().encode();
        let labels = |d: &str| {
            format!("llm_d_epp_disagg_decision_total{{plugin_name=\"disagg-profile-handler\",plugin_type=\"disagg-profile-handler\",model_name=\"m\",decision_type=\"{d}\"}}")
        };
        assert_eq!(
            sample(&text, &labels("prefill-decode")),
            1.0,
            "{file}\n{text}"
        );
        assert_eq!(sample(&text, &labels("decode-only")), 2.0, "{file}");
        assert_eq!(
            sample(
                &text,
                "llm_d_inference_scheduler_disagg_decision_total{model_name=\"m\",decision_type=\"decode-only\"}"
            ),
            2.0,
            "{file}"
        );
    }
}

#[test]
fn the_dp_sample_sends_the_rank_in_a_header_and_the_request_to_the_primary_port() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let scheduler = load(&fixtures().join("dp-epp-config.yaml")).unwrap();
    let director = director_over(
        scheduler,
        &[("10.0.0.1:8001", "decode"), ("10.0.0.1:8002", "decode")],
    );
    let r = route_chat(&rt, &director, "hello there");
    let rank = r.targets[0].address().to_string();
    assert!(rank.starts_with("10.0.0.1:800"), "{rank}");
    assert_eq!(r.destination(0), "10.0.0.1:8000");
    assert_eq!(
        r.upstream_headers(),
        vec![("x-data-parallel-host-port", rank)]
    );
    r.tracker.finish(200);
}

/// A blocking HTTP/1.1 exchange on 127.0.0.1 (`Connection: close`): the status line, the
/// headers and the body as one string.
fn http_exchange(port: u16, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of `series` (`name{labels}`) on a metrics page, 0 when absent.
fn series_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

#[test]
fn the_central_socket_sample_follows_simulators_that_connect_to_it_and_routes_to_the_holder() {
    const MODEL: &str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0";
    let central = free_port();
    // Two consecutive free ports for the two simulators.
    let base = (0..50)
        .map(|_| free_port())
        .find(|p| *p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok())
        .expect("two consecutive free ports");
    let (proxy, metrics) = (free_port(), free_port());
    // llm-d's sample, pointed at loopback: its central socket, its token-producer's render
    // backend (the first simulator renders as vLLM does).
    let text = std::fs::read_to_string(fixtures().join("sim-epp-kvcache-config.yaml"))
        .unwrap()
        .replace("tcp://0.0.0.0:5557", &format!("tcp://127.0.0.1:{central}"))
        .replace("http://localhost:8000", &format!("http://127.0.0.1:{base}"));
    assert!(text.contains(&format!("zmqEndpoint: tcp://127.0.0.1:{central}")));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, text).unwrap();
    let epp = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_epp"));
        c.env_remove("RUST_LOG");
        c
    };
    let _sims = Kill(
        epp()
            .args(["sim", "--count", "2", "--host", "127.0.0.1"])
            .args(["--base-port", &base.to_string(), "--model", MODEL])
            .args(["--zmq-endpoint", &format!("tcp://127.0.0.1:{central}")])
            .args(["--prefill-overhead-ms", "0", "--prefill-per-token-ms", "0"])
            .args(["--inter-token-ms", "0", "--default-max-tokens", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port("127.0.0.1", base);
    wait_port("127.0.0.1", base + 1);
    let _picker = Kill(
        epp()
            .args(["proxy", "--listen", &format!("127.0.0.1:{proxy}")])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
            .args(["--metrics-auth", "none"])
            .args(["--health-probe-bind-address", "127.0.0.1:0"])
            .args(["--endpoint", &format!("127.0.0.1:{base}")])
            .args(["--endpoint", &format!("127.0.0.1:{}", base + 1)])
            .arg("--config-file")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port("127.0.0.1", proxy);
    wait_port("127.0.0.1", metrics);
    let page = || http_exchange(metrics, "GET", "/metrics", "");
    let content = "tell me about the central socket ".repeat(20);
    let chat = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":1}}"#
    );
    // Traffic straight to the second simulator, past the picker: only its KV events, through
    // the central socket, can say where the prompt is cached. Sent until the picker has
    // applied one of its messages (the simulators connect once the socket is bound).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_exchange(base + 1, "POST", "/v1/chat/completions", &chat);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        std::thread::sleep(Duration::from_millis(200));
        let p = page();
        if series_value(&p, "epp_precise_prefix_central_topics") == 1.0
            && series_value(
                &p,
                "epp_precise_prefix_endpoints_in_fallback{reason=\"not_connected\"}",
            ) == 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no central message applied:\n{p}"
        );
    }
    // Every request routed through the picker lands on that simulator.
    let mut pods = BTreeMap::<String, usize>::new();
    for _ in 0..6 {
        let r = http_exchange(proxy, "POST", "/v1/chat/completions", &chat);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let pod = r
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-inference-pod: ")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no x-inference-pod in {r}"));
        *pods.entry(pod).or_default() += 1;
    }
    assert_eq!(pods, BTreeMap::from([("sim-1".to_string(), 6)]));
    let p = page();
    assert_eq!(
        series_value(&p, "llm_d_epp_kv_cache_events_active_subscribers"),
        3.0,
        "{p}"
    );
    assert_eq!(
        series_value(
            &p,
            "epp_precise_prefix_central_refused_total{reason=\"unknown_pod\"}"
        ),
        0.0
    );
}
