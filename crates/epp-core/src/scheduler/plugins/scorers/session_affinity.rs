//! `session-affinity-scorer`: keeps a session on one endpoint, with llm-d's two strategies.
//!
//! - `encoded_endpoint_header` (default): the response carries the serving endpoint's identity
//!   (`namespace/pod`, or the endpoint name outside Kubernetes), base64-encoded, in the session
//!   header (`x-session-token` unless `encodedEndpointHeaderConfig.header` says otherwise); a
//!   request that sends it back scores 1 on that endpoint and 0 elsewhere.
//! - `session_id`: the client names its session in a header (`x-session-id` unless
//!   `sessionIdConfig.sources` says otherwise); the picker binds the session to the endpoint it
//!   picks and scores that endpoint 1 while the binding lives (`evictionTtlSeconds` since last
//!   use). A binding moves only when its endpoint is no longer a candidate.
//!
//! `profileName`, when set, limits the scorer's bookkeeping to that profile's outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::datastore::Endpoint;
use crate::scheduler::plugins::{params, Plugin, ProfileRun, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "session-affinity-scorer";
pub const STRATEGY_ENCODED_ENDPOINT_HEADER: &str = "encoded_endpoint_header";
pub const STRATEGY_SESSION_ID: &str = "session_id";
/// llm-d's session header of the `encoded_endpoint_header` strategy.
pub const DEFAULT_HEADER: &str = "x-session-token";
/// llm-d's session header of the `session_id` strategy.
pub const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";
pub const DEFAULT_EVICTION_TTL_SECONDS: f64 = 300.0;
pub const DEFAULT_EVICTION_SWEEP_SECONDS: f64 = 10.0;
/// Sessions bound at most by one `session_id` scorer; past it the least recently used binding
/// is dropped.
pub const MAX_SESSIONS: usize = 100_000;
/// Longest session header value read (longer ones are ignored).
pub const MAX_SESSION_ID_BYTES: usize = 1024;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionAffinityParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoded_endpoint_header_config: Option<EncodedEndpointHeaderConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id_config: Option<SessionIdConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EncodedEndpointHeaderConfig {
    #[serde(default)]
    pub header: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionIdConfig {
    #[serde(default)]
    pub sources: Vec<SessionIdSource>,
    #[serde(default)]
    pub eviction_ttl_seconds: f64,
    #[serde(default)]
    pub eviction_sweep_seconds: f64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionIdSource {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub attribute: String,
    #[serde(default)]
    pub producer: String,
}

/// A header name as llm-d compares it: trimmed, lower-case; empty means the default.
fn normalize_header(name: &str, default: &str) -> String {
    let h = name.trim().to_ascii_lowercase();
    if h.is_empty() {
        default.to_string()
    } else {
        h
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: SessionAffinityParams = params(spec, field)?;
    let at = |k: &str| format!("{field}.parameters.{k}");
    let profile = p.profile_name.clone().filter(|s| !s.is_empty());
    let strategy = match p.strategy.as_deref().unwrap_or(STRATEGY_ENCODED_ENDPOINT_HEADER) {
        STRATEGY_ENCODED_ENDPOINT_HEADER => {
            if p.session_id_config.is_some() {
                return Err(ConfigError::new(
                    at("sessionIdConfig"),
                    format!("applies to strategy {STRATEGY_SESSION_ID:?} only"),
                ));
            }
            let header = p
                .encoded_endpoint_header_config
                .as_ref()
                .map_or(String::new(), |c| c.header.clone());
            Strategy::EncodedHeader {
                header: normalize_header(&header, DEFAULT_HEADER),
            }
        }
        STRATEGY_SESSION_ID => {
            if p.encoded_endpoint_header_config.is_some() {
                return Err(ConfigError::new(
                    at("encodedEndpointHeaderConfig"),
                    format!("applies to strategy {STRATEGY_ENCODED_ENDPOINT_HEADER:?} only"),
                ));
            }
            let c = p.session_id_config.clone().unwrap_or_default();
            let mut headers = Vec::new();
            for (i, s) in c.sources.iter().enumerate() {
                let f = at(&format!("sessionIdConfig.sources[{i}]"));
                if s.header.is_empty() == s.attribute.is_empty() {
                    return Err(ConfigError::new(f, "exactly one of header or attribute must be set"));
                }
                if !s.attribute.is_empty() {
                    return Err(ConfigError::new(
                        format!("{f}.attribute"),
                        "session ids from request attributes need a data producer epp does not implement; use a header source",
                    ));
                }
                if !s.producer.is_empty() {
                    return Err(ConfigError::new(
                        format!("{f}.producer"),
                        "applies to attribute sources only",
                    ));
                }
                headers.push(normalize_header(&s.header, DEFAULT_SESSION_ID_HEADER));
            }
            if headers.is_empty() {
                headers.push(DEFAULT_SESSION_ID_HEADER.to_string());
            }
            let secs = |v: f64, default: f64, name: &str| {
                let v = if v == 0.0 { default } else { v };
                if !v.is_finite() || v <= 0.0 || v > 31_536_000.0 {
                    return Err(ConfigError::new(
                        at(&format!("sessionIdConfig.{name}")),
                        format!("must be > 0 seconds (and at most a year), got {v}"),
                    ));
                }
                Ok(Duration::from_secs_f64(v))
            };
            Strategy::SessionId(SessionBindings {
                headers,
                ttl: secs(c.eviction_ttl_seconds, DEFAULT_EVICTION_TTL_SECONDS, "evictionTtlSeconds")?,
                sweep: secs(
                    c.eviction_sweep_seconds,
                    DEFAULT_EVICTION_SWEEP_SECONDS,
                    "evictionSweepSeconds",
                )?,
                state: Mutex::new(Bindings {
                    map: HashMap::new(),
                    last_sweep: Instant::now(),
                }),
            })
        }
        other => {
            return Err(ConfigError::new(
                at("strategy"),
                format!(
                    "must be {STRATEGY_ENCODED_ENDPOINT_HEADER:?} or {STRATEGY_SESSION_ID:?}, got {other:?}"
                ),
            ))
        }
    };
    Ok(Plugin::Scorer(Arc::new(SessionAffinityScorer {
        name: spec.name().to_string(),
        profile,
        strategy,
    })))
}

enum Strategy {
    EncodedHeader { header: String },
    SessionId(SessionBindings),
}

struct SessionBindings {
    headers: Vec<String>,
    ttl: Duration,
    sweep: Duration,
    state: Mutex<Bindings>,
}

struct Bindings {
    /// Session id → (endpoint id, last used).
    map: HashMap<String, (String, Instant)>,
    last_sweep: Instant,
}

impl SessionBindings {
    fn session_id<'a>(&self, ctx: &'a SchedCtx<'_>) -> Option<&'a str> {
        self.headers.iter().find_map(|h| {
            ctx.data
                .header(h)
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= MAX_SESSION_ID_BYTES)
        })
    }

    fn bound(&self, sid: &str, now: Instant) -> Option<String> {
        let st = self.state.lock();
        st.map
            .get(sid)
            .filter(|(_, seen)| now.duration_since(*seen) <= self.ttl)
            .map(|(id, _)| id.clone())
    }

    fn learn(&self, ctx: &SchedCtx<'_>, run: &ProfileRun<'_>, now: Instant) {
        let Some(sid) = self.session_id(ctx) else {
            return;
        };
        let picked = ctx.ep(run.picked).endpoint.id();
        let mut st = self.state.lock();
        if now.duration_since(st.last_sweep) >= self.sweep {
            let ttl = self.ttl;
            st.map
                .retain(|_, (_, seen)| now.duration_since(*seen) <= ttl);
            st.last_sweep = now;
        }
        let live = st
            .map
            .get(sid)
            .filter(|(_, seen)| now.duration_since(*seen) <= self.ttl)
            .map(|(id, _)| id.clone());
        match live {
            Some(id) if id == picked => {}
            Some(id) => {
                // Bound elsewhere: move only when the bound endpoint is no candidate any more.
                let present = run.cands.iter().any(|&i| ctx.ep(i).endpoint.id() == id);
                if present {
                    return;
                }
            }
            None => {
                if st.map.len() >= MAX_SESSIONS && !st.map.contains_key(sid) {
                    let ttl = self.ttl;
                    st.map
                        .retain(|_, (_, seen)| now.duration_since(*seen) <= ttl);
                    if st.map.len() >= MAX_SESSIONS {
                        if let Some(oldest) = st
                            .map
                            .iter()
                            .min_by_key(|(_, (_, seen))| *seen)
                            .map(|(k, _)| k.clone())
                        {
                            st.map.remove(&oldest);
                        }
                    }
                }
            }
        }
        st.map.insert(sid.to_string(), (picked, now));
    }

    fn len(&self) -> usize {
        self.state.lock().map.len()
    }
}

pub struct SessionAffinityScorer {
    name: String,
    profile: Option<String>,
    strategy: Strategy,
}

impl SessionAffinityScorer {
    /// Sessions bound right now (the `session_id` strategy; 0 otherwise).
    pub fn bound_sessions(&self) -> usize {
        match &self.strategy {
            Strategy::SessionId(b) => b.len(),
            Strategy::EncodedHeader { .. } => 0,
        }
    }

    fn for_profile(&self, profile: &str) -> bool {
        self.profile.as_deref().is_none_or(|p| p == profile)
    }
}

impl Scorer for SessionAffinityScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn request_headers(&self) -> Vec<String> {
        match &self.strategy {
            Strategy::EncodedHeader { header } => vec![header.clone()],
            Strategy::SessionId(b) => b.headers.clone(),
        }
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        out.iter_mut().for_each(|o| *o = 0.0);
        let target = match &self.strategy {
            Strategy::EncodedHeader { header } => ctx
                .data
                .header(header)
                .and_then(|t| base64_decode(t.trim()))
                .and_then(|b| String::from_utf8(b).ok()),
            Strategy::SessionId(b) => b
                .session_id(ctx)
                .and_then(|sid| b.bound(sid, Instant::now())),
        };
        let Some(target) = target.filter(|t| !t.is_empty()) else {
            return;
        };
        for (o, &i) in out.iter_mut().zip(cands) {
            if ctx.ep(i).endpoint.id() == target {
                *o = 1.0;
            }
        }
    }
    fn pre_request(&self, ctx: &SchedCtx<'_>, run: &ProfileRun<'_>) {
        if let Strategy::SessionId(b) = &self.strategy {
            if self.for_profile(run.profile) {
                b.learn(ctx, run, Instant::now());
            }
        }
    }
    fn response_headers(&self, profile: &str, served: &Endpoint, out: &mut Vec<(String, String)>) {
        if let Strategy::EncodedHeader { header } = &self.strategy {
            if self.for_profile(profile) {
                out.push((header.clone(), base64_encode(served.id().as_bytes())));
            }
        }
    }
}

/// Standard base64 with padding (what llm-d's session token uses).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64 with padding; `None` for anything malformed or longer than a session token
/// can be.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if s.len() > 4 * MAX_SESSION_ID_BYTES {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx_with, scores, TestWorld};
    use super::*;

    fn build_with(yaml: Option<&str>) -> Result<Plugin, ConfigError> {
        build(&PluginSpec::for_test(TYPE, yaml), "plugins[1]")
    }

    fn scorer(p: &Plugin) -> &Arc<dyn Scorer> {
        let Plugin::Scorer(s) = p else { panic!() };
        s
    }

    fn teach(p: &Plugin, w: &TestWorld, cands: &[usize], picked: usize) {
        w.with_ctx(|ctx| {
            scorer(p).pre_request(
                ctx,
                &ProfileRun {
                    profile: "default",
                    cands,
                    picked,
                },
            )
        });
    }

    #[test]
    fn base64_round_trips_like_the_standard_encoding() {
        assert_eq!(base64_encode(b"default/vllm-0"), "ZGVmYXVsdC92bGxtLTA=");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abc"), "YWJj");
        assert_eq!(
            base64_decode("ZGVmYXVsdC92bGxtLTA=").unwrap(),
            b"default/vllm-0"
        );
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YQ=="), Some(b"a".to_vec()));
        for bad in ["YQ", "Y===", "YQ==YWJj", "!!!!"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn encoded_header_scores_the_named_endpoint_and_writes_the_served_one() {
        let (mut w, eps) = ctx_with(&[(0.0, 0.0); 3]);
        let p = build_with(None).unwrap();
        assert_eq!(
            scorer(&p).request_headers(),
            vec!["x-session-token".to_string()]
        );
        assert_eq!(scores(&w, &p), vec![0.0; 3], "no token");
        w.data.headers = vec![("x-session-token".into(), base64_encode(b"ep-1"))];
        assert_eq!(scores(&w, &p), vec![0.0, 1.0, 0.0]);
        w.data.headers = vec![("x-session-token".into(), "not base64!".into())];
        assert_eq!(scores(&w, &p), vec![0.0; 3]);
        let mut out = Vec::new();
        scorer(&p).response_headers("default", &eps[2], &mut out);
        assert_eq!(
            out,
            vec![("x-session-token".to_string(), base64_encode(b"ep-2"))]
        );
        // A custom header, normalised; a profile filter.
        let p = build_with(Some(
            "{encodedEndpointHeaderConfig: {header: ' X-Sticky '}, profileName: decode}",
        ))
        .unwrap();
        assert_eq!(scorer(&p).request_headers(), vec!["x-sticky".to_string()]);
        let mut out = Vec::new();
        scorer(&p).response_headers("default", &eps[0], &mut out);
        assert!(out.is_empty(), "another profile's outcome");
        scorer(&p).response_headers("decode", &eps[0], &mut out);
        assert_eq!(out, vec![("x-sticky".to_string(), base64_encode(b"ep-0"))]);
    }

    #[test]
    fn session_id_binds_and_moves_only_when_the_endpoint_is_gone() {
        let (mut w, _) = ctx_with(&[(0.0, 0.0); 3]);
        let p = build_with(Some("strategy: session_id")).unwrap();
        assert_eq!(
            scorer(&p).request_headers(),
            vec!["x-session-id".to_string()]
        );
        w.data.headers = vec![("x-session-id".into(), " s1 ".into())];
        assert_eq!(scores(&w, &p), vec![0.0; 3], "not bound yet");
        teach(&p, &w, &[0, 1, 2], 2);
        assert_eq!(scores(&w, &p), vec![0.0, 0.0, 1.0]);
        // Another pick while the bound endpoint is still a candidate keeps the binding.
        teach(&p, &w, &[0, 1, 2], 0);
        assert_eq!(scores(&w, &p), vec![0.0, 0.0, 1.0]);
        // The bound endpoint was filtered out: the session moves.
        teach(&p, &w, &[0, 1], 1);
        assert_eq!(scores(&w, &p), vec![0.0, 1.0, 0.0]);
        // Other sessions are independent; no header, no binding.
        w.data.headers = vec![("x-session-id".into(), "s2".into())];
        assert_eq!(scores(&w, &p), vec![0.0; 3]);
        w.data.headers.clear();
        teach(&p, &w, &[0, 1, 2], 0);
        let Plugin::Scorer(_) = &p else { panic!() };
        assert_eq!(scores(&w, &p), vec![0.0; 3]);
    }

    #[test]
    fn session_id_bindings_expire() {
        let (w, _) = ctx_with(&[(0.0, 0.0); 2]);
        let b = SessionBindings {
            headers: vec!["x-session-id".into()],
            ttl: Duration::from_secs(5),
            sweep: Duration::from_secs(1),
            state: Mutex::new(Bindings {
                map: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        };
        let mut w = w;
        w.data.headers = vec![("x-session-id".into(), "s".into())];
        let t0 = Instant::now();
        w.with_ctx(|ctx| {
            b.learn(
                ctx,
                &ProfileRun {
                    profile: "default",
                    cands: &[0, 1],
                    picked: 1,
                },
                t0,
            )
        });
        assert_eq!(
            b.bound("s", t0 + Duration::from_secs(5)).as_deref(),
            Some("ep-1")
        );
        assert_eq!(b.bound("s", t0 + Duration::from_secs(6)), None);
        // An expired binding is replaced by the next pick, and swept.
        w.with_ctx(|ctx| {
            b.learn(
                ctx,
                &ProfileRun {
                    profile: "default",
                    cands: &[0, 1],
                    picked: 0,
                },
                t0 + Duration::from_secs(7),
            )
        });
        assert_eq!(
            b.bound("s", t0 + Duration::from_secs(7)).as_deref(),
            Some("ep-0")
        );
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn parameters_are_checked() {
        for (yaml, field) in [
            ("strategy: cookie", "plugins[1].parameters.strategy"),
            (
                "{strategy: session_id, sessionIdConfig: {sources: [{header: a, attribute: b}]}}",
                "plugins[1].parameters.sessionIdConfig.sources[0]",
            ),
            (
                "{strategy: session_id, sessionIdConfig: {sources: [{attribute: b}]}}",
                "plugins[1].parameters.sessionIdConfig.sources[0].attribute",
            ),
            (
                "{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: -1}}",
                "plugins[1].parameters.sessionIdConfig.evictionTtlSeconds",
            ),
            (
                "{sessionIdConfig: {}}",
                "plugins[1].parameters.sessionIdConfig",
            ),
            (
                "{strategy: session_id, encodedEndpointHeaderConfig: {header: x}}",
                "plugins[1].parameters.encodedEndpointHeaderConfig",
            ),
            ("{sessionHeader: x}", "plugins[1].parameters.sessionHeader"),
        ] {
            let e = build_with(Some(yaml)).err().unwrap();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        let p = build_with(Some(
            "{strategy: session_id, sessionIdConfig: {sources: [{header: X-Conv}, {header: x-user}]}}",
        ))
        .unwrap();
        assert_eq!(
            scorer(&p).request_headers(),
            vec!["x-conv".to_string(), "x-user".to_string()]
        );
    }
}
