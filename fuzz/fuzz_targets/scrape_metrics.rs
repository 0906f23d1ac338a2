//! The model-server /metrics parser: first byte picks the engine, the rest is the text.
//! The harness is epp_core::fuzzing::scrape_metrics, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::scrape_metrics(data);
});
