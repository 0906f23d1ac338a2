//! What replicas write into Redis, and the checks everything read back must pass.
//!
//! A stream entry has three fields: `v` (the format version), `r` (the writing replica's id) and
//! `b` (a MessagePack [`Batch`], structs as arrays). The snapshot and each replica's load report
//! are single MessagePack values under their own keys. Everything read is untrusted: another
//! program may write to the same keys, an older or newer replica may use another format, and a
//! replica configured with another block size hashes prompts differently. Such entries are
//! refused (and counted), never applied, and every length is bounded before anything is kept.

use serde::{Deserialize, Serialize};

/// Format version written in every entry (`v`) and value; others are refused as foreign.
pub const FORMAT_VERSION: u32 = 1;
/// Inserts in one stream entry at most (the publisher batches up to this).
pub const MAX_INSERTS_PER_BATCH: usize = 256;
/// Block hashes in one insert at most (a 1 MiB prompt cut into 64-byte blocks is 16 Ki).
pub const MAX_HASHES_PER_INSERT: usize = 16 * 1024;
/// Longest endpoint address accepted (`host:port`).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Bytes of one stream entry's batch at most.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of a snapshot at most (about 8 M block hashes).
pub const MAX_SNAPSHOT_BYTES: usize = 80 * 1024 * 1024;
/// Block hashes in a snapshot at most, over all endpoints.
pub const MAX_SNAPSHOT_BLOCKS: usize = 8 * 1024 * 1024;
/// Endpoints in a snapshot or load report at most (the index tracks 128 slots).
pub const MAX_ENDPOINTS: usize = 1024;
/// Longest replica id accepted.
pub const MAX_REPLICA_ID_LEN: usize = 128;

/// What one replica learned from a run of picks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The approximate index's block size in bytes: a replica cutting prompts into other
    /// blocks computes other hashes, so its entries are refused.
    pub block_bytes: u32,
    /// When it was published (Unix milliseconds): the receiver's lag.
    pub sent_ms: u64,
    pub inserts: Vec<Insert>,
}

/// One pick: the endpoint (by address, the identity every replica discovers alike) now holds
/// these prefix blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insert {
    /// `host:port`, as discovery reports it.
    pub endpoint: String,
    /// Chained block hashes of the approximate index.
    pub hashes: Vec<u64>,
    /// Request keys of the precise index, indexed speculatively until the engine's events
    /// confirm them (empty without a precise producer).
    #[serde(default)]
    pub speculative: Vec<u64>,
}

/// A compact copy of the approximate index: warm start for replicas that start later and for
/// a new leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub block_bytes: u32,
    /// When it was taken (Unix milliseconds).
    pub taken_ms: u64,
    /// The writer had applied the stream up to this id: readers continue after it.
    pub stream_id: String,
    pub replica: String,
    pub endpoints: Vec<EndpointBlocks>,
}

/// One endpoint's blocks in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointBlocks {
    pub endpoint: String,
    pub hashes: Vec<u64>,
}

/// One replica's requests in flight per endpoint, refreshed often and expiring by itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub version: u32,
    pub sent_ms: u64,
    /// `(address, requests in flight)`.
    pub endpoints: Vec<(String, u32)>,
}

/// Why something read from Redis was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not ours or not readable: missing fields, bad MessagePack, lengths over the bounds.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Ours but not compatible with this replica (another format version or block size).
    #[error("incompatible: {0}")]
    Incompatible(String),
}

impl Refusal {
    /// The `reason` label it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Incompatible(_) => "incompatible",
        }
    }
}

fn malformed(msg: impl Into<String>) -> Refusal {
    Refusal::Malformed(msg.into())
}

/// Encodes a batch for the `b` field.
pub fn encode_batch(b: &Batch) -> Vec<u8> {
    rmp_serde::to_vec(b).unwrap_or_default()
}

/// One stream entry as read: its fields, by name.
#[derive(Debug, Default)]
pub struct RawEntry<'a> {
    pub version: Option<&'a [u8]>,
    pub replica: Option<&'a [u8]>,
    pub batch: Option<&'a [u8]>,
}

/// A decoded, checked stream entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub replica: String,
    pub batch: Batch,
}

/// Checks and decodes one stream entry for a replica whose block size is `block_bytes`.
pub fn decode_entry(raw: &RawEntry<'_>, block_bytes: u32) -> Result<Entry, Refusal> {
    let version = raw.version.ok_or_else(|| malformed("no `v` field"))?;
    let version: u32 = std::str::from_utf8(version)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| malformed("`v` is not a number"))?;
    if version != FORMAT_VERSION {
        return Err(Refusal::Incompatible(format!(
            "format version {version}, this replica reads {FORMAT_VERSION}"
        )));
    }
    let replica = raw.replica.ok_or_else(|| malformed("no `r` field"))?;
    if replica.is_empty() || replica.len() > MAX_REPLICA_ID_LEN {
        return Err(malformed("`r` is empty or too long"));
    }
    let replica = std::str::from_utf8(replica)
        .map_err(|_| malformed("`r` is not UTF-8"))?
        .to_string();
    let bytes = raw.batch.ok_or_else(|| malformed("no `b` field"))?;
    let batch = decode_batch(bytes)?;
    if batch.block_bytes != block_bytes {
        return Err(Refusal::Incompatible(format!(
            "block size {} bytes, this replica uses {block_bytes}",
            batch.block_bytes
        )));
    }
    Ok(Entry { replica, batch })
}

/// Decodes and bounds-checks a batch (any block size).
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, Refusal> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(malformed(format!(
            "batch of {} bytes, more than {MAX_ENTRY_BYTES}",
            bytes.len()
        )));
    }
    // Lengths are checked before allocation by the decoder's own bound (the input's size):
    // MessagePack arrays cannot claim more elements than there are bytes left.
    let batch: Batch =
        rmp_serde::from_slice(bytes).map_err(|e| malformed(format!("batch: {e}")))?;
    if batch.inserts.len() > MAX_INSERTS_PER_BATCH {
        return Err(malformed(format!(
            "{} inserts in one batch, more than {MAX_INSERTS_PER_BATCH}",
            batch.inserts.len()
        )));
    }
    for i in &batch.inserts {
        check_address(&i.endpoint)?;
        if i.hashes.len() > MAX_HASHES_PER_INSERT || i.speculative.len() > MAX_HASHES_PER_INSERT {
            return Err(malformed(format!(
                "an insert of more than {MAX_HASHES_PER_INSERT} blocks"
            )));
        }
    }
    Ok(batch)
}

fn check_address(a: &str) -> Result<(), Refusal> {
    if a.is_empty() || a.len() > MAX_ADDRESS_LEN {
        return Err(malformed("an endpoint address that is empty or too long"));
    }
    Ok(())
}

/// Encodes the snapshot.
pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    rmp_serde::to_vec(s).unwrap_or_default()
}

/// Decodes and checks a snapshot for a replica whose block size is `block_bytes`.
pub fn decode_snapshot(bytes: &[u8], block_bytes: u32) -> Result<Snapshot, Refusal> {
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(malformed(format!(
            "snapshot of {} bytes, more than {MAX_SNAPSHOT_BYTES}",
            bytes.len()
        )));
    }
    let s: Snapshot =
        rmp_serde::from_slice(bytes).map_err(|e| malformed(format!("snapshot: {e}")))?;
    if s.version != FORMAT_VERSION {
        return Err(Refusal::Incompatible(format!(
            "snapshot format version {}, this replica reads {FORMAT_VERSION}",
            s.version
        )));
    }
    if s.block_bytes != block_bytes {
        return Err(Refusal::Incompatible(format!(
            "snapshot block size {} bytes, this replica uses {block_bytes}",
            s.block_bytes
        )));
    }
    if s.endpoints.len() > MAX_ENDPOINTS {
        return Err(malformed("snapshot of too many endpoints"));
    }
    let mut blocks = 0usize;
    for e in &s.endpoints {
        check_address(&e.endpoint)?;
        blocks = blocks.saturating_add(e.hashes.len());
    }
    if blocks > MAX_SNAPSHOT_BLOCKS {
        return Err(malformed(format!(
            "snapshot of {blocks} blocks, more than {MAX_SNAPSHOT_BLOCKS}"
        )));
    }
    if s.stream_id.len() > 64 {
        return Err(malformed("snapshot stream id too long"));
    }
    Ok(s)
}

/// Encodes a load report.
pub fn encode_load(l: &Load) -> Vec<u8> {
    rmp_serde::to_vec(l).unwrap_or_default()
}

/// Decodes and checks a load report.
pub fn decode_load(bytes: &[u8]) -> Result<Load, Refusal> {
    if bytes.len() > 256 * 1024 {
        return Err(malformed("load report too large"));
    }
    let l: Load = rmp_serde::from_slice(bytes).map_err(|e| malformed(format!("load: {e}")))?;
    if l.version != FORMAT_VERSION {
        return Err(Refusal::Incompatible(format!(
            "load format version {}, this replica reads {FORMAT_VERSION}",
            l.version
        )));
    }
    if l.endpoints.len() > MAX_ENDPOINTS {
        return Err(malformed("load report of too many endpoints"));
    }
    for (a, _) in &l.endpoints {
        check_address(a)?;
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            block_bytes: 64,
            sent_ms: 1_700_000_000_000,
            inserts: vec![
                Insert {
                    endpoint: "10.0.0.1:8000".into(),
                    hashes: vec![1, u64::MAX, 3],
                    speculative: vec![],
                },
                Insert {
                    endpoint: "10.0.0.2:8000".into(),
                    hashes: vec![7],
                    speculative: vec![9, 10],
                },
            ],
        }
    }

    fn raw<'a>(v: &'a [u8], r: &'a [u8], b: &'a [u8]) -> RawEntry<'a> {
        RawEntry {
            version: Some(v),
            replica: Some(r),
            batch: Some(b),
        }
    }

    #[test]
    fn batches_round_trip_bytes_identical() {
        let b = batch();
        let bytes = encode_batch(&b);
        let e = decode_entry(&raw(b"1", b"replica-a", &bytes), 64).unwrap();
        assert_eq!(e.replica, "replica-a");
        assert_eq!(e.batch, b);
        assert_eq!(encode_batch(&e.batch), bytes);
    }

    #[test]
    fn foreign_and_incompatible_entries_are_refused_by_reason() {
        let bytes = encode_batch(&batch());
        let cases: Vec<(RawEntry<'_>, &str, &str)> = vec![
            (RawEntry::default(), "malformed", "no `v`"),
            (raw(b"2", b"a", &bytes), "incompatible", "format version 2"),
            (raw(b"x", b"a", &bytes), "malformed", "`v` is not a number"),
            (
                RawEntry {
                    replica: None,
                    ..raw(b"1", b"a", &bytes)
                },
                "malformed",
                "no `r`",
            ),
            (raw(b"1", b"", &bytes), "malformed", "`r` is empty"),
            (raw(b"1", b"a", b"\xc1junk"), "malformed", "batch:"),
        ];
        for (r, reason, msg) in cases {
            let e = decode_entry(&r, 64).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
            assert!(e.to_string().contains(msg), "{e} lacks {msg}");
        }
        let e = decode_entry(&raw(b"1", b"a", &bytes), 128).unwrap_err();
        assert_eq!(
            e,
            Refusal::Incompatible("block size 64 bytes, this replica uses 128".into())
        );
    }

    #[test]
    fn bounds_are_checked() {
        let mut b = batch();
        b.inserts = vec![Insert::default(); MAX_INSERTS_PER_BATCH + 1];
        let e = decode_batch(&encode_batch(&b)).unwrap_err();
        assert!(e.to_string().contains("inserts in one batch"), "{e}");
        let mut b = batch();
        b.inserts[0].endpoint = "x".repeat(MAX_ADDRESS_LEN + 1);
        assert!(decode_batch(&encode_batch(&b)).is_err());
        let mut b = batch();
        b.inserts[0].hashes = vec![0; MAX_HASHES_PER_INSERT + 1];
        assert!(decode_batch(&encode_batch(&b)).is_err());
        assert!(decode_batch(&vec![0u8; MAX_ENTRY_BYTES + 1]).is_err());
        // An array header claiming 2^32 elements in a few bytes is an error, not an allocation.
        assert!(decode_batch(b"\x93\x40\x01\xdd\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn an_older_batch_without_speculative_keys_decodes() {
        // [block_bytes, sent_ms, [[endpoint, hashes]]]: the trailing field left out.
        let v = rmpv::Value::Array(vec![
            64.into(),
            5.into(),
            rmpv::Value::Array(vec![rmpv::Value::Array(vec![
                "a:1".into(),
                rmpv::Value::Array(vec![1.into(), 2.into()]),
            ])]),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &v).unwrap();
        let b = decode_batch(&bytes).unwrap();
        assert_eq!(b.inserts[0].hashes, vec![1, 2]);
        assert!(b.inserts[0].speculative.is_empty());
    }

    #[test]
    fn snapshots_and_loads_round_trip_and_are_checked() {
        let s = Snapshot {
            version: FORMAT_VERSION,
            block_bytes: 64,
            taken_ms: 9,
            stream_id: "1-0".into(),
            replica: "a".into(),
            endpoints: vec![EndpointBlocks {
                endpoint: "h:1".into(),
                hashes: vec![4, 5],
            }],
        };
        let bytes = encode_snapshot(&s);
        assert_eq!(decode_snapshot(&bytes, 64).unwrap(), s);
        assert_eq!(
            decode_snapshot(&bytes, 32).unwrap_err().reason(),
            "incompatible"
        );
        assert_eq!(
            decode_snapshot(b"nonsense", 64).unwrap_err().reason(),
            "malformed"
        );
        let l = Load {
            version: FORMAT_VERSION,
            sent_ms: 1,
            endpoints: vec![("h:1".into(), 3)],
        };
        assert_eq!(decode_load(&encode_load(&l)).unwrap(), l);
        assert!(decode_load(b"\x00").is_err());
    }
}
