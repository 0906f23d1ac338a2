//! The EndpointPickerConfig loader and scheduler construction.
//! The harness is epp_core::fuzzing::config, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::config(data);
});
