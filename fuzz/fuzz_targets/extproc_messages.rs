//! The ext_proc exchange state machine fed length-delimited ProcessingRequest messages.
//! The harness is epp_core::fuzzing::extproc_messages, shared with the stable corpus replay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    epp_core::fuzzing::extproc_messages(data);
});
