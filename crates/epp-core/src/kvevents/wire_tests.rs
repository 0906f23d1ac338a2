//! Decoder and encoder tests: hand-built vLLM-shaped payloads in both encodings, mixed batches,
//! missing and extra fields, garbage, and encode → decode round trips.

use proptest::prelude::*;
use rmpv::Value;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn msgpack(v: Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn err_of(payload: &[u8]) -> String {
    decode_batch(payload).unwrap_err().to_string()
}

/// `[1.5, [["BlockStored", [123, 456], nil, [1,2,3,4], 2, nil, "GPU", nil],
/// ["BlockRemoved", [123], "GPU"], ["AllBlocksCleared"]], 0]`, byte by byte: the field order of
/// vLLM's `BlockStored` (block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
/// lora_name), with the defaulted trailing fields left out as `omit_defaults` does.
const VLLM_ARRAY_SAMPLE: &str = "93 cb 3f f8 00 00 00 00 00 00 93 \
    98 ab 42 6c 6f 63 6b 53 74 6f 72 65 64 92 7b cd 01 c8 c0 94 01 02 03 04 02 c0 a3 47 50 55 c0 \
    93 ac 42 6c 6f 63 6b 52 65 6d 6f 76 65 64 91 7b a3 47 50 55 \
    91 b0 41 6c 6c 42 6c 6f 63 6b 73 43 6c 65 61 72 65 64 \
    00";

#[test]
fn decodes_a_vllm_shaped_array_batch() {
    let batch = decode_batch(&hex(VLLM_ARRAY_SAMPLE)).unwrap();
    let mut stored = BlockStored::new(vec![123, 456], None, vec![1, 2, 3, 4], 2);
    stored.medium = Some("GPU".into());
    assert_eq!(
        batch,
        EventBatch {
            ts: 1.5,
            events: vec![
                KvEvent::BlockStored(stored),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![123],
                    medium: Some("GPU".into()),
                    group_idx: None,
                }),
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        }
    );
}

/// `[1.5, [{"type": "BlockStored", "block_hashes": [bytes 00..1f], "parent_block_hash":
/// 2^64-1, "token_ids": [151643, 7], "block_size": 2, "lora_id": nil, "medium": "GPU",
/// "lora_name": nil}]]`: the map encoding with a 32-byte hash and no data-parallel rank.
const VLLM_MAP_SAMPLE: &str = "92 cb 3f f8 00 00 00 00 00 00 91 88 \
    a4 74 79 70 65 ab 42 6c 6f 63 6b 53 74 6f 72 65 64 \
    ac 62 6c 6f 63 6b 5f 68 61 73 68 65 73 91 c4 20 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e \
    0f 10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f \
    b1 70 61 72 65 6e 74 5f 62 6c 6f 63 6b 5f 68 61 73 68 cf ff ff ff ff ff ff ff ff \
    a9 74 6f 6b 65 6e 5f 69 64 73 92 ce 00 02 50 5b 07 \
    aa 62 6c 6f 63 6b 5f 73 69 7a 65 02 \
    a7 6c 6f 72 61 5f 69 64 c0 a6 6d 65 64 69 75 6d a3 47 50 55 a9 6c 6f 72 61 5f 6e 61 6d 65 c0";

#[test]
fn decodes_a_vllm_shaped_map_batch_with_byte_hashes() {
    let batch = decode_batch(&hex(VLLM_MAP_SAMPLE)).unwrap();
    let mut stored = BlockStored::new(vec![0x18191a1b1c1d1e1f], Some(u64::MAX), vec![151643, 7], 2);
    stored.medium = Some("GPU".into());
    assert_eq!(
        batch,
        EventBatch {
            ts: 1.5,
            events: vec![KvEvent::BlockStored(stored)],
            data_parallel_rank: None,
        }
    );
}

#[test]
fn a_live_message_decodes_with_its_topic_and_sequence() {
    let frames = [
        b"kv@pod-1@m".to_vec(),
        41u64.to_be_bytes().to_vec(),
        hex(VLLM_ARRAY_SAMPLE),
    ];
    let msg = decode_message(&frames).unwrap();
    assert_eq!(msg.topic, "kv@pod-1@m");
    assert_eq!(msg.seq, 41);
    assert_eq!(msg.batch.events.len(), 3);
}

#[test]
fn mixed_batches_and_map_batches_decode() {
    // An array batch of one map event and one array event.
    let mixed = msgpack(Value::Array(vec![
        Value::F64(2.0),
        Value::Array(vec![
            Value::Map(vec![
                (s("type"), s("BlockRemoved")),
                (s("block_hashes"), Value::Array(vec![Value::from(9)])),
                (s("medium"), Value::Nil),
                (s("group_idx"), Value::from(1)),
            ]),
            Value::Array(vec![s("AllBlocksCleared")]),
        ]),
    ]));
    let b = decode_batch(&mixed).unwrap();
    assert_eq!(
        b.events,
        vec![
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![9],
                medium: None,
                group_idx: Some(1)
            }),
            KvEvent::AllBlocksCleared
        ]
    );
    // The batch itself as a map, integer timestamp.
    let map_batch = msgpack(Value::Map(vec![
        (s("events"), Value::Array(vec![])),
        (s("ts"), Value::from(7)),
        (s("data_parallel_rank"), Value::from(2)),
    ]));
    assert_eq!(
        decode_batch(&map_batch).unwrap(),
        EventBatch {
            ts: 7.0,
            events: vec![],
            data_parallel_rank: Some(2)
        }
    );
}

#[test]
fn missing_trailing_and_unknown_extra_fields_are_tolerated() {
    // Only the fields up to block_size (an old vLLM), then a later version's extra fields.
    let short = msgpack(Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![
            Value::Array(vec![
                s("BlockStored"),
                Value::Array(vec![Value::from(1)]),
                Value::from(5),
                Value::Array(vec![Value::from(3), Value::from(4)]),
                Value::from(2),
            ]),
            Value::Array(vec![s("BlockRemoved"), Value::Array(vec![])]),
            Value::Array(vec![s("AllBlocksCleared"), s("future")]),
        ]),
        Value::Nil,
        s("a fourth batch field"),
    ]));
    let b = decode_batch(&short).unwrap();
    assert_eq!(
        b.events[0],
        KvEvent::BlockStored(BlockStored::new(vec![1], Some(5), vec![3, 4], 2))
    );
    assert_eq!(b.data_parallel_rank, None);
    let long = msgpack(Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![
            Value::Array(vec![
                s("BlockStored"),
                Value::Array(vec![Value::from(1)]),
                Value::Nil,
                Value::Array(vec![Value::from(3)]),
                Value::from(1),
                Value::from(4),
                s("CPU"),
                s("adapter"),
                Value::Array(vec![Value::Nil]),
                Value::from(0),
                s("sliding_window"),
                Value::from(4096),
                s("LOCAL"),
                s("tier-2"),
            ]),
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), Value::Array(vec![Value::from(1)])),
                (s("token_ids"), Value::Array(vec![Value::from(3)])),
                (s("block_size"), Value::from(1)),
                (s("event_version"), Value::from(1)),
                (
                    s("extra_keys"),
                    Value::Array(vec![Value::Array(vec![Value::Map(vec![
                        (s("type"), s("lora")),
                        (s("name"), s("adapter")),
                    ])])]),
                ),
                (s("locality"), s("LOCAL")),
            ]),
        ]),
    ]));
    let b = decode_batch(&long).unwrap();
    let KvEvent::BlockStored(first) = &b.events[0] else {
        panic!("not stored")
    };
    assert_eq!(first.lora_id, Some(4));
    assert_eq!(first.medium.as_deref(), Some("CPU"));
    assert_eq!(first.lora_name.as_deref(), Some("adapter"));
    assert_eq!(first.extra_keys, Some(vec![None]));
    assert_eq!(first.group_idx, Some(0));
    assert_eq!(first.kv_cache_spec_kind.as_deref(), Some("sliding_window"));
    assert_eq!(first.kv_cache_spec_sliding_window, Some(4096));
    let KvEvent::BlockStored(second) = &b.events[1] else {
        panic!("not stored")
    };
    assert_eq!(second.parent_block_hash, None);
    assert_eq!(
        second.extra_keys,
        Some(vec![Some(vec![Value::Map(vec![
            (s("type"), s("lora")),
            (s("name"), s("adapter"))
        ])])])
    );
}

#[test]
fn hashes_of_every_shape() {
    let b = msgpack(Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![Value::Array(vec![
            s("BlockRemoved"),
            Value::Array(vec![
                Value::from(-1),
                Value::from(u64::MAX),
                Value::Binary(vec![1, 2]),
                Value::Binary((0..8).collect()),
            ]),
        ])]),
    ]));
    let KvEvent::BlockRemoved(r) = &decode_batch(&b).unwrap().events[0] else {
        panic!("not removed")
    };
    assert_eq!(
        r.block_hashes,
        vec![u64::MAX, u64::MAX, 0x0102, 0x0001020304050607]
    );
}

fn one_event(e: Value) -> Vec<u8> {
    msgpack(Value::Array(vec![Value::F64(0.0), Value::Array(vec![e])]))
}

fn stored_with(i: usize, v: Value) -> Vec<u8> {
    let mut fields = vec![
        s("BlockStored"),
        Value::Array(vec![Value::from(1)]),
        Value::Nil,
        Value::Array(vec![Value::from(3)]),
        Value::from(1),
    ];
    if i < fields.len() {
        fields[i] = v;
    } else {
        fields.resize(i, Value::Nil);
        fields.push(v);
    }
    one_event(Value::Array(fields))
}

#[test]
fn garbage_is_rejected_with_the_place_and_the_reason() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "payload is not msgpack: "),
        // rmpv reads the reserved marker 0xc1 as nil.
        (hex("c1"), "batch: expected an array or a map, found nil"),
        (hex("93 cb 3f f8"), "payload is not msgpack: "),
        (hex("92 00 90 00"), "payload has 1 bytes after the batch"),
        (hex("2a"), "batch: expected an array or a map, found int"),
        (hex("90"), "ts: missing"),
        (hex("91 a1 78"), "ts: expected a float, found str"),
        (hex("91 00"), "events: missing"),
        (hex("92 00 c0"), "events: expected an array, found nil"),
        (
            hex("93 00 90 a1 78"),
            "data_parallel_rank: expected an int, found str",
        ),
        (
            hex("82 a2 74 73 00 a2 74 73 00"),
            "batch: key \"ts\" appears twice",
        ),
        (hex("81 01 00"), "batch: a map key is int, not a str"),
        (
            one_event(Value::from(3)),
            "events[0]: expected an array or a map, found int",
        ),
        (
            one_event(Value::Array(vec![])),
            "events[0]: event has no tag",
        ),
        (one_event(Value::Map(vec![])), "events[0]: event has no tag"),
        (
            one_event(Value::Array(vec![Value::from(1)])),
            "events[0].tag: expected a str event tag, found int",
        ),
        (
            one_event(Value::Map(vec![(s("type"), Value::Nil)])),
            "events[0].type: expected a str event tag, found nil",
        ),
        (
            one_event(Value::Array(vec![s("BlockMoved")])),
            "events[0]: unknown event type \"BlockMoved\"",
        ),
        (
            one_event(Value::Array(vec![s("BlockStored"), Value::Array(vec![])])),
            "events[0].token_ids: missing (position 3)",
        ),
        (
            one_event(Value::Map(vec![(s("type"), s("BlockRemoved"))])),
            "events[0].block_hashes: missing",
        ),
        (
            stored_with(1, Value::Nil),
            "events[0].block_hashes: expected an array, found nil",
        ),
        (
            stored_with(1, Value::Array(vec![Value::from(1), s("h")])),
            "events[0].block_hashes[1]: expected an int or bytes block hash, found str",
        ),
        (
            stored_with(1, Value::Array(vec![Value::Binary(vec![])])),
            "events[0].block_hashes[0]: empty bytes are not a block hash",
        ),
        (
            stored_with(2, Value::F64(1.0)),
            "events[0].parent_block_hash: expected an int or bytes block hash, found float",
        ),
        (
            stored_with(3, Value::Array(vec![Value::from(1), Value::from(-1)])),
            "events[0].token_ids[1]: -1 is out of range 0..=4294967295",
        ),
        (
            stored_with(3, Value::Array(vec![Value::from(1u64 << 32)])),
            "events[0].token_ids[0]: 4294967296 is out of range 0..=4294967295",
        ),
        (
            stored_with(4, Value::Nil),
            "events[0].block_size: expected an int, found nil",
        ),
        (
            stored_with(5, s("x")),
            "events[0].lora_id: expected an int, found str",
        ),
        (
            stored_with(6, Value::from(1)),
            "events[0].medium: expected a str, found int",
        ),
        (
            stored_with(8, s("x")),
            "events[0].extra_keys: expected an array, found str",
        ),
        (
            stored_with(8, Value::Array(vec![Value::from(1)])),
            "events[0].extra_keys[0]: expected an array or nil, found int",
        ),
        (
            stored_with(9, Value::from(-1)),
            "events[0].group_idx: -1 is out of range 0..=4294967295",
        ),
        (
            stored_with(10, Value::Boolean(true)),
            "events[0].kv_cache_spec_kind: expected a str, found bool",
        ),
    ];
    for (payload, want) in cases {
        let got = err_of(&payload);
        assert!(
            got.starts_with(want),
            "payload {payload:02x?}: got {got:?}, want {want:?}"
        );
    }
}

/// Found by the `kv_events` fuzz target: an extra key holding a str that is not UTF-8 decoded,
/// then re-encoded as bytes, so a decoded batch did not survive re-encoding. Such strings are now
/// refused where they are.
#[test]
fn extra_keys_with_invalid_utf8_are_refused() {
    let crash = include_bytes!(
        "../../../../fuzz/artifacts/kv_events/crash-72f99571557cd88f22ff95ffc11768510ffec2be"
    );
    assert_eq!(
        err_of(&crash[1..]),
        "events[0].extra_keys[1][0]: str is not UTF-8"
    );
    // Nested too: inside a typed key's map.
    let mut nested = hex(
        "92 00 91 99 ab 42 6c 6f 63 6b 53 74 6f 72 65 64 90 c0 90 00 c0 c0 c0 91 91 81 a1 6b a1",
    );
    nested.push(0xff);
    assert_eq!(
        err_of(&nested),
        "events[0].extra_keys[0][0]{0}: str is not UTF-8"
    );
}

#[test]
fn bounds_hold_for_hostile_lengths_and_depth() {
    // An array that claims 2^32-1 elements in 5 bytes: an error, not a 4-billion-slot allocation.
    assert!(err_of(&hex("dd ff ff ff ff")).starts_with("payload is not msgpack"));
    // A map that claims too many keys for a batch.
    let wide = msgpack(Value::Map(
        (0..65)
            .map(|i| (Value::from(format!("k{i}")), Value::Nil))
            .collect(),
    ));
    assert_eq!(
        err_of(&wide),
        "batch: map has 65 keys, more than the 64 a batch or event can have"
    );
    // Deep nesting stops at the depth limit.
    let mut deep = vec![0x91u8; 100];
    deep.push(0xc0);
    assert!(err_of(&deep).starts_with("payload is not msgpack"));
    // Oversized payloads are refused before decoding.
    let big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    assert_eq!(
        decode_batch(&big).unwrap_err(),
        DecodeError::PayloadTooLarge {
            len: MAX_PAYLOAD_BYTES + 1,
            max: MAX_PAYLOAD_BYTES
        }
    );
}

#[test]
fn the_encoder_writes_what_vllm_writes() {
    let mut stored = BlockStored::new(vec![123, 456], None, vec![1, 2, 3, 4], 2);
    stored.medium = Some("GPU".into());
    let batch = EventBatch {
        ts: 1.5,
        events: vec![
            KvEvent::BlockStored(stored),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![123],
                medium: Some("GPU".into()),
                group_idx: None,
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    };
    assert_eq!(
        encode_batch(&batch, EventForm::Array),
        hex(VLLM_ARRAY_SAMPLE)
    );
    let map = encode_batch(&batch, EventForm::Map);
    let mut rd = &map[..];
    let v = rmpv::decode::read_value(&mut rd).unwrap();
    let first = &v.as_array().unwrap()[1].as_array().unwrap()[0];
    let keys: Vec<&str> = first
        .as_map()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name"
        ]
    );
    let [t, seq, payload] = encode_message("kv@a@m", 3, &batch, EventForm::Map);
    assert_eq!((t, seq), (b"kv@a@m".to_vec(), vec![0, 0, 0, 0, 0, 0, 0, 3]));
    assert_eq!(decode_batch(&payload).unwrap(), batch);
    assert_eq!("map".parse::<EventForm>(), Ok(EventForm::Map));
    assert!("json".parse::<EventForm>().is_err());
}

fn opt_str() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-zA-Z0-9_-]{0,12}")
}

fn extra_key_item() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        "[a-z]{0,8}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Binary),
        Just(Value::Nil),
        ("[a-z]{1,6}", any::<u32>())
            .prop_map(|(k, v)| Value::Map(vec![(Value::from(k), Value::from(v))])),
    ]
}

fn stored_event() -> impl Strategy<Value = KvEvent> {
    (
        (
            proptest::collection::vec(any::<u64>(), 0..6),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(any::<u32>(), 0..40),
            any::<u32>(),
            proptest::option::of(any::<i64>()),
            opt_str(),
        ),
        (
            opt_str(),
            proptest::option::of(proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(extra_key_item(), 0..3)),
                0..4,
            )),
            proptest::option::of(any::<u32>()),
            opt_str(),
            proptest::option::of(any::<u32>()),
        ),
    )
        .prop_map(
            |(
                (block_hashes, parent, token_ids, block_size, lora_id, medium),
                (lora_name, extra_keys, group_idx, kind, window),
            )| {
                KvEvent::BlockStored(BlockStored {
                    block_hashes,
                    parent_block_hash: parent,
                    token_ids,
                    block_size,
                    lora_id,
                    medium,
                    lora_name,
                    extra_keys,
                    group_idx,
                    kv_cache_spec_kind: kind,
                    kv_cache_spec_sliding_window: window,
                })
            },
        )
}

fn any_event() -> impl Strategy<Value = KvEvent> {
    prop_oneof![
        stored_event(),
        (
            proptest::collection::vec(any::<u64>(), 0..6),
            opt_str(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(block_hashes, medium, group_idx)| KvEvent::BlockRemoved(
                BlockRemoved {
                    block_hashes,
                    medium,
                    group_idx
                }
            )),
        Just(KvEvent::AllBlocksCleared),
    ]
}

fn any_batch() -> impl Strategy<Value = EventBatch> {
    (
        -1e12f64..1e12,
        proptest::collection::vec(any_event(), 0..6),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

proptest! {
    #[test]
    fn array_form_round_trips(batch in any_batch()) {
        prop_assert_eq!(decode_batch(&encode_batch(&batch, EventForm::Array)).unwrap(), batch);
    }

    #[test]
    fn map_form_round_trips(batch in any_batch()) {
        prop_assert_eq!(decode_batch(&encode_batch(&batch, EventForm::Map)).unwrap(), batch);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
    }
}
