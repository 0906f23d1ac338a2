//! The ext_proc front-end driven in-process: a real tonic server on a loopback port and a
//! tonic client sending the message sequences Envoy sends (FULL_DUPLEX_STREAMED bodies), with
//! exact checks of headers, metadata, body pieces, immediate responses, in-flight counts and
//! metric counters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, CommonResponse, HttpBody, HttpHeaders,
    HttpTrailers, ImmediateResponse, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use epp_core::config::{presets, EndpointPickerConfig};
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::director::Director;
use epp_core::extproc::{self, ExtProcConfig, ExtProcService, BODY_PIECE_BYTES};
use epp_core::metrics::Metrics;
use epp_core::scheduler::Scheduler;
use epp_core::telemetry::Shutdown;
use epp_core::tls::{TlsPort, TlsSettings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

mod common;
mod tls_support;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    director: Director,
    metrics: Arc<Metrics>,
    addr: std::net::SocketAddr,
    shutdown: Shutdown,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Pods as (address, waiting queue, kv usage).
async fn harness(pods: &[(&str, f64, f64)], test_hooks: bool) -> Harness {
    let cfg = ExtProcConfig {
        test_hooks,
        ..Default::default()
    };
    harness_with(
        pods,
        cfg,
        epp_core::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
    )
    .await
}

/// As [`harness`], with the front-end settings and the shared body budget given.
async fn harness_with(pods: &[(&str, f64, f64)], cfg: ExtProcConfig, budget: usize) -> Harness {
    harness_config(pods, cfg, budget, presets::DEFAULT).await
}

/// As [`harness_with`], scheduling with the `EndpointPickerConfig` in `yaml`.
async fn harness_config(
    pods: &[(&str, f64, f64)],
    cfg: ExtProcConfig,
    budget: usize,
    yaml: &str,
) -> Harness {
    let epc = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let scheduler = Scheduler::from_config(&epc).unwrap();
    let datastore = DatastoreWriter::new(HealthConfig::default());
    let mut director = Director::build_with_budget(&datastore, scheduler, budget);
    if epc.flow_control_enabled() {
        let fc = epp_core::admission::FlowController::new(
            epp_core::admission::FlowSettings::from_config(&epc).unwrap(),
            datastore.reader(),
            director.metrics().flow_control().clone(),
        );
        director = director.with_admission(fc);
    }
    let metrics = director.metrics().clone();
    // `10.0.0.9:*` pods are prefill pods; the rest decode (role labels as llm-d's).
    datastore.set_endpoints(
        pods.iter()
            .map(|p| {
                let mut e = EndpointSpec::new(p.0);
                let role = if p.0.starts_with("10.0.0.9:") {
                    "prefill"
                } else {
                    "decode"
                };
                e.labels.insert("llm-d.ai/role".into(), role.into());
                e
            })
            .collect(),
    );
    for (addr, q, kv) in pods {
        datastore.record_scrape(
            addr,
            Ok(ModelServerMetrics {
                waiting_queue: *q,
                kv_cache_usage: *kv,
                ..Default::default()
            }),
        );
    }
    datastore.mark_synced();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let svc = ExtProcService::new(director.clone(), cfg);
    tokio::spawn(extproc::serve(svc, listener, shutdown.wait()));
    Harness {
        director,
        metrics,
        addr,
        shutdown,
    }
}

/// Three pods; 10.0.0.2 is clearly the best (empty queue, lowest KV use).
const PODS: [(&str, f64, f64); 3] = [
    ("10.0.0.1:8000", 3.0, 0.2),
    ("10.0.0.2:8000", 0.0, 0.1),
    ("10.0.0.3:8000", 10.0, 0.2),
];

struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(h: &Harness) -> Stream {
        let client = ExternalProcessorClient::connect(format!("http://{}", h.addr))
            .await
            .unwrap();
        Stream::over(client).await
    }

    /// A new stream on an existing client (e.g. one connected over TLS).
    async fn over(client: ExternalProcessorClient<tonic::transport::Channel>) -> Stream {
        let mut client = client.max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(64);
        let rx = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, r: processing_request::Request, md: Option<Metadata>) {
        self.tx
            .send(ProcessingRequest {
                request: Some(r),
                metadata_context: md,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> ProcessingResponse {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("timed out waiting for a response")
            .expect("stream error")
            .expect("stream ended")
    }

    async fn recv_result(&mut self) -> Result<Option<ProcessingResponse>, tonic::Status> {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("timed out")
    }

    /// Nothing was sent back (the server is still waiting for more input).
    async fn assert_quiet(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(150), self.rx.message()).await;
        assert!(r.is_err(), "unexpected response: {r:?}");
    }
}

fn hmap(pairs: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    })
}

fn req_headers(pairs: &[(&str, &str)], eos: bool) -> processing_request::Request {
    processing_request::Request::RequestHeaders(HttpHeaders {
        headers: hmap(pairs),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn req_body(b: &[u8], eos: bool) -> processing_request::Request {
    processing_request::Request::RequestBody(HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn resp_headers(pairs: &[(&str, &str)], eos: bool) -> processing_request::Request {
    processing_request::Request::ResponseHeaders(HttpHeaders {
        headers: hmap(pairs),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn resp_body(b: &[u8], eos: bool) -> processing_request::Request {
    processing_request::Request::ResponseBody(HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn common(r: &ProcessingResponse) -> &CommonResponse {
    use processing_response::Response as P;
    match r.response.as_ref().unwrap() {
        P::RequestHeaders(h) | P::ResponseHeaders(h) => h.response.as_ref().unwrap(),
        P::RequestBody(b) | P::ResponseBody(b) => b.response.as_ref().unwrap(),
        other => panic!("not a common response: {other:?}"),
    }
}

fn is_request_headers(r: &ProcessingResponse) -> bool {
    matches!(
        r.response,
        Some(processing_response::Response::RequestHeaders(_))
    )
}

fn set_headers(r: &ProcessingResponse) -> BTreeMap<String, String> {
    common(r)
        .header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .map(|o| {
                    let h = o.header.as_ref().unwrap();
                    assert!(h.value.is_empty(), "values go in raw_value");
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `envoy.lb` / `x-gateway-destination-endpoint`, and that nothing else is in the metadata.
fn destination_md(r: &ProcessingResponse) -> String {
    let md = r.dynamic_metadata.as_ref().expect("dynamic metadata");
    assert_eq!(md.fields.len(), 1);
    let Some(Kind::StructValue(lb)) = &md.fields["envoy.lb"].kind else {
        panic!("envoy.lb is not a struct")
    };
    assert_eq!(lb.fields.len(), 1);
    match &lb.fields["x-gateway-destination-endpoint"].kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// (body piece, end_of_stream) of a request/response body answer.
fn piece(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    match &common(r).body_mutation.as_ref().unwrap().mutation {
        Some(body_mutation::Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("not a streamed response: {other:?}"),
    }
}

fn immediate(r: &ProcessingResponse) -> &ImmediateResponse {
    match r.response.as_ref().unwrap() {
        processing_response::Response::ImmediateResponse(i) => i,
        other => panic!("not an immediate response: {other:?}"),
    }
}

fn counter(h: &Harness, line_prefix: &str) -> f64 {
    h.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn inflight(h: &Harness, addr: &str) -> usize {
    h.director.endpoint_by_address(addr).unwrap().inflight()
}

fn j(model: &str, prompt: &str) -> String {
    format!(r#"{{"max_tokens":100,"model":"{model}","prompt":"{prompt}","temperature":0}}"#)
}

#[tokio::test]
async fn split_body_is_buffered_routed_rewritten_and_the_response_settles_the_request() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(
        req_headers(
            &[
                (":path", "/v1/completions"),
                ("hi", "mom"),
                ("x-gateway-inference-objective", "sql-lora-sheddable"),
                ("x-gateway-model-name-rewrite", "sql-lora-1fdg3"),
                ("x-request-id", "test-request-id"),
                ("content-length", "80"),
            ],
            false,
        ),
        None,
    )
    .await;
    let body = j("sql-lora-sheddable", "test6");
    assert_eq!(body.len(), 80);
    s.send(req_body(&body.as_bytes()[..33], false), None).await;
    // Nothing is answered before end_of_stream.
    s.assert_quiet().await;
    s.send(req_body(&body.as_bytes()[33..], true), None).await;

    let hr = s.recv().await;
    assert!(is_request_headers(&hr));
    assert!(common(&hr).clear_route_cache);
    let expected_body = j("sql-lora-1fdg3", "test6");
    assert_eq!(expected_body.len(), 76);
    assert_eq!(
        set_headers(&hr),
        BTreeMap::from([
            (
                "x-gateway-destination-endpoint".into(),
                "10.0.0.2:8000".into()
            ),
            ("Content-Length".into(), "76".into()),
            (":path".into(), "/v1/completions".into()),
            ("hi".into(), "mom".into()),
            ("x-request-id".into(), "test-request-id".into()),
        ])
    );
    assert_eq!(destination_md(&hr), "10.0.0.2:8000");
    let b = s.recv().await;
    assert_eq!(piece(&b), (expected_body.into_bytes(), true));
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 1);

    // Response: JSON is buffered to end_of_stream, the target model is swapped back.
    s.send(
        resp_headers(
            &[
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", "60"),
            ],
            false,
        ),
        None,
    )
    .await;
    let rh = s.recv().await;
    assert_eq!(
        set_headers(&rh),
        BTreeMap::from([
            ("x-went-into-resp-headers".into(), "true".into()),
            ("content-type".into(), "application/json".into()),
        ])
    );
    assert!(!common(&rh).clear_route_cache);
    assert!(rh.dynamic_metadata.is_none());
    s.send(resp_body(br#"{"id":"c1","model":"sql-lo"#, false), None)
        .await;
    s.assert_quiet().await;
    s.send(resp_body(br#"ra-1fdg3","choices":[]}"#, false), None)
        .await;
    s.send(resp_body(b"", true), None).await;
    let rb = s.recv().await;
    assert_eq!(
        piece(&rb),
        (
            br#"{"id":"c1","model":"sql-lora-sheddable","choices":[]}"#.to_vec(),
            true
        )
    );
    // The server ends the stream once the response is complete.
    assert!(s.recv_result().await.unwrap().is_none());
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 0);
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="completions",status="200"} "#
        ),
        1.0
    );
}

#[tokio::test]
async fn header_only_get_is_scheduled_from_headers() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(
        req_headers(
            &[(":path", "/v1/models"), (":method", "GET"), ("hi", "mom")],
            true,
        ),
        None,
    )
    .await;
    let hr = s.recv().await;
    assert!(is_request_headers(&hr));
    assert!(common(&hr).clear_route_cache);
    let set = set_headers(&hr);
    assert_eq!(set.len(), 2, "{set:?}");
    assert_eq!(set["x-gateway-destination-endpoint"], "10.0.0.2:8000");
    let id = &set["x-request-id"];
    assert_eq!(id.len(), 36, "generated UUID: {id}");
    assert!(!set.contains_key("Content-Length"));
    assert_eq!(destination_md(&hr), "10.0.0.2:8000");
    s.send(resp_headers(&[(":status", "404")], true), None)
        .await;
    let rh = s.recv().await;
    assert_eq!(set_headers(&rh)["x-went-into-resp-headers"], "true");
    assert!(s.recv_result().await.unwrap().is_none());
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 0);
    assert_eq!(
        counter(&h, r#"epp_requests_total{method="models",status="404"} "#),
        1.0
    );
}

async fn route_with_subset(h: &Harness, hint: &[&str]) -> ProcessingResponse {
    let mut s = Stream::open(h).await;
    let md = extproc::subset_metadata(hint);
    s.send(
        req_headers(
            &[(":path", "/v1/completions"), ("x-request-id", "r")],
            false,
        ),
        Some(md.clone()),
    )
    .await;
    s.send(req_body(j("m", "test2").as_bytes(), true), Some(md))
        .await;
    s.recv().await
}

#[tokio::test]
async fn subset_hint_restricts_the_pick_and_an_empty_or_unmatched_hint_is_503() {
    let h = harness(&PODS, false).await;
    // Best of the subset.
    let r = route_with_subset(&h, &["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]).await;
    assert_eq!(destination_md(&r), "10.0.0.2:8000");
    // Only the worst pod is allowed: it wins.
    let r = route_with_subset(&h, &["10.0.0.3:8000"]).await;
    assert_eq!(destination_md(&r), "10.0.0.3:8000");
    assert_eq!(
        set_headers(&r)["x-gateway-destination-endpoint"],
        "10.0.0.3:8000"
    );
    // No match, and an empty hint: 503 with a JSON error body.
    for hint in [&["10.0.0.99:8000"][..], &[][..]] {
        let r = route_with_subset(&h, hint).await;
        let im = immediate(&r);
        assert_eq!(im.status.unwrap().code, 503);
        let v: serde_json::Value = serde_json::from_slice(&im.body).unwrap();
        assert_eq!(v["error"]["code"], "no_endpoint_available");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="completions",status="503"} "#
        ),
        2.0
    );
}

#[tokio::test]
async fn no_endpoints_is_503_and_the_stream_ends() {
    let h = harness(&[], false).await;
    let mut s = Stream::open(&h).await;
    s.send(
        req_headers(
            &[
                (":path", "/v1/completions"),
                ("content-type", "application/json"),
            ],
            true,
        ),
        None,
    )
    .await;
    let r = s.recv().await;
    let im = immediate(&r);
    assert_eq!(im.status.unwrap().code, 503);
    let ct = im.headers.as_ref().unwrap().set_headers[0]
        .header
        .as_ref()
        .unwrap();
    assert_eq!(
        (ct.key.as_str(), ct.raw_value.as_slice()),
        ("content-type", &b"application/json"[..])
    );
    // llm-d-router's reason header for a request no model server saw.
    let why = im.headers.as_ref().unwrap().set_headers[1]
        .header
        .as_ref()
        .unwrap();
    assert_eq!(
        (why.key.as_str(), why.raw_value.as_slice()),
        (
            "x-llm-d-request-dropped-reason",
            &b"rejected-no-endpoints"[..]
        )
    );
    let v: serde_json::Value = serde_json::from_slice(&im.body).unwrap();
    assert_eq!(v["error"]["type"], "service_unavailable");
    assert!(
        s.recv_result().await.unwrap().is_none(),
        "stream ends after an immediate response"
    );
}

#[tokio::test]
async fn missing_model_and_malformed_json_are_400() {
    let h = harness(&PODS, false).await;
    for (body, param) in [
        (&br#"{"prompt":"hello world"}"#[..], Some("model")),
        (&b"no healthy upstream"[..], None),
    ] {
        let mut s = Stream::open(&h).await;
        s.send(
            req_headers(&[(":path", "/v1/completions"), ("hi", "mom")], false),
            None,
        )
        .await;
        s.send(req_body(body, true), None).await;
        let r = s.recv().await;
        let im = immediate(&r);
        assert_eq!(im.status.unwrap().code, 400);
        let v: serde_json::Value = serde_json::from_slice(&im.body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["param"].as_str(), param);
        assert!(s.recv_result().await.unwrap().is_none());
    }
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="completions",status="400"} "#
        ),
        2.0
    );
    assert!(PODS.iter().all(|p| inflight(&h, p.0) == 0));
}

#[tokio::test]
async fn one_mib_body_arrives_byte_identical_in_bounded_pieces() {
    let h = harness(&PODS, false).await;
    let prompt: String = (0..(1 << 20) / 8)
        .map(|i| format!("w{:06} ", i % 999_999))
        .collect();
    let body = format!(r#"{{"model":"m", "prompt":"{prompt}", "stream":false}}"#);
    assert!(body.len() >= 1 << 20);
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(16 * 1024 + 7).collect();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        s.send(req_body(c, i + 1 == n), None).await;
    }
    let hr = s.recv().await;
    assert_eq!(set_headers(&hr)["Content-Length"], body.len().to_string());
    let pieces = extproc::piece_count(body.len());
    assert_eq!(pieces, body.len().div_ceil(62_000));
    let mut got = Vec::with_capacity(body.len());
    for i in 0..pieces {
        let (b, eos) = piece(&s.recv().await);
        assert!(b.len() <= BODY_PIECE_BYTES);
        assert_eq!(eos, i + 1 == pieces, "end_of_stream only on the last piece");
        got.extend_from_slice(&b);
    }
    assert!(got == body.as_bytes(), "body must be byte-identical");
    s.assert_quiet().await;
}

#[tokio::test]
async fn sse_chunks_are_echoed_at_once_byte_for_byte() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(
        req_headers(&[(":path", "/v1/chat/completions")], false),
        None,
    )
    .await;
    s.send(
        req_body(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            true,
        ),
        None,
    )
    .await;
    let _ = s.recv().await;
    let _ = s.recv().await;
    s.send(
        resp_headers(
            &[
                (":status", "200"),
                ("content-type", "text/event-stream; charset=utf-8"),
            ],
            false,
        ),
        None,
    )
    .await;
    let rh = s.recv().await;
    assert_eq!(
        set_headers(&rh)["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let chunks: [(&[u8], bool); 3] = [
        (b"data: {}\n\n", false),
        (
            b"data: {\"usage\":{\"prompt_tokens\":7,\"total_tokens\":17,\"completion_tokens\":10}}\n\ndata: [DONE]\n\n",
            false,
        ),
        (b"", true),
    ];
    for (c, eos) in chunks {
        s.send(resp_body(c, eos), None).await;
        // Each chunk comes back before the next one is sent: never delayed.
        assert_eq!(piece(&s.recv().await), (c.to_vec(), eos));
    }
    assert!(s.recv_result().await.unwrap().is_none());
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 0);
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="chat_completions",status="200"} "#
        ),
        1.0
    );
}

#[tokio::test]
async fn client_abort_releases_the_in_flight_count_as_499() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    let _ = s.recv().await;
    let _ = s.recv().await;
    s.send(resp_headers(&[(":status", "200")], false), None)
        .await;
    let _ = s.recv().await;
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 1);
    // The gateway goes away mid-response (downstream client aborted).
    drop(s);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while inflight(&h, "10.0.0.2:8000") != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="completions",status="499"} "#
        ),
        1.0
    );
    assert_eq!(
        counter(
            &h,
            r#"epp_requests_total{method="completions",status="200"} "#
        ),
        0.0
    );
}

#[tokio::test]
async fn protocol_violations_end_only_that_stream() {
    let h = harness(&PODS, false).await;
    // Body before headers.
    let mut s = Stream::open(&h).await;
    s.send(req_body(b"{}", true), None).await;
    let e = s.recv_result().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("request_body before request_headers"),
        "{e}"
    );

    // A second end_of_stream on the request body.
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    let _ = s.recv().await;
    let _ = s.recv().await;
    assert_eq!(inflight(&h, "10.0.0.2:8000"), 1);
    s.send(req_body(b"again", true), None).await;
    let e = s.recv_result().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("after the request's end_of_stream"),
        "{e}"
    );
    assert_eq!(
        inflight(&h, "10.0.0.2:8000"),
        0,
        "the violating stream released its pick"
    );

    // Headers twice; response body before response headers; trailers first.
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[], false), None).await;
    s.send(req_headers(&[], false), None).await;
    assert_eq!(
        s.recv_result().await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let mut s = Stream::open(&h).await;
    s.send(resp_body(b"x", true), None).await;
    assert_eq!(
        s.recv_result().await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let mut s = Stream::open(&h).await;
    s.send(
        processing_request::Request::RequestTrailers(HttpTrailers::default()),
        None,
    )
    .await;
    assert_eq!(
        s.recv_result().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // A message with no oneof set (e.g. a zero-length message), and response headers before
    // any request: INVALID_ARGUMENT naming the fault, not a silent OK.
    let mut s = Stream::open(&h).await;
    s.tx.send(ProcessingRequest::default()).await.unwrap();
    let e = s.recv_result().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("no request or response part"), "{e}");
    let mut s = Stream::open(&h).await;
    s.send(resp_headers(&[(":status", "200")], false), None)
        .await;
    let e = s.recv_result().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("response_headers before request_headers"),
        "{e}"
    );
    // Bytes that are not a ProcessingRequest at all.
    let (code, message) = raw_grpc_call(h.addr, &[0xff, 0xff, 0xff, 0x01, 0x02]).await;
    assert_eq!(code, "3", "INVALID_ARGUMENT; message: {message}");
    assert!(message.contains("undecodable"), "{message}");

    // The server keeps serving other streams.
    let r = route_with_subset(&h, &["10.0.0.1:8000"]).await;
    assert_eq!(destination_md(&r), "10.0.0.1:8000");
}

#[tokio::test]
async fn request_trailers_end_the_body() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    let body = j("m", "p");
    s.send(req_body(body.as_bytes(), false), None).await;
    s.send(
        processing_request::Request::RequestTrailers(HttpTrailers::default()),
        None,
    )
    .await;
    let hr = s.recv().await;
    assert_eq!(destination_md(&hr), "10.0.0.2:8000");
    assert_eq!(piece(&s.recv().await), (body.into_bytes(), false));
    assert!(matches!(
        s.recv().await.response,
        Some(processing_response::Response::RequestTrailers(_))
    ));
}

#[tokio::test]
async fn test_hooks_force_the_pick_and_report_served_and_selected() {
    let h = harness(&PODS, true).await;
    let mut s = Stream::open(&h).await;
    s.send(
        req_headers(
            &[
                (":path", "/v1/completions"),
                ("test-epp-endpoint-selection", "10.0.0.3"),
            ],
            false,
        ),
        None,
    )
    .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    let hr = s.recv().await;
    assert_eq!(destination_md(&hr), "10.0.0.3:8000");
    let _ = s.recv().await;
    assert_eq!(inflight(&h, "10.0.0.3:8000"), 1);
    // The gateway reports that 10.0.0.1 served it: the in-flight count moves there.
    let mut served = Metadata::default();
    served.filter_metadata.insert(
        "envoy.lb".into(),
        envoy_types::pb::google::protobuf::Struct {
            fields: [(
                "x-gateway-destination-endpoint-served".to_string(),
                envoy_types::pb::google::protobuf::Value {
                    kind: Some(Kind::StringValue("10.0.0.1:8000".into())),
                },
            )]
            .into(),
        },
    );
    s.send(resp_headers(&[(":status", "200")], false), Some(served))
        .await;
    let rh = s.recv().await;
    let set = set_headers(&rh);
    assert_eq!(set["x-conformance-test-served-endpoint"], "10.0.0.1:8000");
    assert_eq!(set["x-conformance-test-selected-endpoint"], "10.0.0.3:8000");
    assert_eq!(inflight(&h, "10.0.0.3:8000"), 0);
    assert_eq!(inflight(&h, "10.0.0.1:8000"), 1);
    s.send(resp_body(b"{}", true), None).await;
    let _ = s.recv().await;
    assert_eq!(inflight(&h, "10.0.0.1:8000"), 0);

    // Without the hooks the selection header is ignored.
    let h2 = harness(&PODS, false).await;
    let mut s = Stream::open(&h2).await;
    s.send(
        req_headers(
            &[
                (":path", "/v1/completions"),
                ("test-epp-endpoint-selection", "10.0.0.3"),
            ],
            false,
        ),
        None,
    )
    .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    assert_eq!(destination_md(&s.recv().await), "10.0.0.2:8000");
}

/// One request through the exchange whose response the gateway reports with `status`.
async fn request_answered_with(h: &Harness, status: &str) -> String {
    let mut s = Stream::open(h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    let picked = destination_md(&s.recv().await);
    let _ = s.recv().await;
    s.send(resp_headers(&[(":status", status)], true), None)
        .await;
    let _ = s.recv().await;
    picked
}

fn health_of(h: &Harness, addr: &str) -> &'static str {
    h.director
        .datastore()
        .snapshot()
        .endpoints
        .iter()
        .find(|e| e.endpoint.address() == addr)
        .map(|e| e.health.as_str())
        .unwrap()
}

#[tokio::test]
async fn upstream_5xx_counts_against_the_endpoint_as_in_proxy_mode() {
    let h = harness(&PODS, false).await;
    // 4xx and 2xx are the client's business: health is untouched.
    for status in ["200", "404", "429"] {
        assert_eq!(request_answered_with(&h, status).await, "10.0.0.2:8000");
    }
    assert_eq!(health_of(&h, "10.0.0.2:8000"), "healthy");
    // Three 5xx in a row (the failure threshold) take it out of rotation.
    for _ in 0..3 {
        assert_eq!(request_answered_with(&h, "503").await, "10.0.0.2:8000");
    }
    assert_eq!(health_of(&h, "10.0.0.2:8000"), "unhealthy");
    assert_eq!(health_of(&h, "10.0.0.1:8000"), "healthy");
    // The next pick avoids it.
    assert_ne!(request_answered_with(&h, "200").await, "10.0.0.2:8000");
}

#[tokio::test]
async fn usage_of_plain_and_streamed_responses_is_counted_per_backend() {
    let h = harness(&PODS, false).await;
    for (ct, chunks) in [
        (
            "application/json",
            vec![&br#"{"id":"a","usage":{"prompt_tokens":40,"#[..], &br#""completion_tokens":3,"prompt_tokens_details":{"cached_tokens":32}}}"#[..]],
        ),
        (
            "text/event-stream",
            vec![
                &b"data: {\"choices\":[],\"usage\":null}\n\n"[..],
                &b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"[..],
            ],
        ),
    ] {
        let mut s = Stream::open(&h).await;
        s.send(req_headers(&[(":path", "/v1/completions")], false), None)
            .await;
        s.send(req_body(j("m", "p").as_bytes(), true), None).await;
        assert_eq!(destination_md(&s.recv().await), "10.0.0.2:8000");
        let _ = s.recv().await;
        s.send(resp_headers(&[(":status", "200"), ("content-type", ct)], false), None)
            .await;
        let _ = s.recv().await;
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            s.send(resp_body(c, i + 1 == n), None).await;
            if ct == "text/event-stream" || i + 1 == n {
                let _ = s.recv().await;
            }
        }
    }
    let b = r#"{backend="10.0.0.2:8000"}"#;
    assert_eq!(
        counter(&h, &format!("epp_backend_prompt_tokens_total{b}")),
        50.0
    );
    assert_eq!(
        counter(&h, &format!("epp_backend_completion_tokens_total{b}")),
        5.0
    );
    assert_eq!(
        counter(&h, &format!("epp_backend_cached_tokens_total{b}")),
        32.0
    );
}

#[tokio::test]
async fn a_request_without_an_id_gets_a_uuid_v4() {
    let h = harness(&PODS, false).await;
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    s.send(req_body(j("m", "p").as_bytes(), true), None).await;
    let set = set_headers(&s.recv().await);
    let id = &set["x-request-id"];
    assert!(epp_core::gateway::request_id::is_uuid_v4(id), "{id}");
}

#[tokio::test]
async fn buffered_bodies_share_one_budget_and_stalled_or_excess_streams_end() {
    let cfg = ExtProcConfig {
        max_streams: 3,
        stream_idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let h = harness_with(&PODS, cfg, 100_000).await;
    // Two streams buffer 60 kB each: the second one is over the shared 100 kB budget.
    let mut a = Stream::open(&h).await;
    a.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    a.send(req_body(&[b' '; 60_000], false), None).await;
    a.assert_quiet().await;
    let mut b = Stream::open(&h).await;
    b.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    b.send(req_body(&[b' '; 60_000], false), None).await;
    let im = immediate(&b.recv().await).clone();
    assert_eq!(im.status.unwrap().code, 503);
    let v: serde_json::Value = serde_json::from_slice(&im.body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-buffered-body-bytes"),
        "{v}"
    );
    let text = h.metrics.encode();
    assert!(
        text.contains("epp_request_body_buffered_bytes 60000"),
        "{text}"
    );
    assert!(text.contains("epp_request_body_budget_rejections_total 1"));
    // Stream a stalls mid-body: ended after the idle timeout, and its bytes are released.
    let e = tokio::time::timeout(Duration::from_secs(5), a.recv_result())
        .await
        .expect("ended in time")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    assert!(e.message().contains("--stream-idle-timeout"), "{e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h
        .metrics
        .encode()
        .contains("epp_request_body_buffered_bytes 0"));
    // At most 3 concurrent streams: a fourth is refused with RESOURCE_EXHAUSTED.
    let _open: Vec<Stream> = futures_util::future::join_all((0..3).map(|_| Stream::open(&h))).await;
    let mut client = ExternalProcessorClient::connect(format!("http://{}", h.addr))
        .await
        .unwrap();
    let (_tx, rx) = mpsc::channel::<ProcessingRequest>(1);
    let e = client.process(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("--max-concurrent-streams"), "{e}");
}

#[tokio::test]
async fn grpc_health_follows_readiness() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let ds = DatastoreWriter::new(HealthConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(extproc::serve_health(
        ds.clone(),
        listener,
        shutdown.clone(),
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    async fn status(c: &mut HealthClient<tonic::transport::Channel>, s: &str) -> i32 {
        // The reporter starts asynchronously; wait (bounded) for the service to be registered.
        for _ in 0..200 {
            if let Ok(r) = c
                .check(HealthCheckRequest {
                    service: s.to_string(),
                })
                .await
            {
                return r.into_inner().status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("health service {s} never registered");
    }
    assert_eq!(
        status(&mut c, "liveness").await,
        ServingStatus::Serving as i32
    );
    assert_eq!(
        status(&mut c, "readiness").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        status(&mut c, extproc::SERVICE_NAME).await,
        ServingStatus::NotServing as i32
    );
    ds.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
    ds.mark_synced();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while status(&mut c, "readiness").await != ServingStatus::Serving as i32 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status(&mut c, extproc::SERVICE_NAME).await,
        ServingStatus::Serving as i32
    );
    shutdown.trigger();
}

/// An ext_proc client over TLS (ALPN h2, any certificate accepted) on a fresh connection; also
/// returns the leaf certificate that connection was served.
async fn tls_client(
    addr: std::net::SocketAddr,
) -> (ExternalProcessorClient<tonic::transport::Channel>, Vec<u8>) {
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = served.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
            let record = record.clone();
            async move {
                let (tls, leaf) = tls_support::connect(addr, &[b"h2"]).await?;
                *record.lock().unwrap() = leaf;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let leaf = served.lock().unwrap().clone();
    assert!(!leaf.is_empty());
    (ExternalProcessorClient::new(channel), leaf)
}

/// One whole ext_proc exchange (request headers and body, the pick, response headers and
/// body, the end of the stream) on `client`.
async fn tls_exchange(client: &ExternalProcessorClient<tonic::transport::Channel>) {
    let mut s = Stream::over(client.clone()).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    let body = j("m", "over tls");
    s.send(req_body(body.as_bytes(), true), None).await;
    let hr = s.recv().await;
    assert!(is_request_headers(&hr));
    assert_eq!(destination_md(&hr), "10.0.0.2:8000");
    assert_eq!(piece(&s.recv().await), (body.into_bytes(), true));
    s.send(
        resp_headers(
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        ),
        None,
    )
    .await;
    s.recv().await;
    s.send(resp_body(br#"{"ok":true}"#, true), None).await;
    assert_eq!(piece(&s.recv().await), (br#"{"ok":true}"#.to_vec(), true));
    assert!(s.recv_result().await.unwrap().is_none());
}

/// The leaf certificate a new TLS connection (ALPN h2) to `addr` is served.
async fn served_leaf(addr: std::net::SocketAddr) -> Vec<u8> {
    let (tls, leaf) = tls_support::connect(addr, &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    leaf
}

#[tokio::test]
async fn tls_serves_ext_proc_and_a_rotated_certificate_reaches_new_connections() {
    let h = harness(&PODS, false).await;
    let dir = tempfile::tempdir().unwrap();
    let a = tls_support::write_pair(dir.path(), "a.example");
    let setup = TlsSettings {
        cert_file: Some(dir.path().join("tls.crt")),
        key_file: Some(dir.path().join("tls.key")),
        reload_interval: Duration::from_millis(50),
    }
    .setup(TlsPort::GRPC)
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ExtProcService::new(h.director.clone(), ExtProcConfig::default());
    tokio::spawn(extproc::serve_tls(svc, listener, setup, h.shutdown.clone()));

    let (client_a, leaf) = tls_client(addr).await;
    assert_eq!(leaf, a);
    tls_exchange(&client_a).await;
    // gRPC is h2 only: a client offering only HTTP/1.1 is refused in the handshake.
    assert!(tls_support::connect(addr, &[b"http/1.1"]).await.is_err());
    // Plaintext h2c to the TLS port gets no answer.
    let plain = async {
        let mut c = ExternalProcessorClient::connect(format!("http://{addr}"))
            .await
            .ok()?;
        let (_tx, rx) = mpsc::channel::<ProcessingRequest>(1);
        c.process(ReceiverStream::new(rx)).await.ok()
    };
    assert!(tokio::time::timeout(TIMEOUT, plain)
        .await
        .unwrap()
        .is_none());

    // Rotate: within a bounded wait, new connections are served B.
    let b = tls_support::write_pair(dir.path(), "b.example");
    assert_ne!(a, b);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut rotated = false;
    for _ in 0..200 {
        let leaf = served_leaf(addr).await;
        if leaf == b {
            rotated = true;
            break;
        }
        assert_eq!(
            leaf, a,
            "only the old or the new certificate is ever served"
        );
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rotated, "the rotated certificate was not picked up");
    let (client_b, leaf) = tls_client(addr).await;
    assert_eq!(leaf, b);
    tls_exchange(&client_b).await;
    // The connection made before the rotation keeps working.
    tls_exchange(&client_a).await;

    // A broken rotation is refused: new connections still get B, and exchanges still work.
    std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
    std::fs::write(dir.path().join("tls.key"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(served_leaf(addr).await, b);
    }
    let (client_c, leaf) = tls_client(addr).await;
    assert_eq!(leaf, b);
    tls_exchange(&client_c).await;
}

#[tokio::test]
async fn tls_self_signed_serves_and_bad_files_are_refused_before_binding() {
    let h = harness(&PODS, false).await;
    let setup = TlsSettings::default().setup(TlsPort::GRPC).unwrap();
    assert!(!setup.from_files());
    let self_signed = setup.store.leaf_der();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ExtProcService::new(h.director.clone(), ExtProcConfig::default());
    tokio::spawn(extproc::serve_tls(svc, listener, setup, h.shutdown.clone()));
    let (client, leaf) = tls_client(addr).await;
    assert_eq!(leaf, self_signed);
    tls_exchange(&client).await;

    // `epp serve` start-up: a bad certificate is named (flag and file) before any port is
    // bound: the gRPC port given is taken, yet the error is about the certificate.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = |cert: &std::path::Path, key: &std::path::Path| extproc::ServeOptions {
        grpc_addr: taken.local_addr().unwrap(),
        grpc_health_addr: "127.0.0.1:0".parse().unwrap(),
        extproc: ExtProcConfig::default(),
        tls: Some(TlsSettings {
            cert_file: Some(cert.to_path_buf()),
            key_file: Some(key.to_path_buf()),
            ..Default::default()
        }),
        picker: epp_core::app::RuntimeOptions {
            discovery: std::sync::Arc::new(epp_core::discovery::StaticDiscovery {
                endpoints: vec!["127.0.0.1:9".into()],
                ..Default::default()
            }),
            metrics_addr: None,
            health_addr: None,
            ..Default::default()
        },
    };
    let err = extproc::spawn_with_shutdown(
        opts("/nonexistent/c.pem".as_ref(), "/nonexistent/k.pem".as_ref()),
        Shutdown::new(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.starts_with("--cert-path /nonexistent/c.pem: cannot read"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    tls_support::write_pair(dir.path(), "c.example");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&key, "not a key").unwrap();
    let err = extproc::spawn_with_shutdown(opts(&cert, &key), Shutdown::new())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!("--key-path {}: ", key.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_serve_exports_its_grpc_certificate_validity() {
    let opts = extproc::ServeOptions {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_health_addr: "127.0.0.1:0".parse().unwrap(),
        extproc: ExtProcConfig::default(),
        tls: Some(TlsSettings::default()),
        picker: epp_core::app::RuntimeOptions {
            discovery: std::sync::Arc::new(epp_core::discovery::StaticDiscovery {
                endpoints: vec!["127.0.0.1:9".into()],
                ..Default::default()
            }),
            metrics_addr: None,
            health_addr: None,
            grace_period: Duration::from_secs(1),
            ..Default::default()
        },
    };
    let handle = tokio::time::timeout(TIMEOUT, extproc::spawn_with_shutdown(opts, Shutdown::new()))
        .await
        .expect("spawn in time")
        .unwrap();
    let text = handle.director.metrics().encode();
    assert!(
        text.contains(r#"epp_tls_certificate_valid{port="grpc"} 1"#),
        "{text}"
    );
    tokio::time::timeout(TIMEOUT, handle.stop())
        .await
        .expect("stopped in time");
}

/// The picker's share of the Envoy benchmark: one whole exchange (request headers, body, the
/// pick, response headers, response body) over loopback gRPC, sequentially. Prints p50/p99.
/// `cargo test --release -p epp-core --test extproc_inprocess -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn exchange_round_trip_cost() {
    let h = harness(&PODS, false).await;
    let mut client = ExternalProcessorClient::connect(format!("http://{}", h.addr))
        .await
        .unwrap();
    let body = j("m", &"lorem ipsum ".repeat(40));
    let mut samples = Vec::new();
    for i in 0..3000 {
        let t = std::time::Instant::now();
        let (tx, rx) = mpsc::channel(8);
        let mut rx = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let send = |r| ProcessingRequest {
            request: Some(r),
            ..Default::default()
        };
        tx.send(send(req_headers(&[(":path", "/v1/completions")], false)))
            .await
            .unwrap();
        tx.send(send(req_body(body.as_bytes(), true)))
            .await
            .unwrap();
        rx.message().await.unwrap().unwrap();
        rx.message().await.unwrap().unwrap();
        tx.send(send(resp_headers(&[(":status", "200")], false)))
            .await
            .unwrap();
        rx.message().await.unwrap().unwrap();
        tx.send(send(resp_body(b"{\"ok\":true}", true)))
            .await
            .unwrap();
        rx.message().await.unwrap().unwrap();
        if i >= 300 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "whole ext_proc exchange over loopback gRPC: p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs ({} samples)",
        at(0.5),
        at(0.9),
        at(0.99),
        samples.len()
    );
    let m = h.metrics.encode();
    for l in m.lines().filter(|l| {
        l.starts_with("epp_request_duration_seconds_sum{method=\"completions\"")
            || l.starts_with("epp_request_duration_seconds_count{method=\"completions\"")
    }) {
        println!("{l}");
    }
}

/// One gRPC call to `Process` carrying `payload` as its only message, over a bare HTTP/2
/// client; returns the `grpc-status` and `grpc-message` the server ended with.
async fn raw_grpc_call(addr: std::net::SocketAddr, payload: &[u8]) -> (String, String) {
    use http_body_util::BodyExt;
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!(
        "http://{addr}/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
    .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let headers = resp.headers().clone();
    let collected = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |n: &str| {
        trailers
            .get(n)
            .or_else(|| headers.get(n))
            .map(|v| percent_decode(v.to_str().unwrap_or("")))
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The llm-d-router families' samples that identical traffic must give identically in both
/// front-ends: every sample of every `llm_d_epp_*` / `inference_*` family except the ones that
/// measure time (bucket placement and sums of `*_seconds`) or scraped pool state.
fn traffic_samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with("llm_d_epp_") || l.starts_with("inference_"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| {
            let name = k.split('{').next().unwrap_or(k);
            let timed =
                name.contains("_seconds") && (name.ends_with("_bucket") || name.ends_with("_sum"));
            let pool = name.contains("average_")
                || name.contains("std_dev_")
                || name.contains("queue_size")
                || name.contains("ready_")
                || name.contains("prefix_indexer_size")
                || name.ends_with("_info");
            !timed && !pool
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A server-sent event stream cut after each event's blank line.
fn sse_events(body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..body.len() {
        if body[i - 1] == b'\n' && body[i] == b'\n' {
            out.push(&body[start..=i]);
            start = i + 1;
        }
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    out
}

#[tokio::test]
async fn both_front_ends_report_the_same_llm_d_metrics_for_the_same_traffic() {
    let sims = common::sims(1, |_| {}).await;
    let sim = sims[0].addr().to_string();
    let proxy = common::proxy_over(vec![sim.clone()]).await;
    let http = common::client();
    let url = format!("http://{}/v1/completions", proxy.proxy_addr);
    let h = harness(&[(&sim, 0.0, 0.0)], false).await;
    let system = "You are a careful assistant. ".repeat(20);
    let bodies: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({
                "model": "sim-model",
                "prompt": format!("{system} question {i}"),
                "max_tokens": 3 + i,
            })
            .to_string()
        })
        .chain(std::iter::once(
            serde_json::json!({"model": "sim-model", "prompt": "hi", "stream": true, "max_tokens": 4})
                .to_string(),
        ))
        .collect();
    for (i, body) in bodies.iter().enumerate() {
        let tenant = format!("tenant-{}", i % 2);
        let r = common::request(
            &http,
            "POST",
            &url,
            &[
                ("content-type", "application/json"),
                ("x-llm-d-inference-fairness-id", &tenant),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let streamed = r
            .header("content-type")
            .is_some_and(|c| c.contains("text/event-stream"));
        let ct = if streamed {
            "text/event-stream"
        } else {
            "application/json"
        };
        // The same request through ext_proc, answered with the very bytes the server sent.
        let mut s = Stream::open(&h).await;
        s.send(
            req_headers(
                &[
                    (":path", "/v1/completions"),
                    ("x-llm-d-inference-fairness-id", &tenant),
                ],
                false,
            ),
            None,
        )
        .await;
        s.send(req_body(body.as_bytes(), true), None).await;
        assert_eq!(destination_md(&s.recv().await), sim);
        let _ = s.recv().await;
        s.send(
            resp_headers(&[(":status", "200"), ("content-type", ct)], false),
            None,
        )
        .await;
        let _ = s.recv().await;
        if streamed {
            // One message per server-sent event, as the server flushed them.
            let events = sse_events(&r.body);
            let n = events.len();
            for (k, e) in events.into_iter().enumerate() {
                s.send(resp_body(e, k + 1 == n), None).await;
                let _ = s.recv().await;
            }
        } else {
            s.send(resp_body(&r.body, true), None).await;
            let _ = s.recv().await;
        }
    }
    // A refused request in both: a body that is not JSON.
    let r = common::request(
        &http,
        "POST",
        &url,
        &[("content-type", "application/json")],
        "{",
    )
    .await;
    assert_eq!(r.status, 400);
    let mut s = Stream::open(&h).await;
    s.send(req_headers(&[(":path", "/v1/completions")], false), None)
        .await;
    s.send(req_body(b"{", true), None).await;
    assert_eq!(
        immediate(&s.recv().await).status.as_ref().unwrap().code,
        400
    );

    // Let the proxy's responses settle (the tracker finishes when the body is consumed).
    let proxy_text = {
        let mut text = proxy.director.metrics().encode();
        for _ in 0..100 {
            if text.contains("llm_d_epp_request_running{") && !text.contains("llm_d_epp_request_running{fairness_id=\"tenant-0\",model_name=\"sim-model\",priority=\"0\",target_model_name=\"sim-model\"} 1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            text = proxy.director.metrics().encode();
        }
        text
    };
    let via_proxy = traffic_samples(&proxy_text);
    let via_extproc = traffic_samples(&h.metrics.encode());
    assert_eq!(
        via_proxy.get(r#"llm_d_epp_request_total{fairness_id="tenant-0",model_name="sim-model",priority="0",target_model_name="sim-model"}"#).map(String::as_str),
        Some("3"),
        "{via_proxy:#?}"
    );
    assert!(
        via_proxy.contains_key(r#"llm_d_epp_request_error_total{error_code="BadRequest",fairness_id="default-flow",model_name="",priority="0",target_model_name=""}"#),
        "{via_proxy:#?}"
    );
    assert!(via_proxy
        .keys()
        .any(|k| k.starts_with("llm_d_epp_request_output_tokens_sum")));
    assert!(via_proxy
        .keys()
        .any(|k| k.starts_with("llm_d_epp_request_streaming_itl_seconds_count")));
    let only = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| -> Vec<String> {
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} {v} (other: {:?})", b.get(k)))
            .collect()
    };
    let differ = only(&via_proxy, &via_extproc);
    let missing = only(&via_extproc, &via_proxy);
    assert!(
        differ.is_empty() && missing.is_empty(),
        "proxy vs ext_proc:\n{}\next_proc vs proxy:\n{}",
        differ.join("\n"),
        missing.join("\n")
    );
}

/// `session-affinity-scorer` over the wire: the response headers answer carries the
/// `x-session-token` of the endpoint that served, and a request sending it back goes there even
/// when the load says otherwise.
#[tokio::test]
async fn the_session_token_is_set_on_responses_and_sends_requests_back_there() {
    const CFG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: session-affinity-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 1\n  - pluginRef: session-affinity-scorer\n    weight: 5\n";
    let h = harness_config(
        &PODS,
        ExtProcConfig::default(),
        epp_core::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
        CFG,
    )
    .await;
    // One exchange: request (with `extra` headers) → pick; response headers → what is set.
    async fn exchange(h: &Harness, extra: &[(&str, &str)]) -> (String, BTreeMap<String, String>) {
        let mut s = Stream::open(h).await;
        let mut hs = vec![(":path", "/v1/completions"), (":method", "POST")];
        hs.extend_from_slice(extra);
        s.send(req_headers(&hs, false), None).await;
        s.send(req_body(j("m", "hello").as_bytes(), true), None)
            .await;
        let routed = s.recv().await;
        let dest = destination_md(&routed);
        let _body = s.recv().await;
        s.send(resp_headers(&[(":status", "200")], false), None)
            .await;
        let resp = s.recv().await;
        (dest, set_headers(&resp))
    }
    // No token: the least-loaded pod, and the token names it.
    let (dest, set) = exchange(&h, &[]).await;
    assert_eq!(dest, "10.0.0.2:8000");
    let token = set
        .get("x-session-token")
        .expect("session token set")
        .clone();
    assert_eq!(token, "MTAuMC4wLjI6ODAwMA==", "base64 of 10.0.0.2:8000");
    // A token naming the busiest pod wins over its queue, every time.
    let busy = "MTAuMC4wLjM6ODAwMA=="; // 10.0.0.3:8000 (queue 10)
    for _ in 0..5 {
        let (dest, set) = exchange(&h, &[("x-session-token", busy)]).await;
        assert_eq!(dest, "10.0.0.3:8000");
        assert_eq!(set.get("x-session-token").map(String::as_str), Some(busy));
    }
    // A token that is not base64 is no session: back to load.
    let (dest, _) = exchange(&h, &[("x-session-token", "not base64!")]).await;
    assert_eq!(dest, "10.0.0.2:8000");
}

/// Flow control in ext_proc mode: a request over the pool's capacity holds its stream (no
/// answer) until a slot frees; a gateway that resets a waiting stream takes the request out of
/// the queue at once.
#[tokio::test]
async fn a_queued_request_holds_its_stream_until_a_slot_frees() {
    let cfg = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
- type: concurrency-detector
  parameters:
    maxConcurrency: 1
flowControl:
  saturationDetector:
    pluginRef: concurrency-detector
"#;
    let h = harness_config(
        &[("10.0.0.1:8000", 0.0, 0.0)],
        ExtProcConfig::default(),
        epp_core::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
        cfg,
    )
    .await;
    let request = |s: &Stream, tenant: &'static str| {
        let tx = s.tx.clone();
        async move {
            for r in [
                req_headers(
                    &[
                        (":path", "/v1/completions"),
                        ("x-llm-d-inference-fairness-id", tenant),
                    ],
                    false,
                ),
                req_body(j("m", "hello").as_bytes(), true),
            ] {
                tx.send(ProcessingRequest {
                    request: Some(r),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
    };
    let mut a = Stream::open(&h).await;
    request(&a, "a").await;
    assert!(is_request_headers(&a.recv().await));
    let _ = a.recv().await; // the body
    assert_eq!(inflight(&h, "10.0.0.1:8000"), 1);
    // The pool is full: b waits, holding its stream.
    let mut b = Stream::open(&h).await;
    request(&b, "b").await;
    b.assert_quiet().await;
    let queued = |h: &Harness| {
        h.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("llm_d_epp_flow_control_queue_size{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(queued(&h), 1.0);
    // c waits too, then its gateway resets the stream: it leaves the queue.
    let c = Stream::open(&h).await;
    request(&c, "c").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(queued(&h), 2.0);
    drop(c);
    let mut left = false;
    for _ in 0..100 {
        if queued(&h) == 1.0 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left, "the reset stream's request left the queue");
    assert_eq!(
        counter(
            &h,
            r#"llm_d_epp_flow_control_requests_total{inference_pool="epp",outcome="EvictedContextCancelled",priority="0"} "#
        ),
        1.0
    );
    // a's response ends: its slot goes to b.
    a.send(resp_headers(&[(":status", "200")], true), None)
        .await;
    let _ = a.recv().await;
    let hb = b.recv().await;
    assert!(is_request_headers(&hb));
    assert_eq!(destination_md(&hb), "10.0.0.1:8000");
    assert_eq!(queued(&h), 0.0);
}

fn removed_headers(r: &ProcessingResponse) -> Vec<String> {
    common(r)
        .header_mutation
        .as_ref()
        .map(|m| m.remove_headers.clone())
        .unwrap_or_default()
}

fn sim_fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../epp/tests/fixtures/llm-d-router")
        .join(name);
    std::fs::read_to_string(p).unwrap()
}

/// Send one chat request (headers, then the whole body) and return the request-headers answer.
async fn route_chat(h: &Harness, prompt: &str, extra: &[(&str, &str)]) -> ProcessingResponse {
    let mut s = Stream::open(h).await;
    let mut hs = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
    hs.extend_from_slice(extra);
    s.send(req_headers(&hs, false), None).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": prompt}]
    }))
    .unwrap();
    s.send(req_body(&body, true), None).await;
    let r = s.recv().await;
    assert!(is_request_headers(&r), "{r:?}");
    r
}

#[tokio::test]
async fn disaggregated_requests_carry_the_prefill_pick_for_the_sidecar_and_a_clients_never_pass() {
    let pods = [
        ("10.0.0.1:8000", 0.0, 0.1),
        ("10.0.0.9:8000", 0.0, 0.1),
        ("10.0.0.3:8000", 5.0, 0.1),
    ];
    let h = harness_config(
        &pods,
        ExtProcConfig::default(),
        epp_core::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
        &sim_fixture("sim-pd-epp-config.yaml"),
    )
    .await;
    let forged = [
        ("x-prefiller-host-port", "6.6.6.6:1"),
        ("x-data-parallel-host-port", "6.6.6.6:2"),
    ];
    // 256 uncached tokens: prefill on the prefill pod, decode on the emptier decode pod.
    let r = route_chat(&h, &"abcd".repeat(256), &forged).await;
    let set = set_headers(&r);
    assert_eq!(set["x-prefiller-host-port"], "10.0.0.9:8000");
    assert_eq!(set["x-gateway-destination-endpoint"], "10.0.0.1:8000");
    assert_eq!(destination_md(&r), "10.0.0.1:8000");
    let overwrite = common(&r)
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .find(|o| o.header.as_ref().unwrap().key == "x-prefiller-host-port")
        .unwrap()
        .append_action;
    assert_eq!(
        overwrite, 2,
        "OVERWRITE_IF_EXISTS_OR_ADD, never appended to a client's"
    );
    let mut removed = removed_headers(&r);
    removed.sort();
    assert_eq!(
        removed,
        ["x-data-parallel-host-port", "x-encoder-hosts-ports"]
    );
    // A short prompt decodes alone: the client's prefill header is removed, not passed on.
    let r = route_chat(&h, "hi", &forged).await;
    let set = set_headers(&r);
    assert!(!set.contains_key("x-prefiller-host-port"), "{set:?}");
    assert!(removed_headers(&r).contains(&"x-prefiller-host-port".to_string()));
    let text = h.metrics.encode();
    for (d, n) in [("prefill-decode", 1), ("decode-only", 1)] {
        let line = format!("llm_d_epp_disagg_decision_total{{plugin_name=\"disagg-profile-handler\",plugin_type=\"disagg-profile-handler\",model_name=\"m\",decision_type=\"{d}\"}} {n}");
        assert!(text.contains(&line), "{line}\n{text}");
    }
}

#[tokio::test]
async fn data_parallel_requests_go_to_the_primary_port_with_the_rank_in_a_header() {
    let pods = [("10.0.0.1:8001", 0.0, 0.1), ("10.0.0.1:8002", 4.0, 0.1)];
    let h = harness_config(
        &pods,
        ExtProcConfig::default(),
        epp_core::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
        &sim_fixture("dp-epp-config.yaml"),
    )
    .await;
    let r = route_chat(&h, "hello", &[]).await;
    let set = set_headers(&r);
    // The sample scores prefix affinity only: either rank may win a cold request.
    let rank = set["x-data-parallel-host-port"].clone();
    assert!(rank == "10.0.0.1:8001" || rank == "10.0.0.1:8002", "{rank}");
    assert_eq!(set["x-gateway-destination-endpoint"], "10.0.0.1:8000");
    assert_eq!(destination_md(&r), "10.0.0.1:8000");
    let mut removed = removed_headers(&r);
    removed.sort();
    assert_eq!(removed, ["x-encoder-hosts-ports", "x-prefiller-host-port"]);
    // The rank, not the primary port, carries the request in flight.
    for (a, n) in [
        (rank.as_str(), 1),
        (
            if rank.ends_with("8001") {
                "10.0.0.1:8002"
            } else {
                "10.0.0.1:8001"
            },
            0,
        ),
    ] {
        assert_eq!(
            h.director.endpoint_by_address(a).unwrap().inflight(),
            n,
            "{a}"
        );
    }
}
