//! The `llm-d.ai/role` endpoint label and the values each role filter keeps, as llm-d defines
//! them.

/// The endpoint label naming what stages of disaggregated serving a pod runs.
pub const ROLE_LABEL: &str = "llm-d.ai/role";
pub const ROLE_DECODE: &str = "decode";
pub const ROLE_PREFILL: &str = "prefill";
pub const ROLE_ENCODE: &str = "encode";
pub const ROLE_PREFILL_DECODE: &str = "prefill-decode";
pub const ROLE_ENCODE_PREFILL: &str = "encode-prefill";
pub const ROLE_ENCODE_PREFILL_DECODE: &str = "encode-prefill-decode";
/// Deprecated spelling of `prefill-decode`.
pub const ROLE_BOTH: &str = "both";

/// Roles that decode. Endpoints without the label decode too.
pub const DECODE_ROLES: &[&str] = &[
    ROLE_DECODE,
    ROLE_PREFILL_DECODE,
    ROLE_BOTH,
    ROLE_ENCODE_PREFILL_DECODE,
];
/// Roles that prefill. Endpoints without the label do not.
pub const PREFILL_ROLES: &[&str] = &[
    ROLE_PREFILL,
    ROLE_ENCODE_PREFILL,
    ROLE_PREFILL_DECODE,
    ROLE_BOTH,
    ROLE_ENCODE_PREFILL_DECODE,
];
/// Roles that encode. Endpoints without the label do not.
pub const ENCODE_ROLES: &[&str] = &[ROLE_ENCODE, ROLE_ENCODE_PREFILL, ROLE_ENCODE_PREFILL_DECODE];
