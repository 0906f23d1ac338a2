//! The request-body parser: first byte picks the API operation, the rest is the body.
//! The harness is epp_core::fuzzing::request_body, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::request_body(data);
});
