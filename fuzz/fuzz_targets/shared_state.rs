//! What picker replicas read from the shared-state Redis: stream entries, snapshots, loads.
//! The harness is epp_core::fuzzing::shared_state, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::shared_state(data);
});
