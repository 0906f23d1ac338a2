//! The compliance test every scheduler plugin passes: scores are finite and in [0, 1], it never
//! picks a filtered (unhealthy, out-of-subset, saturated) endpoint, and its config round-trips.

use std::sync::Arc;

use epp_core::config::{EndpointPickerConfig, PluginSpec, ProfilePluginRef, ProfileSpec};
use epp_core::datastore::{
    DatastoreWriter, EndpointSpec, FailureKind, HealthConfig, HealthState, InFlight,
    ModelServerMetrics,
};
use epp_core::prefix::{PrefixConfig, PrefixIndex};
use epp_core::request::ParsedRequest;
use epp_core::scheduler::plugins::{self, all_types, Plugin};
use epp_core::scheduler::{Hints, PrefixMatches, RequestData, SchedCtx, Scheduler};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct EpCase {
    waiting: u8,
    kv: f64,
    inflight: u8,
    healthy: bool,
    loras: u8,
    prefix_blocks: u8,
}

fn ep_case() -> impl Strategy<Value = EpCase> {
    (0u8..20, 0.0f64..=1.0, 0u8..6, any::<bool>(), 0u8..3, 0u8..5).prop_map(
        |(waiting, kv, inflight, healthy, loras, prefix_blocks)| EpCase {
            waiting,
            kv,
            inflight,
            healthy,
            loras,
            prefix_blocks,
        },
    )
}

struct World {
    ds: DatastoreWriter,
    prefix: PrefixIndex,
    _guards: Vec<InFlight>,
}

fn world(cases: &[EpCase]) -> World {
    let ds = DatastoreWriter::new(HealthConfig::default());
    // Roles cycle so the role and label filters have something to keep and to drop.
    let roles = ["decode", "prefill", "both", ""];
    let specs: Vec<EndpointSpec> = (0..cases.len())
        .map(|i| EndpointSpec {
            labels: Some(roles[i % 4])
                .filter(|r| !r.is_empty())
                .map(|r| [("llm-d.ai/role".to_string(), r.to_string())].into())
                .unwrap_or_default(),
            ..EndpointSpec::new(format!("10.0.0.{i}:8000"))
        })
        .collect();
    ds.set_endpoints(specs);
    let prefix = PrefixIndex::new(PrefixConfig {
        block_size: 4,
        ..Default::default()
    });
    let mut guards = Vec::new();
    let snap = ds.snapshot();
    for (i, c) in cases.iter().enumerate() {
        let addr = format!("10.0.0.{i}:8000");
        ds.record_scrape(
            &addr,
            Ok(ModelServerMetrics {
                waiting_queue: c.waiting as f64,
                running: 1.0,
                kv_cache_usage: c.kv,
                running_loras: (0..c.loras).map(|k| format!("lora-{k}")).collect(),
                waiting_loras: vec![],
                max_loras: Some(2),
                ..Default::default()
            }),
        );
        if !c.healthy {
            ds.record_scrape(&addr, Err(FailureKind::Refused));
        }
        let ep = snap.endpoints[i].endpoint.clone();
        for _ in 0..c.inflight {
            guards.push(InFlight::new(ep.clone()));
        }
        let text = b"aaaabbbbccccddddeeee";
        let n = c.prefix_blocks as usize * 4;
        prefix.insert(ep.slot, &prefix.hash("m", &text[..n]));
    }
    World {
        ds,
        prefix,
        _guards: guards,
    }
}

/// A config with one plugin of `type_`, referenced by the default profile (profile handlers
/// choose between profiles, so they are only listed).
/// Parameters for types that cannot be built without any (the others get none).
fn sample_parameters(type_: &str) -> Option<serde_json::Value> {
    match type_ {
        "by-label" => Some(
            serde_json::json!({"label": "llm-d.ai/role", "validValues": ["decode"], "allowsNoLabel": true}),
        ),
        // The disaggregating handlers run the `default` profile as their decode profile.
        "disagg-profile-handler" => Some(serde_json::json!({"profiles": {"decode": "default"}})),
        "pd-profile-handler" => Some(serde_json::json!({"decodeProfile": "default"})),
        _ => None,
    }
}

fn single_plugin_config(type_: &str, weight: Option<f64>) -> EndpointPickerConfig {
    let handler = plugins::registry::lookup(type_).is_some_and(|r| {
        matches!(
            r.kind,
            plugins::registry::Kind::ProfileHandler | plugins::registry::Kind::Decider
        )
    });
    let mut cfg = EndpointPickerConfig {
        api_version: epp_core::config::API_VERSION.into(),
        kind: epp_core::config::KIND.into(),
        plugins: vec![PluginSpec {
            name: Some(format!("my-{type_}")),
            type_: type_.into(),
            parameters: sample_parameters(type_),
        }],
        scheduling_profiles: vec![ProfileSpec {
            name: "default".into(),
            plugins: if handler {
                vec![]
            } else {
                vec![ProfilePluginRef {
                    plugin_ref: format!("my-{type_}"),
                    weight,
                }]
            },
        }],
        ..Default::default()
    };
    if type_ == "pd-profile-handler" {
        // It needs a prefill profile and its default decider.
        cfg.plugins.push(PluginSpec {
            name: None,
            type_: "prefix-based-pd-decider".into(),
            parameters: Some(serde_json::json!({"nonCachedTokens": 1})),
        });
        cfg.scheduling_profiles.push(ProfileSpec {
            name: "prefill".into(),
            plugins: vec![],
        });
    }
    cfg
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_plugin_is_compliant(
        cases in proptest::collection::vec(ep_case(), 1..12),
        subset_mask in any::<u16>(),
        lora in 0u8..4,
    ) {
        let w = world(&cases);
        let snap = w.ds.snapshot();
        let req = ParsedRequest {
            model: "m".into(),
            target_model: format!("lora-{lora}"),
            prompt: b"aaaabbbbccccddddeeee".to_vec(),
            ..Default::default()
        };
        let hashes = w.prefix.hash("m", &req.prompt);
        let matches = PrefixMatches::approximate(w.prefix.lookup(&hashes), 1);
        let data = RequestData {
            headers: vec![
                ("x-session-token".into(), "MTAuMC4wLjE6ODAwMA==".into()),
                ("x-session-id".into(), "s".into()),
            ],
            prompt_tokens: Some(5),
            token_ids: None,
            prefix_block_tokens: 1,
        };
        let ctx = SchedCtx { snapshot: &snap, request: &req, prefix: &matches, data: &data };
        let all: Vec<usize> = (0..snap.endpoints.len()).collect();
        let subset: Vec<String> = (0..cases.len())
            .filter(|i| subset_mask & (1 << i) != 0)
            .map(|i| format!("10.0.0.{i}:8000"))
            .collect();
        for t in all_types() {
            let spec = PluginSpec { name: None, type_: t.to_string(), parameters: sample_parameters(t) };
            let plugin = plugins::build(&spec, "plugins[0]").unwrap();
            // Scores finite and in [0, 1]; filters only remove; pickers return distinct candidates.
            match &plugin {
                Plugin::Scorer(s) => {
                    let mut out = vec![f64::NAN; all.len()];
                    s.score(&ctx, &all, &mut out);
                    for v in &out {
                        prop_assert!(v.is_finite() && (0.0..=1.0).contains(v), "{t} scored {v}");
                    }
                }
                Plugin::Filter(f) => {
                    let mut c = all.clone();
                    f.filter(&ctx, &mut c);
                    prop_assert!(c.iter().all(|i| all.contains(i)));
                }
                Plugin::Picker(p) => {
                    let scores: Vec<f64> = (0..all.len()).map(|i| i as f64 / 10.0).collect();
                    let order = p.pick(&ctx, &all, &scores);
                    prop_assert!(!order.is_empty());
                    let mut seen = order.clone();
                    seen.sort();
                    seen.dedup();
                    prop_assert_eq!(seen.len(), order.len(), "{} repeated a candidate", t);
                    prop_assert!(order.iter().all(|k| *k < all.len()));
                }
                Plugin::ProfileHandler(h) => {
                    prop_assert_eq!(h.type_name(), t);
                }
                Plugin::Decider(d) => {
                    prop_assert_eq!(d.type_name(), t);
                    for i in &all {
                        let _ = d.disaggregate(&ctx, Some(*i));
                    }
                }
                Plugin::Producer(p) => {
                    prop_assert_eq!(p.type_name(), t);
                    let mut d = RequestData::default();
                    p.produce(&req, &mut d);
                }
            }
            // Through the scheduler: never an unhealthy or out-of-subset pick.
            let weight = matches!(plugin, Plugin::Scorer(_)).then_some(2.0);
            let cfg = single_plugin_config(t, weight);
            // Config round-trip.
            let again = EndpointPickerConfig::from_yaml(&cfg.to_yaml()).unwrap();
            prop_assert_eq!(&again, &cfg);
            let sched = Scheduler::from_config(&again).unwrap();
            for hint in [None, Some(subset.as_slice())] {
                match sched.schedule(&ctx, &Hints { subset: hint, forced: None }) {
                    Ok(s) => {
                        for &i in &s.ranked {
                            let e = &snap.endpoints[i];
                            let any_healthy = snap.endpoints.iter().enumerate().any(|(k, e)| {
                                e.health == HealthState::Healthy && hint.is_none_or(|h| h.contains(&format!("10.0.0.{k}:8000")))
                            });
                            prop_assert!(e.health == HealthState::Healthy || (!any_healthy && e.health == HealthState::Stale),
                                "{t} picked a {:?} endpoint", e.health);
                            if let Some(h) = hint {
                                prop_assert!(h.contains(&e.endpoint.address().to_string()), "{t} left the subset");
                            }
                            if t == plugins::SATURATION_FILTER {
                                prop_assert!(e.waiting() <= 5.0 && e.kv_usage() <= 0.8, "saturated endpoint picked");
                            }
                            if let Plugin::Filter(f) = &plugin {
                                let mut one = vec![i];
                                f.filter(&ctx, &mut one);
                                prop_assert_eq!(one, vec![i], "{} picked an endpoint it filters out", t);
                            }
                        }
                    }
                    Err(_) => {
                        // Only when nothing eligible exists (or saturation shed everything, or
                        // the filter under test keeps none of the eligible endpoints).
                        let mut eligible: Vec<usize> = snap.endpoints.iter().enumerate().filter(|(k, e)| {
                            e.health == HealthState::Healthy && hint.is_none_or(|h| h.contains(&format!("10.0.0.{k}:8000")))
                        }).map(|(k, _)| k).collect();
                        if let Plugin::Filter(f) = &plugin {
                            f.filter(&ctx, &mut eligible);
                        }
                        if t != plugins::SATURATION_FILTER {
                            prop_assert_eq!(eligible.len(), 0, "{} refused with eligible endpoints", t);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn unknown_types_and_bad_parameters_name_the_field() {
    let spec = PluginSpec {
        name: None,
        type_: "nope".into(),
        parameters: None,
    };
    let e = plugins::build(&spec, "plugins[3]").err().unwrap();
    assert_eq!(e.field, "plugins[3].type");
    let spec = PluginSpec {
        name: None,
        type_: "prefix-cache-scorer".into(),
        parameters: Some(serde_json::json!({"blockSizeTokens": 0})),
    };
    let e = plugins::build(&spec, "plugins[0]").err().unwrap();
    assert_eq!(e.field, "plugins[0].parameters.blockSizeTokens");
    let spec = PluginSpec {
        name: None,
        type_: "queue-scorer".into(),
        parameters: Some(serde_json::json!({"bogus": 1})),
    };
    let e = plugins::build(&spec, "plugins[0]").err().unwrap();
    assert_eq!(e.field, "plugins[0].parameters.bogus");
    assert!(e.message.contains("unknown field `bogus`"), "{e}");
    let _ = Arc::new(());
}

#[test]
fn profile_handlers_choose_among_profiles_that_are_all_validated() {
    let yaml = |extra: &str| {
        format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
             plugins:\n- type: queue-scorer\n- type: round-robin-picker\n- type: single-profile-handler\n{extra}\
             schedulingProfiles:\n- name: other\n  plugins:\n  - pluginRef: round-robin-picker\n\
             - name: default\n  plugins:\n  - pluginRef: queue-scorer\n"
        )
    };
    let s = Scheduler::from_config(&EndpointPickerConfig::from_yaml(&yaml("")).unwrap()).unwrap();
    assert_eq!(s.profiles().len(), 2);
    assert_eq!(
        s.profile().name,
        "default",
        "the single handler runs `default`"
    );
    assert!(
        s.describe()
            .starts_with("single-profile-handler runs profile \"default\""),
        "{}",
        s.describe()
    );
    // A second handler is refused.
    let cfg =
        EndpointPickerConfig::from_yaml(&yaml("- type: single-profile-handler\n  name: h2\n"))
            .unwrap();
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(e.field, "plugins[3].type", "{e}");
    // Every profile is validated, not only the one that runs.
    let bad = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
               plugins:\n- type: queue-scorer\n\
               schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n\
               - name: unused\n  plugins:\n  - pluginRef: nope\n";
    let e = Scheduler::from_config(&EndpointPickerConfig::from_yaml(bad).unwrap())
        .err()
        .unwrap();
    assert_eq!(e.field, "schedulingProfiles[1].plugins[0].pluginRef", "{e}");
    // A handler is not a profile member.
    let bad = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
               plugins:\n- type: single-profile-handler\n\
               schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: single-profile-handler\n";
    let e = Scheduler::from_config(&EndpointPickerConfig::from_yaml(bad).unwrap())
        .err()
        .unwrap();
    assert!(e.message.contains("profile handler"), "{e}");
}
