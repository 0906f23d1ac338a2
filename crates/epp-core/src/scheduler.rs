//! The one scheduler: per request, candidates → filters → weighted scorers → picker, over an
//! immutable datastore snapshot. Pure and synchronous: no I/O, no locks, no awaits.
//!
//! Built from an [`EndpointPickerConfig`]: every plugin named in `plugins` is constructed from its
//! `type` and `parameters`; the first profile (or the one named `default`) is what runs.

pub mod disagg_metrics;
pub mod metrics;
pub mod plugins;

use std::sync::Arc;
use std::time::Instant;

use crate::config::{ConfigError, EndpointPickerConfig};
use crate::datastore::{Endpoint, EndpointView, HealthState, Snapshot};
pub use crate::metrics::PluginLabels;
use crate::prefix::{BlockPlan, PrefixConfig, PrefixMatch, PrefixPlan, ServerBound};
use crate::request::ParsedRequest;

pub use plugins::{Decider, Filter, HandlerPlan, Picker, Plugin, ProfileHandler, Scorer};
pub use plugins::{PrefixConsumer, Producer, ProfileRun};

/// Which prefix index a scorer's match info comes from (`prefixMatchInfoProducerName` resolved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefixSource {
    /// The approximate index, learned from picks (`approx-prefix-cache-producer`).
    #[default]
    Approximate,
    /// The precise index, fed by the engines' KV events (`precise-prefix-cache-producer`); per
    /// endpoint the approximate one stands in while its events are not flowing.
    Precise,
}

/// One source's match for a request: leading blocks per slot, and tokens per block.
#[derive(Clone, Debug, Default)]
pub struct SourceMatch {
    pub blocks: PrefixMatch,
    pub block_tokens: u64,
}

/// The prefix match info of one request, per source.
#[derive(Clone, Debug, Default)]
pub struct PrefixMatches {
    pub approximate: SourceMatch,
    /// `None` without a precise producer, or for a request without token ids (then readers of
    /// the precise source get the approximate match).
    pub precise: Option<SourceMatch>,
    /// The source the configuration's first prefix scorer reads: what routing decisions and
    /// the cache-hit metrics follow.
    pub primary: PrefixSource,
    /// The precise lookup behind `precise` (its request keys, for the post-pick step).
    pub precise_lookup: Option<crate::precise::PreciseMatch>,
}

impl PrefixMatches {
    /// Only the approximate index's match.
    pub fn approximate(blocks: PrefixMatch, block_tokens: u64) -> Self {
        Self {
            approximate: SourceMatch {
                blocks,
                block_tokens,
            },
            precise: None,
            primary: PrefixSource::Approximate,
            precise_lookup: None,
        }
    }

    /// The match `source` readers get.
    pub fn get(&self, source: PrefixSource) -> &SourceMatch {
        match (source, &self.precise) {
            (PrefixSource::Precise, Some(p)) => p,
            _ => &self.approximate,
        }
    }

    /// The primary source's match.
    pub fn primary(&self) -> &SourceMatch {
        self.get(self.primary)
    }

    /// Leading blocks `slot` holds in the primary match.
    pub fn matched(&self, slot: usize) -> u32 {
        self.primary().blocks.matched(slot)
    }
}

/// Everything a plugin may read for one pick.
pub struct SchedCtx<'a> {
    pub snapshot: &'a Snapshot,
    pub request: &'a ParsedRequest,
    pub prefix: &'a PrefixMatches,
    /// What the front-end and the producers attached to the request.
    pub data: &'a RequestData,
}

impl SchedCtx<'_> {
    pub fn ep(&self, i: usize) -> &EndpointView {
        &self.snapshot.endpoints[i]
    }
}

/// Per-request data beside the body: the request headers plugins asked for, and what producers
/// computed before filters and scorers ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestData {
    /// The request headers the configured plugins read ([`Scheduler::request_headers`]),
    /// lower-case names, as the front-end received them.
    pub headers: Vec<(String, String)>,
    /// The prompt's length in tokens, from the `token-producer` (its `estimate` backend: 4 bytes
    /// of prompt text per token, rounded up).
    pub prompt_tokens: Option<u64>,
    /// The prompt's token ids, when a `token-producer` backend with a real tokenizer produced
    /// them (the model server's tokenize/render endpoint or a local `tokenizer.json`); `None`
    /// with the `estimate` backend. Precise prefix routing keys its lookups by them.
    pub token_ids: Option<Arc<[u32]>>,
    /// Tokens per block of the approximate prefix match (the director sets it; scorers read
    /// [`SourceMatch::block_tokens`]).
    pub prefix_block_tokens: u64,
}

/// No headers, nothing produced.
pub static NO_DATA: RequestData = RequestData {
    headers: Vec::new(),
    prompt_tokens: None,
    token_ids: None,
    prefix_block_tokens: 0,
};

impl RequestData {
    /// A header's value (`name` lower-case), if the front-end passed it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a pick was made (the `decision_type` label of `epp_routing_decisions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionType {
    CacheHit,
    LoadBalance,
    HealthCheck,
    NoEndpoint,
}

impl DecisionType {
    pub fn as_str(&self) -> &'static str {
        match self {
            DecisionType::CacheHit => "cache_hit",
            DecisionType::LoadBalance => "load_balance",
            DecisionType::HealthCheck => "health_check",
            DecisionType::NoEndpoint => "no_endpoint",
        }
    }
    pub const ALL: [DecisionType; 4] = [
        DecisionType::CacheHit,
        DecisionType::LoadBalance,
        DecisionType::HealthCheck,
        DecisionType::NoEndpoint,
    ];
}

/// A successful schedule: snapshot indices, best first, then fallbacks.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub ranked: Vec<usize>,
    pub decision: DecisionType,
    /// Weighted total score of each ranked endpoint (same order), for logs.
    pub scores: Vec<f64>,
    /// The profile that ran (index into [`Scheduler::profiles`]); `None` for a forced pick.
    pub profile: Option<usize>,
    /// The candidates the profile's filters kept (snapshot indices).
    pub cands: Vec<usize>,
    /// What a disaggregating profile handler decided (`None` with the other handlers).
    pub disagg: Option<Disaggregation>,
    /// The data-parallel handler's `primaryPort`: the pick goes out as
    /// `x-data-parallel-host-port`, the request to this port of the picked pod.
    pub data_parallel_port: Option<u16>,
}

/// One extra stage's pick (the prefill profile's).
#[derive(Clone, Debug)]
pub struct StagePick {
    /// The profile that ran (index into [`Scheduler::profiles`]).
    pub profile: usize,
    /// Snapshot indices, best first.
    pub ranked: Vec<usize>,
    pub cands: Vec<usize>,
}

/// A disaggregating handler's outcome for one request.
#[derive(Clone, Debug)]
pub struct Disaggregation {
    /// The prefill pick, when the prefill stage ran and found an endpoint.
    pub prefill: Option<StagePick>,
    /// The decider agreed to run the prefill stage (it may still have found no endpoint).
    pub decided: bool,
    /// The handler records `pd_decision_total` (the deprecated `pd-profile-handler`) rather
    /// than `disagg_decision_total`.
    pub legacy_pd_metric: bool,
}

impl Disaggregation {
    /// The `decision_type` label of the decision metrics.
    pub fn decision_type(&self) -> &'static str {
        let prefill = if self.legacy_pd_metric {
            self.decided
        } else {
            self.prefill.is_some()
        };
        if prefill {
            "prefill-decode"
        } else {
            "decode-only"
        }
    }
}

/// Why nothing could be picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no endpoints are known to the picker")]
    NoEndpoints,
    #[error("no endpoint matches the subset hint ({0})")]
    EmptySubset(String),
    #[error("no healthy endpoint: {0}")]
    NoHealthy(String),
    #[error("all candidate endpoints are saturated")]
    Saturated,
    #[error("no known endpoint matches test-epp-endpoint-selection {0:?}")]
    NoForcedMatch(String),
}

/// What the gateway says about where a request may go, beside the request itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints<'a> {
    /// The gateway's subset hint: only these addresses may be picked.
    pub subset: Option<&'a [String]>,
    /// A forced pick (comma list of `ip:port` or bare IPs, in order), bypassing filters and
    /// scorers. Front-ends pass it only with the conformance hooks on.
    pub forced: Option<&'a str>,
}

/// Observes per-plugin latency (the metrics module implements it).
pub trait PluginObserver: Send + Sync {
    fn observe(&self, plugin: &PluginLabels, seconds: f64);
}

struct NoopObserver;
impl PluginObserver for NoopObserver {
    fn observe(&self, _: &PluginLabels, _: f64) {}
}

/// One scheduling profile.
pub struct Profile {
    pub name: String,
    pub filters: Vec<Arc<dyn Filter>>,
    pub scorers: Vec<(Arc<dyn Scorer>, f64)>,
    pub picker: Arc<dyn Picker>,
    /// Metric labels of the profile's plugins, built once: filters, then scorers, then the
    /// picker.
    labels: Vec<PluginLabels>,
}

pub struct Scheduler {
    /// Every configured profile, in config order.
    profiles: Vec<Profile>,
    /// Chooses which profiles run for a request.
    handler: Arc<dyn ProfileHandler>,
    /// What the handler resolved to against the profiles: what runs per request.
    plan: HandlerPlan,
    /// Data producers, in config order (an implicit estimating `token-producer` when none is
    /// configured).
    producers: Vec<Arc<dyn Producer>>,
    prefix: PrefixPlan,
    /// The precise producer, when one is configured (its name and settings).
    precise: Option<(String, Arc<crate::precise::Settings>)>,
    /// The source the first prefix scorer reads.
    prefix_primary: PrefixSource,
    /// Request headers any scorer reads (lower-case, distinct).
    request_headers: Vec<String>,
    /// The first prefix-cache scorer configured (type, name): the prefix index's owner in
    /// llm-d-router's prefix indexer metrics.
    prefix_plugin: Option<(&'static str, String)>,
    observer: Arc<dyn PluginObserver>,
    /// The config's parsers: which requests have their body read.
    parsers: crate::parsers::RequestHandling,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("handler", &self.handler.name())
            .field("plugins", &self.describe())
            .finish()
    }
}

impl Scheduler {
    /// Build from a validated config. Errors name the field at fault.
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Self, ConfigError> {
        let mut built: Vec<(String, Plugin)> = Vec::new();
        let mut prefix_plugin = None;
        let mut handler: Option<(usize, Arc<dyn ProfileHandler>)> = None;
        let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
        let mut consumers: Vec<PrefixConsumer> = Vec::new();
        let mut embedded: Vec<(usize, Arc<dyn Producer>)> = Vec::new();
        let mut scorers: Vec<Arc<dyn Scorer>> = Vec::new();
        for (i, spec) in cfg.plugins.iter().enumerate() {
            let field = format!("plugins[{i}]");
            if built.iter().any(|(n, _)| n == spec.name()) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!("duplicate plugin name {:?}", spec.name()),
                ));
            }
            if crate::datalayer::is_type(&spec.type_)
                || crate::parsers::is_type(&spec.type_)
                || crate::admission::is_type(&spec.type_)
            {
                // Built by the data layer, the request handler and flow control, not the
                // scheduler.
                continue;
            }
            let plugin = plugins::build(spec, &field)?;
            match &plugin {
                Plugin::Scorer(s) => {
                    if let Some(c) = s.prefix_consumer() {
                        if prefix_plugin.is_none() {
                            prefix_plugin = Some((s.type_name(), s.name().to_string()));
                        }
                        consumers.push(c);
                    }
                    if let Some(p) = s.embedded_producer() {
                        embedded.push((i, p));
                    }
                    scorers.push(s.clone());
                }
                Plugin::Producer(p) => producers.push(p.clone()),
                Plugin::ProfileHandler(h) => {
                    if handler.is_some() {
                        return Err(ConfigError::new(
                            format!("{field}.type"),
                            "only one profile handler may be configured",
                        ));
                    }
                    handler = Some((i, h.clone()));
                }
                _ => {}
            }
            built.push((spec.name().to_string(), plugin));
        }
        let precise = resolve_precise(cfg, &built, &embedded)?;
        let prefix = resolve_prefix(cfg, &built, &consumers, precise.as_ref())?;
        let source_of = |c: &PrefixConsumer| match (&c.producer, &precise) {
            _ if c.precise => PrefixSource::Precise,
            (Some(n), Some((pn, _))) if n == pn => PrefixSource::Precise,
            _ => PrefixSource::Approximate,
        };
        for s in &scorers {
            if let Some(c) = s.prefix_consumer() {
                s.bind_prefix(source_of(&c));
            }
        }
        let prefix_primary = consumers
            .first()
            .map_or(PrefixSource::Approximate, source_of);
        if !producers.iter().any(|p| {
            p.type_name() == plugins::TOKEN_PRODUCER
                || p.type_name() == plugins::LEGACY_TOKEN_PRODUCER
        }) {
            // As llm-d: the prefix index consumes token estimates, so an estimating token producer
            // runs when none is configured.
            producers.insert(0, Arc::new(plugins::TokenProducer::default()));
        }
        // No profiles: as llm-d-router, one `default` profile of every filter, scorer and
        // picker configured (weight 1), in config order.
        let implicit;
        let specs = if cfg.scheduling_profiles.is_empty() {
            implicit = [crate::config::ProfileSpec {
                name: "default".into(),
                plugins: built
                    .iter()
                    .filter(|(_, p)| !matches!(p, Plugin::ProfileHandler(_) | Plugin::Decider(_)))
                    .map(|(n, _)| crate::config::ProfilePluginRef {
                        plugin_ref: n.clone(),
                        weight: None,
                    })
                    .collect(),
            }];
            &implicit[..]
        } else {
            &cfg.scheduling_profiles[..]
        };
        let mut profiles = Vec::with_capacity(specs.len());
        for (pi, pspec) in specs.iter().enumerate() {
            profiles.push(build_profile(pi, pspec, &built)?);
        }
        let mut request_headers: Vec<String> = Vec::new();
        for p in &profiles {
            for (s, _) in &p.scorers {
                for h in s.request_headers() {
                    if !request_headers.contains(&h) {
                        request_headers.push(h);
                    }
                }
            }
        }
        let (handler_at, handler) = handler.unwrap_or_else(|| {
            (
                usize::MAX,
                Arc::new(plugins::SingleProfileHandler::default()),
            )
        });
        let plan = handler.plan(&profiles, &built).map_err(|(key, msg)| {
            let at = format!("plugins[{handler_at}].parameters");
            ConfigError::new(
                if key.is_empty() {
                    at
                } else {
                    format!("{at}.{key}")
                },
                msg,
            )
        })?;
        let parsers = crate::parsers::RequestHandling::from_config(cfg)?;
        Ok(Self {
            profiles,
            handler,
            plan,
            producers,
            prefix,
            precise,
            prefix_primary,
            prefix_plugin,
            request_headers,
            observer: Arc::new(NoopObserver),
            parsers,
        })
    }

    pub fn with_observer(mut self, observer: Arc<dyn PluginObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// The config's parsers (`requestHandler.parsers`).
    pub fn parsers(&self) -> &crate::parsers::RequestHandling {
        &self.parsers
    }

    /// The prefix-index parameters (from the prefix producer or the scorer, or defaults).
    pub fn prefix_config(&self) -> PrefixConfig {
        self.prefix.index
    }

    /// How the director runs the approximate prefix index for this configuration.
    pub fn prefix_plan(&self) -> PrefixPlan {
        self.prefix
    }

    /// The precise producer's name and settings, when one runs.
    pub fn precise(&self) -> Option<(&str, &Arc<crate::precise::Settings>)> {
        self.precise.as_ref().map(|(n, s)| (n.as_str(), s))
    }

    /// The source the first prefix scorer reads (routing decisions and cache metrics follow it).
    pub fn prefix_primary(&self) -> PrefixSource {
        self.prefix_primary
    }

    /// The prefix-cache scorer owning the prefix index (type, name), if one is configured.
    pub fn prefix_plugin(&self) -> Option<(&'static str, &str)> {
        self.prefix_plugin.as_ref().map(|(t, n)| (*t, n.as_str()))
    }

    /// Request headers the configured plugins read (lower-case): front-ends pass these in
    /// [`RequestData::headers`].
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    /// The data producers, in the order they run.
    pub fn producers(&self) -> &[Arc<dyn Producer>] {
        &self.producers
    }

    /// Await every producer's I/O step ([`Producer::prepare`]: remote tokenization) for one
    /// request, in producer order, before [`produce`](Self::produce). Never fails the request.
    pub async fn prepare(
        &self,
        request: &ParsedRequest,
        data: &mut RequestData,
        metrics: &plugins::TokenizerMetrics,
    ) {
        for p in &self.producers {
            if let Some(step) = p.prepare(request, data, metrics) {
                step.await;
            }
        }
    }

    /// Run every producer over one request, adding to `data` (which carries the headers).
    pub fn produce(&self, request: &ParsedRequest, data: &mut RequestData) {
        for p in &self.producers {
            p.produce(request, data);
        }
    }

    /// After a pick, before forwarding: the profile's scorers learn the outcome (e.g. session
    /// bindings, the cold-request LRU). Forced picks teach nothing.
    pub fn pre_request(&self, ctx: &SchedCtx<'_>, schedule: &Schedule) {
        let prefill = schedule
            .disagg
            .as_ref()
            .and_then(|d| d.prefill.as_ref())
            .map(|p| (Some(p.profile), &p.ranked, &p.cands));
        let stages =
            std::iter::once((schedule.profile, &schedule.ranked, &schedule.cands)).chain(prefill);
        for (pi, ranked, cands) in stages {
            let (Some(pi), Some(&picked)) = (pi, ranked.first()) else {
                continue;
            };
            let Some(profile) = self.profiles.get(pi) else {
                continue;
            };
            let run = ProfileRun {
                profile: &profile.name,
                cands,
                picked,
            };
            for (s, _) in &profile.scorers {
                s.pre_request(ctx, &run);
            }
        }
    }

    /// Response headers for a request profile `profile` routed and `served` answers.
    pub fn response_headers(
        &self,
        profile: Option<usize>,
        served: &Endpoint,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(p) = profile.and_then(|pi| self.profiles.get(pi)) {
            for (s, _) in &p.scorers {
                s.response_headers(&p.name, served, &mut out);
            }
        }
        out
    }

    /// The index of the primary profile the handler runs (the decode profile when it
    /// disaggregates).
    pub fn profile_index(&self) -> usize {
        match &self.plan {
            HandlerPlan::Single { profile } | HandlerPlan::DataParallel { profile, .. } => *profile,
            HandlerPlan::Disagg(p) => p.decode,
        }
    }

    /// The primary profile the handler runs for requests (with the single-profile handler: the
    /// one named `default`, else the first).
    pub fn profile(&self) -> &Profile {
        &self.profiles[self.profile_index()]
    }

    /// What the profile handler runs per request.
    pub fn plan(&self) -> &HandlerPlan {
        &self.plan
    }

    /// The profile handler (its type and name label the decision metrics).
    pub fn handler(&self) -> &Arc<dyn ProfileHandler> {
        &self.handler
    }

    /// Every configured profile, in config order.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// A one-line description for start-up logs.
    pub fn describe(&self) -> String {
        let p = self.profile();
        let mut parts: Vec<String> = p
            .filters
            .iter()
            .map(|f| format!("filter:{}", f.name()))
            .collect();
        parts.extend(
            p.scorers
                .iter()
                .map(|(s, w)| format!("scorer:{}*{w}", s.name())),
        );
        parts.push(format!("picker:{}", p.picker.name()));
        let extra = match &self.plan {
            HandlerPlan::Disagg(d) => match &d.prefill {
                Some((pi, Some(decider))) => format!(
                    "; prefill profile {:?} when {} agrees",
                    self.profiles[*pi].name,
                    decider.name()
                ),
                Some((pi, None)) => {
                    format!(
                        "; prefill profile {:?} for every request",
                        self.profiles[*pi].name
                    )
                }
                None => "; no prefill stage".to_string(),
            },
            HandlerPlan::DataParallel { primary_port, .. } => {
                format!("; data-parallel, primary port {primary_port}")
            }
            HandlerPlan::Single { .. } => String::new(),
        };
        format!(
            "{} runs profile {:?} [{}] (of {}){extra}",
            self.handler.name(),
            p.name,
            parts.join(", "),
            self.profiles.len()
        )
    }

    /// Schedule one request. `hints.subset`, when given, restricts candidates to those
    /// addresses (port-insensitive when an entry has no port); `hints.forced` picks exactly the
    /// named endpoints.
    pub fn schedule(
        &self,
        ctx: &SchedCtx<'_>,
        hints: &Hints<'_>,
    ) -> Result<Schedule, ScheduleError> {
        if let Some(forced) = hints.forced {
            return forced_schedule(ctx, forced);
        }
        let subset = hints.subset;
        let snap = ctx.snapshot;
        if snap.endpoints.is_empty() {
            return Err(ScheduleError::NoEndpoints);
        }
        let mut cands: Vec<usize> = (0..snap.endpoints.len()).collect();
        if let Some(subset) = subset {
            cands.retain(|&i| in_subset(snap.endpoints[i].endpoint.address(), subset));
            if cands.is_empty() {
                return Err(ScheduleError::EmptySubset(if subset.is_empty() {
                    "the hint is empty".into()
                } else {
                    subset.join(",")
                }));
            }
        }
        let prefix_before = had_prefix(ctx, &cands);
        // Implicit health filter: healthy ones; if none, stale ones (old data beats no answer).
        let healthy: Vec<usize> = cands
            .iter()
            .copied()
            .filter(|&i| snap.endpoints[i].health == HealthState::Healthy)
            .collect();
        let cands = if !healthy.is_empty() {
            healthy
        } else {
            let stale: Vec<usize> = cands
                .iter()
                .copied()
                .filter(|&i| snap.endpoints[i].health == HealthState::Stale)
                .collect();
            if stale.is_empty() {
                let states: Vec<String> = cands
                    .iter()
                    .map(|&i| {
                        let e = &snap.endpoints[i];
                        format!("{}={}", e.endpoint.name(), e.health.as_str())
                    })
                    .collect();
                return Err(ScheduleError::NoHealthy(states.join(", ")));
            }
            stale
        };
        match &self.plan {
            HandlerPlan::Single { profile } => {
                self.run_profile(*profile, ctx, cands, prefix_before)
            }
            HandlerPlan::DataParallel {
                profile,
                primary_port,
            } => {
                let mut s = self.run_profile(*profile, ctx, cands, prefix_before)?;
                s.data_parallel_port = Some(*primary_port);
                Ok(s)
            }
            HandlerPlan::Disagg(plan) => self.run_disagg(plan, ctx, cands, prefix_before),
        }
    }

    /// Decode, then prefill when the decider agrees (or always, with no decider). The prefill
    /// stage never picks the decode pick itself (that endpoint computes the prompt anyway), and
    /// a prefill stage that finds no endpoint leaves the request decode-only.
    fn run_disagg(
        &self,
        plan: &plugins::DisaggPlan,
        ctx: &SchedCtx<'_>,
        cands: Vec<usize>,
        prefix_before: bool,
    ) -> Result<Schedule, ScheduleError> {
        let mut decode = self.run_profile(plan.decode, ctx, cands.clone(), prefix_before)?;
        let picked = decode.ranked[0];
        let (decided, prefill) = match &plan.prefill {
            None => (false, None),
            Some((pi, decider)) => {
                let decided = decider
                    .as_ref()
                    .is_none_or(|d| d.disaggregate(ctx, Some(picked)));
                let pick = if decided {
                    let others: Vec<usize> = cands.into_iter().filter(|&i| i != picked).collect();
                    if others.is_empty() {
                        None
                    } else {
                        match self.run_profile(*pi, ctx, others, prefix_before) {
                            Ok(p) => Some(StagePick {
                                profile: *pi,
                                ranked: p.ranked,
                                cands: p.cands,
                            }),
                            Err(e) => {
                                tracing::debug!(error = %e, "prefill stage found no endpoint; decode-only");
                                None
                            }
                        }
                    }
                } else {
                    None
                };
                (decided, pick)
            }
        };
        decode.disagg = Some(Disaggregation {
            prefill,
            decided,
            legacy_pd_metric: plan.legacy_pd_metric,
        });
        decode.data_parallel_port = plan.primary_port;
        Ok(decode)
    }

    /// Run profile `profile_index`'s filters, scorers and picker over eligible `cands`.
    fn run_profile(
        &self,
        profile_index: usize,
        ctx: &SchedCtx<'_>,
        mut cands: Vec<usize>,
        prefix_before: bool,
    ) -> Result<Schedule, ScheduleError> {
        let profile = &self.profiles[profile_index];
        let nf = profile.filters.len();
        for (k, f) in profile.filters.iter().enumerate() {
            let t = Instant::now();
            let before = cands.len();
            f.filter(ctx, &mut cands);
            self.observer
                .observe(&profile.labels[k], t.elapsed().as_secs_f64());
            if cands.is_empty() {
                return Err(if f.empty_means_saturated() {
                    ScheduleError::Saturated
                } else {
                    ScheduleError::NoHealthy(format!(
                        "filter {:?} removed all {before} candidates",
                        f.name()
                    ))
                });
            }
        }
        let mut totals = vec![0.0f64; cands.len()];
        let mut buf = vec![0.0f64; cands.len()];
        for (k, (s, w)) in profile.scorers.iter().enumerate() {
            let t = Instant::now();
            buf.iter_mut().for_each(|v| *v = 0.0);
            s.score(ctx, &cands, &mut buf);
            self.observer
                .observe(&profile.labels[nf + k], t.elapsed().as_secs_f64());
            for (tot, v) in totals.iter_mut().zip(&buf) {
                // Plugins promise [0,1]; clamp defensively so one bad value cannot dominate.
                let v = if v.is_finite() {
                    v.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                *tot += w * v;
            }
        }
        let t = Instant::now();
        let order = profile.picker.pick(ctx, &cands, &totals);
        if let Some(l) = profile.labels.last() {
            self.observer.observe(l, t.elapsed().as_secs_f64());
        }
        let ranked: Vec<usize> = order.iter().map(|&k| cands[k]).collect();
        let scores: Vec<f64> = order.iter().map(|&k| totals[k]).collect();
        let first = ranked[0];
        let decision = if ctx.prefix.matched(ctx.ep(first).slot()) > 0 {
            DecisionType::CacheHit
        } else if prefix_before && !had_prefix(ctx, &cands) {
            DecisionType::HealthCheck
        } else {
            DecisionType::LoadBalance
        };
        Ok(Schedule {
            ranked,
            decision,
            scores,
            profile: Some(profile_index),
            cands,
            disagg: None,
            data_parallel_port: None,
        })
    }
}

/// Whether any of `cands` holds a prefix of the request.
fn had_prefix(ctx: &SchedCtx<'_>, cands: &[usize]) -> bool {
    cands
        .iter()
        .any(|&i| ctx.prefix.matched(ctx.ep(i).slot()) > 0)
}

/// The one approximate prefix index a configuration runs: an explicit
/// `approx-prefix-cache-producer`, else the index parameters given on a `prefix-cache-scorer`
/// (the GAIE-era form), else llm-d's default producer when a scorer needs prefix data, else the
/// built-in default (the index still feeds the cache-hit metrics).
/// The one precise producer: an explicit `precise-prefix-cache-producer`, else the one a legacy
/// `precise-prefix-cache-scorer` brings (which, with an explicit producer, reads that one and
/// ignores its own parameters, as in llm-d).
fn resolve_precise(
    cfg: &EndpointPickerConfig,
    built: &[(String, Plugin)],
    embedded: &[(usize, Arc<dyn Producer>)],
) -> Result<Option<(String, Arc<crate::precise::Settings>)>, ConfigError> {
    let mut found: Option<(usize, String, Arc<crate::precise::Settings>)> = None;
    for (i, (name, p)) in built.iter().enumerate() {
        let Plugin::Producer(p) = p else { continue };
        let Some(s) = p.precise() else { continue };
        if let Some((first, ..)) = &found {
            return Err(ConfigError::new(
                format!("plugins[{i}].type"),
                format!(
                    "epp runs one precise prefix index: plugins[{first}] ({:?}) is a precise-prefix-cache-producer already",
                    cfg.plugins[*first].name()
                ),
            ));
        }
        found = Some((i, name.clone(), s));
    }
    if let Some((_, name, s)) = found {
        for (i, _) in embedded {
            tracing::warn!(
                plugin = %format!("plugins[{i}]"),
                producer = %name,
                "precise-prefix-cache-scorer reads the configured precise-prefix-cache-producer; its own parameters are ignored"
            );
        }
        return Ok(Some((name, s)));
    }
    match embedded {
        [] => Ok(None),
        [(_, p)] => Ok(p.precise().map(|s| (p.name().to_string(), s))),
        [(first, _), (i, _), ..] => Err(ConfigError::new(
            format!("plugins[{i}].type"),
            format!("epp runs one precise prefix index: plugins[{first}] is a precise-prefix-cache-scorer already; configure one precise-prefix-cache-producer and point prefix-cache-scorers at it"),
        )),
    }
}

fn resolve_prefix(
    cfg: &EndpointPickerConfig,
    built: &[(String, Plugin)],
    consumers: &[PrefixConsumer],
    precise: Option<&(String, Arc<crate::precise::Settings>)>,
) -> Result<PrefixPlan, ConfigError> {
    let mut explicit: Option<(usize, PrefixPlan)> = None;
    for (i, (_, p)) in built.iter().enumerate() {
        let Plugin::Producer(p) = p else { continue };
        let Some(plan) = p.prefix_plan() else {
            continue;
        };
        match explicit {
            Some((first, other)) if other != plan => {
                return Err(ConfigError::new(
                    format!("plugins[{i}].parameters"),
                    format!(
                        "epp runs one approximate prefix index: this {} is configured differently from plugins[{first}] ({:?}); give them the same parameters or keep one",
                        p.type_name(),
                        cfg.plugins[first].name()
                    ),
                ));
            }
            Some(_) => {}
            None => explicit = Some((i, plan)),
        }
    }
    let mut legacy: Option<PrefixConfig> = None;
    for c in consumers {
        if let Some(name) = &c.producer {
            match built.iter().find(|(n, _)| n == name) {
                Some((_, Plugin::Producer(p))) if p.prefix_plan().is_some() => {}
                Some((_, Plugin::Producer(p))) if p.precise().is_some() => {}
                _ if precise.is_some_and(|(n, _)| n == name) => {}
                Some(_) => {
                    return Err(ConfigError::new(
                        c.field.clone(),
                        format!("plugin {name:?} does not produce prefix-cache match info (it is neither an approx- nor a precise-prefix-cache-producer)"),
                    ))
                }
                None => {
                    return Err(ConfigError::new(
                        c.field.clone(),
                        format!("no plugin named {name:?} in `plugins` (expected an approx-prefix-cache-producer or a precise-prefix-cache-producer)"),
                    ))
                }
            }
        }
        if let Some(l) = c.legacy {
            if let Some((first, _)) = explicit {
                return Err(ConfigError::new(
                    c.field.clone(),
                    format!(
                        "index parameters on the scorer conflict with the approx-prefix-cache-producer at plugins[{first}]; set them on the producer"
                    ),
                ));
            }
            if legacy.is_some_and(|p| p != l) {
                return Err(ConfigError::new(
                    c.field.clone(),
                    "all prefix-cache-scorer plugins must share one index configuration",
                ));
            }
            legacy = Some(l);
        }
    }
    Ok(match (explicit, legacy) {
        (Some((_, plan)), _) => plan,
        (None, Some(index)) => PrefixPlan {
            index,
            bound: ServerBound::Min,
            blocks: BlockPlan::Fixed,
        },
        (None, None) if !consumers.is_empty() => plugins::producers::approx_prefix::default_plan(),
        (None, None) => PrefixPlan::default(),
    })
}

/// Build profile `pi` from its spec over the built plugins.
fn build_profile(
    pi: usize,
    pspec: &crate::config::ProfileSpec,
    built: &[(String, Plugin)],
) -> Result<Profile, ConfigError> {
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<Arc<dyn Picker>> = None;
    for (j, r) in pspec.plugins.iter().enumerate() {
        let field = format!("schedulingProfiles[{pi}].plugins[{j}]");
        let Some((_, p)) = built.iter().find(|(n, _)| *n == r.plugin_ref) else {
            return Err(ConfigError::new(
                format!("{field}.pluginRef"),
                format!("no plugin named {:?} in `plugins`", r.plugin_ref),
            ));
        };
        let no_weight = || {
            if r.weight.is_some() {
                Err(ConfigError::new(
                    format!("{field}.weight"),
                    "only scorers take a weight",
                ))
            } else {
                Ok(())
            }
        };
        match p {
            // Producers run for every request before any profile; llm-d configs may list them
            // in a profile too.
            Plugin::Producer(_) => no_weight()?,
            Plugin::Filter(f) => {
                no_weight()?;
                filters.push(f.clone())
            }
            Plugin::Scorer(s) => {
                let w = r.weight.unwrap_or(1.0);
                if !w.is_finite() || w < 0.0 {
                    return Err(ConfigError::new(
                        format!("{field}.weight"),
                        "must be a finite number >= 0",
                    ));
                }
                scorers.push((s.clone(), w));
            }
            Plugin::Picker(k) => {
                if picker.is_some() {
                    return Err(ConfigError::new(
                        format!("{field}.pluginRef"),
                        "a profile takes exactly one picker",
                    ));
                }
                no_weight()?;
                picker = Some(k.clone());
            }
            Plugin::ProfileHandler(_) => {
                return Err(ConfigError::new(
                    format!("{field}.pluginRef"),
                    format!(
                        "{:?} is a profile handler: it chooses between profiles and is configured in `plugins` only",
                        r.plugin_ref
                    ),
                ))
            }
            Plugin::Decider(_) => {
                return Err(ConfigError::new(
                    format!("{field}.pluginRef"),
                    format!(
                        "{:?} is a decider: a profile handler asks it (deciders.prefill) and it is configured in `plugins` only",
                        r.plugin_ref
                    ),
                ))
            }
        }
    }
    let picker = picker.unwrap_or_else(|| Arc::new(plugins::MaxScorePicker::default()));
    let labels = filters
        .iter()
        .map(|f| PluginLabels::new("Filter", f.type_name(), f.name()))
        .chain(
            scorers
                .iter()
                .map(|(s, _)| PluginLabels::new("Scorer", s.type_name(), s.name())),
        )
        .chain(std::iter::once(PluginLabels::new(
            "Picker",
            picker.type_name(),
            picker.name(),
        )))
        .collect();
    Ok(Profile {
        name: pspec.name.clone(),
        filters,
        scorers,
        picker,
        labels,
    })
}

/// The conformance hook's forced pick: the named endpoints in the order given. `ip:port` matches
/// exactly; a bare `ip` matches every port of that host.
fn forced_schedule(ctx: &SchedCtx<'_>, forced: &str) -> Result<Schedule, ScheduleError> {
    let snap = ctx.snapshot;
    let mut ranked = Vec::new();
    for w in forced.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        for (i, e) in snap.endpoints.iter().enumerate() {
            let hit = if w.contains(':') && !w.ends_with(']') {
                e.endpoint.address() == w
            } else {
                in_subset(e.endpoint.address(), &[w.to_string()])
            };
            if hit && !ranked.contains(&i) {
                ranked.push(i);
            }
        }
    }
    let Some(&first) = ranked.first() else {
        return Err(ScheduleError::NoForcedMatch(forced.to_string()));
    };
    let decision = if ctx.prefix.matched(ctx.ep(first).slot()) > 0 {
        DecisionType::CacheHit
    } else {
        DecisionType::LoadBalance
    };
    Ok(Schedule {
        scores: vec![0.0; ranked.len()],
        ranked,
        decision,
        profile: None,
        cands: Vec::new(),
        disagg: None,
        data_parallel_port: None,
    })
}

/// Subset entries are `ip:port` or bare `ip`; as in GAIE, the port is ignored.
pub fn in_subset(address: &str, subset: &[String]) -> bool {
    let host = host_of(address);
    subset.iter().any(|s| host_of(s) == host)
}

fn host_of(s: &str) -> &str {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => s,
    }
}
