//! The KV-event decoder: payloads, live frames and replay answers.
//! The harness is epp_core::fuzzing::kv_events, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::kv_events(data);
});
