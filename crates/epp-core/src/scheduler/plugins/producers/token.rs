//! `token-producer` (and its deprecated alias `tokenizer`): the prompt's tokens, for plugins that
//! weigh its length or key lookups by its token ids (precise prefix routing), as llm-d-router's
//! data producer of the same name. Backends, chosen by the parameters as in llm-d:
//!
//! - `estimate` (the default, and the implicit producer when none is configured): 4 bytes of
//!   prompt text per token, rounded up (the estimate the approximate prefix index cuts its blocks
//!   by); no token ids.
//! - `vllm` (or `modelName` alone): the model server's render API over HTTP
//!   ([`vllm`]); the prompt's real token ids.
//! - `local` (an epp extension): a Hugging Face `tokenizer.json` loaded from disk at config load
//!   ([`local`]), rendering chats with the simulator's template.
//!
//! A real backend runs in [`Producer::prepare`], awaited by the director before the producers'
//! synchronous step. Token-id prompts (`"prompt": [1, 2, 3]`) are taken as they are. Answers are
//! cached ([`cache`]: bounded by entries and by token ids). On any failure (deadline, transport,
//! non-2xx, an answer that is not a render, too large, too many tokens) the request is not
//! failed: it goes on with the estimate (`token_ids` `None`), the failure is counted in
//! `epp_tokenizer_fallbacks_total{backend,reason}` and logged at most once per
//! [`LOG_EVERY`] with its reason. Tokenizer failures never touch an endpoint's health, even when
//! the render URL is one of the model servers. The UDS tokenizer sidecar and multimodal
//! estimation are refused, naming the parameter.

pub mod cache;
pub mod local;
pub mod vllm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::{ConfigError, PluginSpec};
use crate::request::ParsedRequest;
use crate::scheduler::plugins::{params, Plugin, PrepareFuture, Producer, BYTES_PER_TOKEN};
use crate::scheduler::RequestData;

pub use cache::TokenCache;
pub use local::{LocalParams, LocalTokenizer};
pub use vllm::{VllmParams, VllmRenderer};

pub const TYPE: &str = "token-producer";
/// llm-d's deprecated name for the same plugin.
pub const LEGACY_TYPE: &str = "tokenizer";

/// Longest prompt taken from a backend, in tokens; a longer answer is a failure
/// (`too_many_tokens`).
pub const MAX_PROMPT_TOKENS: usize = 1 << 20;
/// A failing backend is logged at most once per this interval (with the number of failures
/// not logged since).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenProducerParams {
    /// The model whose tokenizer renders the prompt; selects the `vllm` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// The vLLM render backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vllm: Option<VllmParams>,
    /// gRPC-over-UDS tokenizer sidecar (deprecated in llm-d; not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_tokenizer_config: Option<Value>,
    /// The `estimate` backend (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<EstimateParams>,
    /// A local `tokenizer.json` (epp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalParams>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EstimateParams {
    /// Image placeholder estimation (not supported: epp estimates text only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Value>,
    /// Video placeholder estimation (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<Value>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: TokenProducerParams = params(spec, field)?;
    let at = |param: &str| format!("{field}.parameters.{param}");
    let refuse = |param: &str, what: &str| {
        Err(ConfigError::new(
            at(param),
            format!(
                "{what} is not supported by epp; use the `vllm`, `local` or `estimate` backend (leave `{param}` out)"
            ),
        ))
    };
    if p.uds_tokenizer_config.is_some() {
        return refuse(
            "udsTokenizerConfig",
            "the UDS tokenizer sidecar backend (deprecated in llm-d for `vllm.url`)",
        );
    }
    if let Some(e) = &p.estimate {
        if e.image.is_some() {
            return refuse("estimate.image", "multimodal (image) token estimation");
        }
        if e.video.is_some() {
            return refuse("estimate.video", "multimodal (video) token estimation");
        }
    }
    // One backend: `estimate`, `vllm` (or `modelName`, which selects it, as in llm-d), `local`.
    let set: Vec<&str> = [
        ("estimate", p.estimate.is_some()),
        ("vllm", p.vllm.is_some()),
        ("modelName", p.vllm.is_none() && p.model_name.is_some()),
        ("local", p.local.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if let [_, second, ..] = set[..] {
        return Err(ConfigError::new(
            at(second),
            format!(
                "only one of `estimate`, `vllm` (or `modelName`) and `local` may be set, got {}",
                set.join(" and ")
            ),
        ));
    }
    let type_name = if spec.type_ == LEGACY_TYPE {
        tracing::warn!(
            plugin = field,
            "plugin type `tokenizer` is deprecated; use `token-producer`"
        );
        LEGACY_TYPE
    } else {
        TYPE
    };
    let name = spec.name().to_string();
    let tokenizing = if let Some(local) = &p.local {
        let t = LocalTokenizer::new(local, &at("local"))?;
        tracing::debug!(plugin = %name, path = %t.path().display(), "token-producer: local tokenizer.json");
        Some(Arc::new(Tokenizing {
            model: t.path().to_string_lossy().into_owned(),
            backend: Backend::Local(t),
            cache: TokenCache::default(),
            log: ThrottledLog::default(),
        }))
    } else if p.vllm.is_some() || p.model_name.is_some() {
        let model = match p.model_name.as_deref().map(str::trim) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => return Err(ConfigError::new(
                at("modelName"),
                "must be set (the model the render endpoint tokenizes for) with the `vllm` backend",
            )),
        };
        let renderer = VllmRenderer::new(&model, &p.vllm.unwrap_or_default(), &at("vllm"))?;
        let (t, mm) = renderer.timeouts();
        tracing::debug!(
            plugin = %name,
            url = renderer.base(),
            model = %model,
            timeout = ?t,
            mm_timeout = ?mm,
            "token-producer: vLLM render backend"
        );
        Some(Arc::new(Tokenizing {
            backend: Backend::Vllm(Box::new(renderer)),
            model,
            cache: TokenCache::default(),
            log: ThrottledLog::default(),
        }))
    } else {
        None
    };
    Ok(Plugin::Producer(Arc::new(TokenProducer {
        name,
        type_name,
        tokenizing,
    })))
}

/// See the module documentation.
pub struct TokenProducer {
    name: String,
    type_name: &'static str,
    /// `None`: the `estimate` backend.
    tokenizing: Option<Arc<Tokenizing>>,
}

impl Default for TokenProducer {
    fn default() -> Self {
        Self {
            name: TYPE.to_string(),
            type_name: TYPE,
            tokenizing: None,
        }
    }
}

impl TokenProducer {
    /// The backend's label value (`estimate`, `vllm`, `local`).
    pub fn backend(&self) -> BackendKind {
        self.tokenizing
            .as_deref()
            .map_or(BackendKind::Estimate, Tokenizing::kind)
    }

    /// Cached prompts and token ids held, for a real backend.
    pub fn cache_size(&self) -> Option<(usize, usize)> {
        self.tokenizing.as_ref().map(|t| t.cache.size())
    }
}

/// The `estimate` backend's token count for a prompt of `bytes` bytes.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN)
}

impl Producer for TokenProducer {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prepare<'a>(
        &'a self,
        request: &'a ParsedRequest,
        data: &'a mut RequestData,
        metrics: &'a TokenizerMetrics,
    ) -> Option<PrepareFuture<'a>> {
        let t = self.tokenizing.as_deref()?;
        if data.token_ids.is_some() {
            // Another producer tokenized already (llm-d's producer is idempotent too).
            return None;
        }
        Some(Box::pin(t.tokenize(&self.name, request, data, metrics)))
    }
    fn produce(&self, request: &ParsedRequest, data: &mut RequestData) {
        if data.prompt_tokens.is_none() {
            data.prompt_tokens = Some(estimate_tokens(request.prompt.len()));
        }
    }
}

/// What a real backend needs beside its client: the model it tokenizes for, the cache and the
/// failure log.
struct Tokenizing {
    backend: Backend,
    model: String,
    cache: TokenCache,
    log: ThrottledLog,
}

enum Backend {
    Vllm(Box<VllmRenderer>),
    Local(LocalTokenizer),
}

/// Why a backend could not tokenize a request (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No answer within the deadline.
    Timeout,
    /// Connecting, sending or reading failed.
    Unreachable,
    /// A non-2xx answer.
    Status,
    /// An answer that is not a render (bad JSON, wrong shape, ids out of range).
    InvalidResponse,
    /// An answer larger than the read bound.
    TooLarge,
    /// More than [`MAX_PROMPT_TOKENS`] tokens.
    TooManyTokens,
    /// A request the backend does not tokenize (batched prompts, embeddings, responses...).
    Unsupported,
    /// The local tokenizer failed on the text.
    TokenizerError,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::Unreachable => "unreachable",
            Reason::Status => "status",
            Reason::InvalidResponse => "invalid_response",
            Reason::TooLarge => "too_large",
            Reason::TooManyTokens => "too_many_tokens",
            Reason::Unsupported => "unsupported",
            Reason::TokenizerError => "tokenizer_error",
        }
    }
}

/// A backend failure: its reason and what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
}

/// What one request got from a real backend (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The backend tokenized it.
    Tokenized,
    /// The answer came from the cache.
    Cached,
    /// The request carried token ids.
    Pretokenized,
    /// It went on with the estimate.
    Fallback,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Tokenized => "tokenized",
            Outcome::Cached => "cached",
            Outcome::Pretokenized => "pretokenized",
            Outcome::Fallback => "fallback",
        }
    }
}

/// The backend label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Estimate,
    Vllm,
    Local,
}

impl BackendKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Estimate => "estimate",
            BackendKind::Vllm => "vllm",
            BackendKind::Local => "local",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )*};
}
label_value!(Reason, Outcome, BackendKind);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    backend: BackendKind,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    backend: BackendKind,
    reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: BackendKind,
}

/// Buckets of `epp_tokenizer_duration_seconds`: 100 µs .. 30 s (a local file to a slow render).
const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 30.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// `epp_tokenizer_requests_total{backend,outcome}`, `epp_tokenizer_fallbacks_total{backend,reason}`
/// and `epp_tokenizer_duration_seconds{backend}` (llm-d-router has no tokenizer metric).
#[derive(Debug)]
pub struct TokenizerMetrics {
    requests: Family<OutcomeLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
}

impl TokenizerMetrics {
    /// Register the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "epp_tokenizer_requests",
            "Requests a token-producer backend handled, by outcome: tokenized, cached, pretokenized (the request carried token ids), fallback (went on with the estimate)",
            requests.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "epp_tokenizer_fallbacks",
            "Requests that went on with the token estimate because the tokenizer backend failed, by reason",
            fallbacks.clone(),
        );
        let duration = Family::<BackendLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "epp_tokenizer_duration_seconds",
            "Time a tokenizer backend took per call (cache hits excluded), failures included",
            duration.clone(),
        );
        Self {
            requests,
            fallbacks,
            duration,
        }
    }

    fn outcome(&self, backend: BackendKind, outcome: Outcome) {
        self.requests
            .get_or_create(&OutcomeLabels { backend, outcome })
            .inc();
    }

    fn fallback(&self, backend: BackendKind, reason: Reason) {
        self.outcome(backend, Outcome::Fallback);
        self.fallbacks
            .get_or_create(&FallbackLabels { backend, reason })
            .inc();
    }

    /// `epp_tokenizer_fallbacks_total` for one backend and reason (tests and tools).
    pub fn fallbacks(&self, backend: BackendKind, reason: Reason) -> u64 {
        self.fallbacks
            .get_or_create(&FallbackLabels { backend, reason })
            .get()
    }

    /// `epp_tokenizer_requests_total` for one backend and outcome.
    pub fn requests(&self, backend: BackendKind, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&OutcomeLabels { backend, outcome })
            .get()
    }
}

/// A warning at most once per [`LOG_EVERY`], counting the ones held back.
#[derive(Default)]
struct ThrottledLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl ThrottledLog {
    fn failed(&self, plugin: &str, backend: BackendKind, failure: &Failure) {
        let now = Instant::now();
        {
            let mut last = self.last.lock();
            if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            plugin,
            backend = backend.as_str(),
            reason = failure.reason.as_str(),
            detail = %failure.detail,
            not_logged_since = suppressed,
            "tokenizer failed; the request goes on with the token estimate"
        );
    }
}

/// What a request asks to tokenize.
enum Input<'a> {
    /// Token ids given in the request.
    Pretokenized(Vec<u32>),
    /// A completion of one prompt.
    Completion(&'a Map<String, Value>),
    /// A chat conversation.
    Chat(&'a Map<String, Value>),
}

fn unsupported(detail: impl Into<String>) -> Failure {
    Failure {
        reason: Reason::Unsupported,
        detail: detail.into(),
    }
}

/// Token ids of a `prompt` given as ids (`[1, 2]` or `[[1, 2]]`), if it is one.
fn prompt_ids(items: &[Value]) -> Option<Result<Vec<u32>, Failure>> {
    let ids = match items {
        [Value::Array(inner)] => inner,
        [Value::Number(_), ..] => items,
        _ => return None,
    };
    Some(
        ids.iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| unsupported("`prompt` token ids must be integers in 0..2^32")),
    )
}

/// `None`: no body to tokenize (the body was not read).
fn classify(request: &ParsedRequest) -> Option<Result<Input<'_>, Failure>> {
    let body = request.body.as_ref()?.as_object()?;
    if body.get("messages").is_some_and(Value::is_array) {
        return Some(Ok(Input::Chat(body)));
    }
    Some(match body.get("prompt") {
        Some(Value::String(_)) => Ok(Input::Completion(body)),
        Some(Value::Array(items)) => match prompt_ids(items) {
            Some(ids) => ids.map(Input::Pretokenized),
            None => match items.as_slice() {
                [Value::String(_)] => Ok(Input::Completion(body)),
                [] => Err(unsupported("an empty `prompt` list")),
                _ => Err(unsupported("batched prompts (a list of several)")),
            },
        },
        _ => Err(unsupported(
            "neither `prompt` nor `messages` (embeddings, responses and other APIs are estimated)",
        )),
    })
}

impl Tokenizing {
    fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Vllm(_) => BackendKind::Vllm,
            Backend::Local(_) => BackendKind::Local,
        }
    }

    async fn tokenize(
        &self,
        plugin: &str,
        request: &ParsedRequest,
        data: &mut RequestData,
        metrics: &TokenizerMetrics,
    ) {
        let kind = self.kind();
        let fail = |f: Failure| {
            metrics.fallback(kind, f.reason);
            self.log.failed(plugin, kind, &f);
        };
        let input = match classify(request) {
            None => return,
            Some(Err(f)) => return fail(f),
            Some(Ok(i)) => i,
        };
        let (chat, body) = match input {
            Input::Pretokenized(ids) => {
                metrics.outcome(kind, Outcome::Pretokenized);
                data.prompt_tokens = Some(ids.len() as u64);
                data.token_ids = Some(ids.into());
                return;
            }
            Input::Completion(b) => (false, b),
            Input::Chat(b) => (true, b),
        };
        let key = cache::key(&self.model, chat, body);
        if let Some(ids) = self.cache.get(key) {
            metrics.outcome(kind, Outcome::Cached);
            data.prompt_tokens = Some(ids.len() as u64);
            data.token_ids = Some(ids);
            return;
        }
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Vllm(r) => r.render(chat, body).await,
            Backend::Local(t) => t.tokenize(request, chat, body).await,
        };
        metrics
            .duration
            .get_or_create(&BackendLabels { backend: kind })
            .observe(started.elapsed().as_secs_f64());
        let ids = match result {
            Ok(ids) if ids.len() > MAX_PROMPT_TOKENS => {
                return fail(Failure {
                    reason: Reason::TooManyTokens,
                    detail: format!(
                        "{} tokens, more than the {MAX_PROMPT_TOKENS} taken",
                        ids.len()
                    ),
                })
            }
            Ok(ids) => ids,
            Err(f) => return fail(f),
        };
        let ids: Arc<[u32]> = ids.into();
        self.cache.insert(key, ids.clone());
        metrics.outcome(kind, Outcome::Tokenized);
        data.prompt_tokens = Some(ids.len() as u64);
        data.token_ids = Some(ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_with(type_: &str, yaml: Option<&str>) -> Result<Plugin, ConfigError> {
        build(&PluginSpec::for_test(type_, yaml), "plugins[0]")
    }

    fn producer(yaml: &str) -> Arc<dyn Producer> {
        match build_with(TYPE, Some(yaml)) {
            Ok(Plugin::Producer(p)) => p,
            Ok(_) => panic!("not a producer"),
            Err(e) => panic!("{yaml}: {e}"),
        }
    }

    #[test]
    fn estimates_four_bytes_per_token_rounded_up() {
        let p = producer("estimate: {}");
        let mut data = RequestData::default();
        let req = ParsedRequest {
            prompt: b"hello world".to_vec(),
            ..Default::default()
        };
        assert!(p
            .prepare(
                &req,
                &mut data,
                &TokenizerMetrics::register(&mut Registry::default())
            )
            .is_none());
        p.produce(&req, &mut data);
        assert_eq!(data.prompt_tokens, Some(3));
        assert_eq!(data.token_ids, None);
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(8), 2);
        let Plugin::Producer(legacy) = build_with(LEGACY_TYPE, None).unwrap() else {
            panic!()
        };
        assert_eq!(legacy.type_name(), LEGACY_TYPE);
    }

    #[test]
    fn vllm_parameters_as_llm_d_names_them() {
        for yaml in [
            "{modelName: m}",
            "{modelName: m, vllm: {}}",
            "{modelName: m, vllm: {url: 'http://render:8000/', timeout: 250ms, mmTimeout: 1m}}",
        ] {
            producer(yaml);
        }
        let Plugin::Producer(_) = build_with(
            LEGACY_TYPE,
            Some("{modelName: m, vllm: {url: 'http://r:1'}}"),
        )
        .unwrap() else {
            panic!()
        };
    }

    #[test]
    fn refusals_name_the_parameter() {
        for (yaml, field, message) in [
            (
                "{vllm: {url: 'http://x:8000'}}",
                "plugins[0].parameters.modelName",
                "must be set",
            ),
            (
                "{modelName: '  '}",
                "plugins[0].parameters.modelName",
                "must be set",
            ),
            (
                "{modelName: m, udsTokenizerConfig: {socketFile: /tmp/s}}",
                "plugins[0].parameters.udsTokenizerConfig",
                "the UDS tokenizer sidecar backend",
            ),
            (
                "{estimate: {image: {mode: static}}}",
                "plugins[0].parameters.estimate.image",
                "multimodal (image)",
            ),
            (
                "{estimate: {video: {}}}",
                "plugins[0].parameters.estimate.video",
                "multimodal (video)",
            ),
            (
                "{estimate: {}, modelName: m}",
                "plugins[0].parameters.modelName",
                "only one of",
            ),
            (
                "{estimate: {}, vllm: {}}",
                "plugins[0].parameters.vllm",
                "only one of",
            ),
            (
                "{modelName: m, local: {tokenizerPath: /x}}",
                "plugins[0].parameters.local",
                "got modelName and local",
            ),
            (
                "{vllm: {}, modelName: m, local: {tokenizerPath: /x}}",
                "plugins[0].parameters.local",
                "got vllm and local",
            ),
            (
                "{local: {}}",
                "plugins[0].parameters.local.tokenizerPath",
                "must be set",
            ),
            (
                "{local: {tokenizerPath: /nonexistent/tokenizer.json}}",
                "plugins[0].parameters.local.tokenizerPath",
                "cannot read /nonexistent/tokenizer.json",
            ),
            (
                "{local: {tokenizerPath: /x, hub: true}}",
                "plugins[0].parameters.local.hub",
                "",
            ),
            (
                "{modelName: m, vllm: {url: 'https://x:8000'}}",
                "plugins[0].parameters.vllm.url",
                "TLS is not supported",
            ),
            (
                "{modelName: m, vllm: {url: 'x:8000'}}",
                "plugins[0].parameters.vllm.url",
                "must be an http://host:port URL",
            ),
            (
                "{modelName: m, vllm: {url: 'http://x:8000?a=b'}}",
                "plugins[0].parameters.vllm.url",
                "must not have a query",
            ),
            (
                "{modelName: m, vllm: {url: 'not a url'}}",
                "plugins[0].parameters.vllm.url",
                "is not a URL",
            ),
            (
                "{modelName: m, vllm: {timeout: soon}}",
                "plugins[0].parameters.vllm.timeout",
                "is not a duration",
            ),
            (
                "{modelName: m, vllm: {mmTimeout: 0s}}",
                "plugins[0].parameters.vllm.mmTimeout",
                "must be greater than 0",
            ),
            (
                "{modelName: m, vllm: {grpc: {}}}",
                "plugins[0].parameters.vllm.grpc",
                "",
            ),
            ("{hf: {}}", "plugins[0].parameters.hf", ""),
        ] {
            let e = build_with(TYPE, Some(yaml)).err().unwrap();
            assert_eq!(e.field, field, "{yaml}: {e}");
            assert!(e.message.contains(message), "{yaml}: {e}");
        }
    }

    #[test]
    fn requests_are_classified_as_llm_d_does() {
        let parsed = |body: Value| ParsedRequest {
            body: Some(body),
            ..Default::default()
        };
        let kind = |body: Value| match classify(&parsed(body)) {
            None => "none".to_string(),
            Some(Ok(Input::Chat(_))) => "chat".into(),
            Some(Ok(Input::Completion(_))) => "completion".into(),
            Some(Ok(Input::Pretokenized(ids))) => format!("ids {ids:?}"),
            Some(Err(f)) => format!("{}: {}", f.reason.as_str(), f.detail),
        };
        assert_eq!(kind(serde_json::json!({"messages": []})), "chat");
        assert_eq!(kind(serde_json::json!({"prompt": "x"})), "completion");
        assert_eq!(kind(serde_json::json!({"prompt": ["x"]})), "completion");
        assert_eq!(kind(serde_json::json!({"prompt": [1, 2]})), "ids [1, 2]");
        assert_eq!(kind(serde_json::json!({"prompt": [[3]]})), "ids [3]");
        assert!(kind(serde_json::json!({"prompt": [-1]})).starts_with("unsupported: "));
        assert!(kind(serde_json::json!({"prompt": ["a", "b"]})).starts_with("unsupported: batched"));
        assert!(kind(serde_json::json!({"input": "x"})).starts_with("unsupported: "));
        assert_eq!(kind(Value::Null), "none");
        assert!(classify(&ParsedRequest::default()).is_none());
    }

    /// A one-trick HTTP server on loopback: every request is read whole, then answered with
    /// `answer` (raw bytes) and the connection closed; `None` never answers. The bodies it got
    /// come back on the channel.
    async fn fake_server(
        answer: Option<Vec<u8>>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap())
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break text[end + 4..end + 4 + len].to_string();
                            }
                        }
                    };
                    let _ = tx.send(body);
                    match answer {
                        Some(a) => {
                            let _ = sock.write_all(&a).await;
                            let _ = sock.shutdown().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        (format!("http://{addr}"), rx)
    }

    fn http_answer(status: &str, body: &[u8]) -> Vec<u8> {
        let mut a = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(body);
        a
    }

    fn chat_request(text: &str) -> ParsedRequest {
        crate::request::parse_body(
            crate::request::ApiMethod::ChatCompletions,
            serde_json::json!({"model": "client-name", "max_tokens": 3, "messages": [{"role": "user", "content": text}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    /// Run both producer steps over `req`, as the director does.
    async fn run(p: &dyn Producer, req: &ParsedRequest, m: &TokenizerMetrics) -> RequestData {
        let mut data = RequestData::default();
        if let Some(f) = p.prepare(req, &mut data, m) {
            f.await;
        }
        p.produce(req, &mut data);
        data
    }

    #[tokio::test]
    async fn renders_through_vllm_and_caches_the_answer() {
        let (url, mut bodies) = fake_server(Some(http_answer(
            "200 OK",
            br#"{"request_id":"r","token_ids":[7,8,9],"features":null,"sampling_params":{}}"#,
        )))
        .await;
        let p = producer(&format!(
            "{{modelName: base-model, vllm: {{url: '{url}'}}}}"
        ));
        let m = TokenizerMetrics::register(&mut Registry::default());
        let req = chat_request("hello");
        let data = run(&*p, &req, &m).await;
        assert_eq!(data.token_ids.as_deref(), Some(&[7, 8, 9][..]));
        assert_eq!(data.prompt_tokens, Some(3));
        let sent: Value = serde_json::from_str(&bodies.recv().await.unwrap()).unwrap();
        assert_eq!(sent["model"], "base-model", "modelName is stamped in");
        assert_eq!(sent["messages"][0]["content"], "hello");
        assert_eq!(sent["max_tokens"], 3, "the body goes as it came");
        // The same prompt with other sampling settings: from the cache, no call.
        let mut again = chat_request("hello");
        if let Some(Value::Object(b)) = again.body.as_mut() {
            b.insert("max_tokens".into(), Value::from(9));
        }
        let data = run(&*p, &again, &m).await;
        assert_eq!(data.token_ids.as_deref(), Some(&[7, 8, 9][..]));
        assert!(bodies.try_recv().is_err());
        assert_eq!(m.requests(BackendKind::Vllm, Outcome::Tokenized), 1);
        assert_eq!(m.requests(BackendKind::Vllm, Outcome::Cached), 1);
        // Token-id prompts are taken as they are.
        let ids = crate::request::parse_body(
            crate::request::ApiMethod::Completions,
            br#"{"model":"m","prompt":[4,5]}"#,
        )
        .unwrap();
        let data = run(&*p, &ids, &m).await;
        assert_eq!(data.token_ids.as_deref(), Some(&[4, 5][..]));
        assert_eq!(m.requests(BackendKind::Vllm, Outcome::Pretokenized), 1);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_falls_back_within_the_deadline() {
        let (url, mut bodies) = fake_server(None).await;
        let p = producer(&format!(
            "{{modelName: m, vllm: {{url: '{url}', timeout: 300ms}}}}"
        ));
        let m = TokenizerMetrics::register(&mut Registry::default());
        let req = chat_request("hello world");
        let started = std::time::Instant::now();
        let data = run(&*p, &req, &m).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(bodies.recv().await.is_some(), "the request was sent");
        assert_eq!(data.token_ids, None);
        assert_eq!(data.prompt_tokens, Some(estimate_tokens(req.prompt.len())));
        assert_eq!(m.fallbacks(BackendKind::Vllm, Reason::Timeout), 1);
        assert_eq!(m.requests(BackendKind::Vllm, Outcome::Fallback), 1);
        assert_eq!(m.requests(BackendKind::Vllm, Outcome::Tokenized), 0);
    }

    #[tokio::test]
    async fn bad_answers_fall_back_with_their_reason() {
        let big = {
            let mut a =
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                    .to_vec();
            a.extend(std::iter::repeat_n(b' ', vllm::MAX_RESPONSE_BYTES + 1));
            a
        };
        let cases: Vec<(Vec<u8>, Reason)> = vec![
            (
                http_answer(
                    "500 Internal Server Error",
                    br#"{"error":{"message":"boom"}}"#,
                ),
                Reason::Status,
            ),
            (http_answer("404 Not Found", b"no"), Reason::Status),
            (
                http_answer("200 OK", b"<html>garbage"),
                Reason::InvalidResponse,
            ),
            (
                http_answer("200 OK", br#"{"token_ids":[-1]}"#),
                Reason::InvalidResponse,
            ),
            (
                http_answer("200 OK", br#"{"tokens":[1]}"#),
                Reason::InvalidResponse,
            ),
            (b"not http at all\r\n\r\n".to_vec(), Reason::Unreachable),
            (big, Reason::TooLarge),
        ];
        for (answer, reason) in cases {
            let (url, _bodies) = fake_server(Some(answer)).await;
            let p = producer(&format!("{{modelName: m, vllm: {{url: '{url}'}}}}"));
            let m = TokenizerMetrics::register(&mut Registry::default());
            let req = chat_request("hi");
            let data = run(&*p, &req, &m).await;
            assert_eq!(data.token_ids, None, "{reason:?}");
            assert_eq!(data.prompt_tokens, Some(estimate_tokens(req.prompt.len())));
            assert_eq!(m.fallbacks(BackendKind::Vllm, reason), 1, "{reason:?}");
            assert_eq!(m.requests(BackendKind::Vllm, Outcome::Fallback), 1);
        }
        // Completions answer a list of one render.
        let (url, _b) = fake_server(Some(http_answer(
            "200 OK",
            br#"[{"token_ids":[1]},{"token_ids":[2]}]"#,
        )))
        .await;
        let p = producer(&format!("{{modelName: m, vllm: {{url: '{url}'}}}}"));
        let m = TokenizerMetrics::register(&mut Registry::default());
        let req = crate::request::parse_body(
            crate::request::ApiMethod::Completions,
            br#"{"model":"m","prompt":"x"}"#,
        )
        .unwrap();
        assert_eq!(run(&*p, &req, &m).await.token_ids, None);
        assert_eq!(m.fallbacks(BackendKind::Vllm, Reason::InvalidResponse), 1);
        // Nothing listening.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = producer(&format!(
            "{{modelName: m, vllm: {{url: 'http://127.0.0.1:{port}'}}}}"
        ));
        assert_eq!(run(&*p, &req, &m).await.token_ids, None);
        assert_eq!(m.fallbacks(BackendKind::Vllm, Reason::Unreachable), 1);
        // Batched prompts are not sent.
        let batch = crate::request::parse_body(
            crate::request::ApiMethod::Completions,
            br#"{"model":"m","prompt":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(run(&*p, &batch, &m).await.token_ids, None);
        assert_eq!(m.fallbacks(BackendKind::Vllm, Reason::Unsupported), 1);
    }

    #[tokio::test]
    async fn the_local_backend_tokenizes_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::tokenization::testing::train_word_level(
            dir.path(),
            &["user assistant hello world", "a b c"],
        )
        .unwrap();
        let p = producer(&format!(
            "{{local: {{tokenizerPath: '{}'}}}}",
            path.display()
        ));
        let tk = crate::tokenization::HfTokenizer::from_file(&path).unwrap();
        let m = TokenizerMetrics::register(&mut Registry::default());
        let req = chat_request("hello world");
        let data = run(&*p, &req, &m).await;
        let want = tk.encode("user\nhello world\nassistant\n", false).unwrap();
        assert_eq!(want.len(), 4);
        assert_eq!(data.token_ids.as_deref(), Some(&want[..]));
        assert_eq!(data.prompt_tokens, Some(4));
        assert_eq!(m.requests(BackendKind::Local, Outcome::Tokenized), 1);
        // A prompt past the inline bound goes through the blocking pool, same ids.
        let long = "a b c ".repeat(local::INLINE_BYTES / 4);
        let req = crate::request::parse_body(
            crate::request::ApiMethod::Completions,
            serde_json::json!({"model": "m", "prompt": long})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let data = run(&*p, &req, &m).await;
        assert_eq!(
            data.token_ids.as_deref(),
            Some(&tk.encode(&long, true).unwrap()[..])
        );
        assert_eq!(m.requests(BackendKind::Local, Outcome::Tokenized), 2);
        assert_eq!(m.requests(BackendKind::Local, Outcome::Fallback), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_logged_at_most_once_per_interval() {
        let log = ThrottledLog::default();
        let f = Failure {
            reason: Reason::Timeout,
            detail: "x".into(),
        };
        for _ in 0..3 {
            log.failed("p", BackendKind::Vllm, &f);
        }
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
        tokio::time::advance(LOG_EVERY - Duration::from_millis(1)).await;
        log.failed("p", BackendKind::Vllm, &f);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 3);
        tokio::time::advance(Duration::from_millis(1)).await;
        // Logged again, with the count held back since; the count starts over.
        log.failed("p", BackendKind::Vllm, &f);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 0);
    }
}
