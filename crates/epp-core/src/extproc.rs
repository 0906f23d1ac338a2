//! The Envoy ext_proc front-end (`epp serve`): the Gateway API Inference Extension
//! endpoint-picker protocol over `envoy.service.ext_proc.v3.ExternalProcessor/Process`.
//!
//! One gRPC stream carries one HTTP request. The front-end only translates that stream to and
//! from the [`Director`](crate::director::Director): it buffers the request body
//! (FULL_DUPLEX_STREAMED) until end_of_stream, asks the director for a pick, answers with the
//! routing headers and metadata, re-sends the body in bounded pieces, then follows the response
//! so passive health, the in-flight count, status metrics and the served endpoint are settled
//! when the response ends (or the stream goes away). Protocol violations end only the offending
//! stream, with a gRPC status that says what was wrong.
//!
//! - [`exchange`]: the per-stream state machine (pure, no I/O);
//! - [`wire`]: builders of the Envoy messages;
//! - [`health`]: the gRPC health service;
//! - [`server`]: the tonic service, listeners and `epp serve`'s start-up.

pub mod exchange;
pub mod health;
pub mod server;
pub mod wire;

pub use exchange::Exchange;
pub use health::{is_ready, run_health, serve_health, serve_health_with, ReadyProbe};
pub use server::{
    serve, serve_tls, spawn_with_shutdown, ExtProcService, ProcessStream, ServeAddrs, ServeHandle,
    ServeOptions,
};
pub use wire::{
    body_response, destination_metadata, header_option, piece_count, routed_headers_response,
    subset_metadata, trailers_response, Direction, BODY_PIECE_BYTES,
};

/// The gRPC service name, also a gRPC health service name.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// Default port of the ext_proc gRPC server.
pub const DEFAULT_GRPC_PORT: u16 = 9002;
/// Default port of the gRPC health server.
pub const DEFAULT_GRPC_HEALTH_PORT: u16 = 9003;
/// The attributes namespace Envoy uses for `request_attributes` / `response_attributes`.
pub const EXT_PROC_ATTRIBUTES: &str = "envoy.filters.http.ext_proc";
/// The Envoy attribute (requested via `response_attributes`) naming the upstream that served.
pub const UPSTREAM_ADDRESS_ATTRIBUTE: &str = "upstream.address";

/// Behaviour switches of the ext_proc front-end.
#[derive(Clone, Debug)]
pub struct ExtProcConfig {
    /// Honour `test-epp-endpoint-selection` and add the `x-conformance-test-*` response headers.
    /// Test only: any client could steer its own requests.
    pub test_hooks: bool,
    /// Fallback endpoints appended to the `envoy.lb` metadata value (comma list). The request
    /// header always carries the primary only, since an ORIGINAL_DST cluster needs one address.
    pub fallbacks: usize,
    /// Largest request body buffered for a pick; larger ones get 413.
    pub max_body_bytes: usize,
    /// Concurrent ext_proc streams at most; more are refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// A stream whose request is still incomplete is ended after this long without a message.
    pub stream_idle_timeout: std::time::Duration,
    /// Add the scheduler's score of each destination endpoint to the `envoy.lb` metadata
    /// (`x-gateway-destination-endpoint-scores`: address → score).
    pub emit_endpoint_scores: bool,
    /// Ignore the gateway's `x-gateway-destination-endpoint-subset` hint.
    pub ignore_subset: bool,
    /// Largest gRPC message accepted from the gateway, in bytes (`None`: the body limit plus
    /// 1 MiB of headers and framing).
    pub max_recv_msg_bytes: Option<usize>,
    /// Largest gRPC message sent to the gateway (`None`: unlimited; bodies go back in pieces).
    pub max_send_msg_bytes: Option<usize>,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            test_hooks: false,
            fallbacks: 0,
            max_body_bytes: 64 * 1024 * 1024,
            max_streams: 10_000,
            stream_idle_timeout: std::time::Duration::from_secs(30),
            emit_endpoint_scores: false,
            ignore_subset: false,
            max_recv_msg_bytes: None,
            max_send_msg_bytes: None,
        }
    }
}
