//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every crash input found and
//! fixed (`fuzz/artifacts/<target>/`) through the same harnesses the cargo-fuzz targets run
//! (`epp_core::fuzzing`), on stable, as part of the ordinary test suite. See docs/fuzzing.md.
//!
//! `EPP_WRITE_FUZZ_SEEDS=1 cargo test -p epp-core --test fuzz_corpus -- --ignored` writes the
//! hand-made seed inputs (the starting corpus before `cargo fuzz cmin`) into `fuzz/seeds/`.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
};
use epp_core::fuzzing::{encode_extproc_input, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_committed_input_replays_without_panicking() {
    for (target, harness) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            corpus.len() >= 10,
            "{target}: expected a committed corpus in fuzz/corpus/{target}, found {} files",
            corpus.len()
        );
        let artifacts = files(&fuzz_dir().join("artifacts").join(target));
        for f in corpus.iter().chain(&artifacts) {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{target}: {} panics", f.display());
        }
    }
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    for (target, _) in TARGETS {
        let src = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        let text =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        assert!(
            text.contains(&format!("epp_core::fuzzing::{target}(")),
            "{} must call epp_core::fuzzing::{target}",
            src.display()
        );
    }
}

// ---------------------------------------------------------------------------------- seeds

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

fn msg(r: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(r),
        ..Default::default()
    }
}

fn req_headers(path: &str, eos: bool, extra: &[(&str, &str)]) -> ProcessingRequest {
    let mut pairs = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/json"),
    ];
    pairs.extend_from_slice(extra);
    msg(Request::RequestHeaders(HttpHeaders {
        headers: hmap(&pairs),
        end_of_stream: eos,
        ..Default::default()
    }))
}

fn body(b: &[u8], eos: bool, response: bool) -> ProcessingRequest {
    let b = HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    };
    msg(if response {
        Request::ResponseBody(b)
    } else {
        Request::RequestBody(b)
    })
}

fn resp_headers(status: &str, eos: bool) -> ProcessingRequest {
    msg(Request::ResponseHeaders(HttpHeaders {
        headers: hmap(&[(":status", status), ("content-type", "text/event-stream")]),
        end_of_stream: eos,
        ..Default::default()
    }))
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the whole wide world, please, in three languages."}],"stream":true}"#;

/// KV-event seeds: batches of every event kind in both encodings, as payloads, live frames and
/// replay answers.
fn kv_event_seeds(out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    use epp_core::fuzzing::KV_FRAME_SEPARATOR as SEP;
    use epp_core::kvevents::{
        encode_batch, BlockRemoved, BlockStored, EventBatch, EventForm, KvEvent, END_SEQ,
    };
    let mut full = BlockStored::new(vec![1, u64::MAX], Some(7), vec![10, 11, 12, 13], 2);
    full.lora_id = Some(1);
    full.medium = Some("GPU".into());
    full.lora_name = Some("adapter".into());
    full.extra_keys = Some(vec![None, Some(vec![rmpv::Value::from("salt")])]);
    full.group_idx = Some(0);
    full.kv_cache_spec_kind = Some("full_attention".into());
    full.kv_cache_spec_sliding_window = Some(128);
    let batches = [
        EventBatch {
            ts: 1.5,
            events: vec![KvEvent::BlockStored(BlockStored::new(
                vec![5],
                None,
                vec![1; 16],
                16,
            ))],
            data_parallel_rank: Some(0),
        },
        EventBatch {
            ts: 2.0,
            events: vec![
                KvEvent::BlockStored(full),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![1, 2, 3],
                    medium: Some("GPU".into()),
                    group_idx: Some(1),
                }),
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: None,
        },
        EventBatch {
            ts: 0.0,
            events: vec![],
            data_parallel_rank: Some(3),
        },
    ];
    for (i, b) in batches.iter().enumerate() {
        for form in [EventForm::Array, EventForm::Map] {
            let payload = encode_batch(b, form);
            let f = form.as_str();
            out.push((
                "kv_events",
                format!("batch-{i}-{f}"),
                [&[0u8][..], &payload].concat(),
            ));
            let seq = (i as u64).to_be_bytes();
            let live = [&b"kv@pod@model"[..], SEP, &seq, SEP, &payload].concat();
            out.push((
                "kv_events",
                format!("live-{i}-{f}"),
                [&[1u8][..], &live].concat(),
            ));
            let replay = [&b""[..], SEP, b"kv@pod@model", SEP, &seq, SEP, &payload].concat();
            out.push((
                "kv_events",
                format!("replay-{i}-{f}"),
                [&[2u8][..], &replay].concat(),
            ));
        }
    }
    let end = [&b""[..], SEP, &END_SEQ, SEP].concat();
    out.push((
        "kv_events",
        "replay-end".into(),
        [&[2u8][..], &end].concat(),
    ));
}

fn shared_state_seeds(out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    use epp_core::replication::wire;
    let batch = wire::encode_batch(&wire::Batch {
        block_bytes: 64,
        sent_ms: 1_700_000_000_000,
        inserts: vec![
            wire::Insert {
                endpoint: "10.0.0.1:8000".into(),
                hashes: vec![1, 2, u64::MAX],
                speculative: vec![],
            },
            wire::Insert {
                endpoint: "10.0.0.2:8000".into(),
                hashes: vec![],
                speculative: vec![7, 8],
            },
        ],
    });
    let entry = |v: &[u8], r: &[u8], b: &[u8]| [&[0u8][..], v, b"||", r, b"||", b].concat();
    out.push((
        "shared_state",
        "entry".into(),
        entry(b"1", b"replica-a", &batch),
    ));
    out.push((
        "shared_state",
        "entry-version-2".into(),
        entry(b"2", b"a", &batch),
    ));
    out.push((
        "shared_state",
        "entry-junk".into(),
        entry(b"1", b"a", b"\xc1\x93"),
    ));
    let other_block = wire::encode_batch(&wire::Batch {
        block_bytes: 128,
        ..Default::default()
    });
    out.push((
        "shared_state",
        "entry-block-128".into(),
        entry(b"1", b"a", &other_block),
    ));
    let snap = wire::encode_snapshot(&wire::Snapshot {
        version: wire::FORMAT_VERSION,
        block_bytes: 64,
        taken_ms: 5,
        stream_id: "1-0".into(),
        replica: "a".into(),
        endpoints: vec![wire::EndpointBlocks {
            endpoint: "h:1".into(),
            hashes: vec![3, 4],
        }],
    });
    out.push((
        "shared_state",
        "snapshot".into(),
        [&[1u8][..], &snap].concat(),
    ));
    let load = wire::encode_load(&wire::Load {
        version: wire::FORMAT_VERSION,
        sent_ms: 9,
        endpoints: vec![("h:1".into(), 3), ("h:2".into(), 0)],
    });
    out.push(("shared_state", "load".into(), [&[2u8][..], &load].concat()));
    out.push((
        "shared_state",
        "huge-array".into(),
        b"\x01\xdd\xff\xff\xff\xff".to_vec(),
    ));
}

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    kv_event_seeds(&mut out);
    shared_state_seeds(&mut out);
    let bodies: [&[u8]; 12] = [
        CHAT.as_bytes(),
        br#"{"model":"m","prompt":"Once upon a time in a land far away there lived a fuzzer","max_tokens":8}"#,
        br#"{"model":"m","prompt":["a","b"],"stream":false}"#,
        br#"{"model":"m","prompt":[1,2,3]}"#,
        br#"{"model":"m","input":"embed me"}"#,
        br#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}]}"#,
        br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"data:"}}]}]}"#,
        br#"{"model":7}"#,
        br#"{"messages":[]}"#,
        b"   ",
        b"[1,2]",
        br#"{"model":"m","messages":"not a list","stream":"yes"}"#,
    ];
    for (i, b) in bodies.iter().enumerate() {
        for sel in [0u8, 1, 2, 3] {
            if (i + sel as usize).is_multiple_of(3) || sel == 0 {
                out.push((
                    "request_body",
                    format!("seed-{i}-{sel}"),
                    [&[sel][..], b].concat(),
                ));
            }
        }
    }
    let vllm = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 2\n# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e9\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"1000\"} 1\n";
    let texts: [(u8, &str); 6] = [
        (0, vllm),
        (0, "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.1\n"),
        (1, "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 4\n# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 1\n# TYPE sglang:token_usage gauge\nsglang:token_usage 0.75\n"),
        (2, "# TYPE trtllm_num_requests_waiting gauge\ntrtllm_num_requests_waiting 7\n# TYPE trtllm_kv_cache_utilization gauge\ntrtllm_kv_cache_utilization 0.5\n"),
        (0, "# HELP x y\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n"),
        (0, "vllm:num_requests_waiting NaN\nvllm:num_requests_waiting{a=\"b\"} -Inf\n"),
    ];
    for (i, (sel, t)) in texts.iter().enumerate() {
        out.push((
            "scrape_metrics",
            format!("seed-{i}"),
            [&[*sel][..], t.as_bytes()].concat(),
        ));
    }
    for (name, y) in epp_core::config::presets::ALL {
        out.push(("config", format!("preset-{name}"), y.as_bytes().to_vec()));
    }
    let head = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";
    let configs = [
        "plugins:\n- type: saturation-filter\n  parameters:\n    queueDepthThreshold: 5\n    kvCacheUtilThreshold: 0.8\n- type: queue-scorer\n- type: random-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: saturation-filter\n  - pluginRef: queue-scorer\n    weight: 2\n  - pluginRef: random-picker\n",
        "plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSize: 64\n    lruCapacityPerServer: 10\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: prefix-cache-scorer\n",
        "plugins:\n- type: queue-scorer\n  name: q\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: q\n    weight: -1\n",
        "featureGates: [x]\nsaturationDetector: {queueDepthThreshold: 5}\nplugins: []\nschedulingProfiles: []\n",
    ];
    for (i, c) in configs.iter().enumerate() {
        out.push((
            "config",
            format!("seed-{i}"),
            format!("{head}{c}").into_bytes(),
        ));
    }
    let split = CHAT.len() / 2;
    let sequences: Vec<(u8, Vec<ProcessingRequest>)> = vec![
        (
            0,
            vec![
                req_headers("/v1/chat/completions", false, &[]),
                body(&CHAT.as_bytes()[..split], false, false),
                body(&CHAT.as_bytes()[split..], true, false),
                resp_headers("200", false),
                body(b"data: {\"choices\":[]}\n\n", false, true),
                body(b"data: [DONE]\n\n", true, true),
            ],
        ),
        (
            1,
            vec![
                req_headers(
                    "/v1/completions",
                    false,
                    &[
                        ("test-epp-endpoint-selection", "10.0.0.2:8000"),
                        ("x-gateway-model-name", "m2"),
                    ],
                ),
                body(br#"{"model":"m","prompt":"hello"}"#, true, false),
                resp_headers("200", false),
                body(br#"{"choices":[{"text":"x"}],"model":"m2"}"#, true, true),
            ],
        ),
        (
            6,
            vec![
                req_headers("/v1/models", true, &[]),
                resp_headers("200", true),
            ],
        ),
        (
            0,
            vec![
                req_headers("/v1/chat/completions", false, &[]),
                body(b"{\"model\": ", false, false),
                msg(Request::RequestTrailers(HttpTrailers::default())),
            ],
        ),
        (0, vec![resp_headers("503", false), body(b"x", true, true)]),
        (
            0,
            vec![
                req_headers("/v1/chat/completions", false, &[]),
                body(&vec![b'a'; 5000], false, false),
            ],
        ),
    ];
    for (i, (opts, seq)) in sequences.iter().enumerate() {
        out.push((
            "extproc_messages",
            format!("seed-{i}"),
            encode_extproc_input(*opts, seq),
        ));
    }
    out
}

#[test]
#[ignore = "writes fuzz/seeds/; run with EPP_WRITE_FUZZ_SEEDS=1"]
fn write_seeds() {
    if std::env::var_os("EPP_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn seeds_run_through_the_harnesses() {
    let s = seeds();
    for (target, _) in TARGETS {
        let n = s.iter().filter(|(t, _, _)| *t == target).count();
        assert!(n >= 6, "{target}: {n} seeds");
    }
    for (target, name, data) in s {
        let (_, harness) = TARGETS.iter().find(|(t, _)| *t == target).unwrap();
        harness(&data);
        assert!(!data.is_empty(), "{target}/{name}");
    }
}
