//! Settings of one simulated server and their validation, done before anything binds.
//!
//! Field names mirror the `epp sim` flags (`max_num_seqs` ↔ `--max-num-seqs`), and validation
//! errors name the flag, so the CLI can print them as they are.

use std::path::PathBuf;
use std::time::Duration;

use crate::faults::Faults;
use crate::kv_events::KvEventsConfig;
use crate::latency::LatencyModel;
use crate::pd::{KvTransferConfig, Role};

/// Everything that defines one simulated vLLM server. `Default` gives realistic but fast values.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Server name, sent in `x-inference-pod` and used in logs.
    pub name: String,
    /// Served (base) model name, the `id` in `/v1/models` and the `model_name` metric label.
    pub model: String,
    /// LoRA adapters served on top of the base model (`name` or `name=path`).
    pub lora_modules: Vec<String>,
    /// Maximum number of distinct adapters running at once.
    pub max_loras: usize,
    /// Maximum number of running sequences; more requests wait in a FIFO queue.
    pub max_num_seqs: usize,
    /// KV block size in tokens.
    pub block_size: usize,
    /// KV cache capacity in blocks (`num_gpu_blocks`).
    pub num_gpu_blocks: usize,
    /// Longest prompt + output, in tokens; longer requests get 400.
    pub max_model_len: usize,
    /// Output length when a request sets neither `max_tokens` nor `max_completion_tokens`.
    pub default_max_tokens: usize,
    /// Latency model parameters.
    pub latency: LatencyModel,
    /// Prefill/decode interference (`--prefill-interference-tokens`; 0, the default: off).
    /// vLLM runs the chunks of prefilling prompts in the same engine steps as the decode tokens
    /// of the sequences already running, so a long prefill slows every co-running decode. With
    /// this set to C, each inter-token gap of a decoding sequence grows by
    /// `min(C, P) × prefill_per_token_ms`, where P is the number of uncached prompt tokens the
    /// engine's requests are computing (from admission to their first token) when the gap
    /// starts: C plays vLLM's per-step token budget (`max_num_batched_tokens`). Prompt blocks
    /// read from a prefill server (P/D) are not computed and add nothing.
    pub prefill_interference_tokens: usize,
    /// Seed of the server's RNG (jitter and error injection).
    pub seed: u64,
    /// Largest accepted request body in bytes; larger → 413.
    pub max_body_bytes: usize,
    /// Faults in force at start-up.
    pub faults: Faults,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// KV-cache event publishing (off by default).
    pub kv_events: KvEventsConfig,
    /// A Hugging Face `tokenizer.json` to tokenize with (`--tokenizer`); `None`: 4 bytes per
    /// token. Loaded when the server starts.
    pub tokenizer: Option<PathBuf>,
    /// Prefill/decode role (`--role`, llm-d's `llm-d.ai/role` label): which P/D phases the
    /// server accepts. Plain requests are served by every role.
    pub role: Role,
    /// P/D KV transfer: cost, hold timeout and bound, advertised host.
    pub kv_transfer: KvTransferConfig,
    /// Data-parallel ranks per server (`--data-parallel-size`); [`crate::spawn_many`] starts one
    /// engine per rank.
    pub data_parallel_size: usize,
    /// This engine's data-parallel rank (set by [`crate::spawn_many`]; 0 for a lone server):
    /// the `engine` metric label, the KV events' `data_parallel_rank`, the
    /// `x-data-parallel-rank` header.
    pub data_parallel_rank: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            name: "sim-0".into(),
            model: "sim-model".into(),
            lora_modules: Vec::new(),
            max_loras: 1,
            max_num_seqs: 16,
            block_size: 16,
            num_gpu_blocks: 8192,
            max_model_len: 32768,
            default_max_tokens: 16,
            latency: LatencyModel::default(),
            prefill_interference_tokens: 0,
            seed: 0,
            max_body_bytes: 10 * 1024 * 1024,
            faults: Faults::default(),
            shutdown_grace: Duration::from_secs(30),
            kv_events: KvEventsConfig::off(),
            tokenizer: None,
            role: Role::Both,
            kv_transfer: KvTransferConfig::default(),
            data_parallel_size: 1,
            data_parallel_rank: 0,
        }
    }
}

/// A setting that cannot work. Displayed as `invalid --flag: reason`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {flag}: {message}")]
pub struct ConfigError {
    /// The `epp sim` flag (and, without dashes, the `SimConfig` field).
    pub flag: &'static str,
    pub message: String,
}

fn err(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        message: message.into(),
    }
}

fn non_negative(flag: &'static str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(err(
            flag,
            format!("must be a non-negative number of milliseconds, got {v}"),
        ))
    }
}

impl SimConfig {
    /// The engine id a P/D prefill answer names in `remote_engine_id`: the server name, with
    /// `_dp<rank>` appended when the server has several data-parallel ranks (as vLLM does).
    pub fn engine_id(&self) -> String {
        if self.data_parallel_size > 1 {
            format!("{}_dp{}", self.name, self.data_parallel_rank)
        } else {
            self.name.clone()
        }
    }

    /// The adapter names (the part before `=` of each `lora_modules` entry).
    pub fn lora_names(&self) -> Vec<String> {
        self.lora_modules
            .iter()
            .map(|m| m.split_once('=').map(|(n, _)| n).unwrap_or(m).to_string())
            .collect()
    }

    /// Check every setting; the error names the flag at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(err("--name-prefix", "server name must not be empty"));
        }
        if self.model.trim().is_empty() {
            return Err(err("--model", "must not be empty"));
        }
        if self.max_num_seqs == 0 {
            return Err(err("--max-num-seqs", "must be at least 1"));
        }
        if self.block_size == 0 {
            return Err(err("--block-size", "must be at least 1"));
        }
        if self.num_gpu_blocks == 0 {
            return Err(err("--num-gpu-blocks", "must be at least 1"));
        }
        if self.max_model_len == 0 {
            return Err(err("--max-model-len", "must be at least 1"));
        }
        if self.default_max_tokens == 0 {
            return Err(err("--default-max-tokens", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(err("--max-body-bytes", "must be at least 1"));
        }
        let names = self.lora_names();
        if !names.is_empty() && self.max_loras == 0 {
            return Err(err(
                "--max-loras",
                "must be at least 1 when --lora-modules is given",
            ));
        }
        for (i, n) in names.iter().enumerate() {
            if n.trim().is_empty() {
                return Err(err("--lora-modules", "adapter names must not be empty"));
            }
            if *n == self.model {
                return Err(err(
                    "--lora-modules",
                    format!("adapter {n:?} has the same name as the base model"),
                ));
            }
            if names[..i].contains(n) {
                return Err(err(
                    "--lora-modules",
                    format!("adapter {n:?} is listed twice"),
                ));
            }
        }
        let l = &self.latency;
        non_negative("--prefill-overhead-ms", l.prefill_overhead_ms)?;
        non_negative("--prefill-per-token-ms", l.prefill_per_token_ms)?;
        non_negative("--inter-token-ms", l.inter_token_ms)?;
        non_negative("--inter-token-per-seq-ms", l.inter_token_per_seq_ms)?;
        if !(0.0..1.0).contains(&l.jitter) {
            return Err(err(
                "--jitter",
                format!("must be in [0, 1), got {}", l.jitter),
            ));
        }
        let kv = &self.kv_events;
        for (flag, ep) in [
            ("--kv-events-endpoint", &kv.endpoint),
            ("--kv-events-replay-endpoint", &kv.replay_endpoint),
            ("--zmq-endpoint", &kv.connect),
        ] {
            if let Some(ep) = ep {
                if !ep.starts_with("tcp://") || !ep[6..].contains(':') {
                    return Err(err(flag, format!("must be tcp://host:port, got {ep:?}")));
                }
            }
        }
        if kv.endpoint.is_some() && kv.connect.is_some() {
            return Err(err(
                "--zmq-endpoint",
                "excludes --kv-events-endpoint: events are published on one socket, bound here or connected to a central one",
            ));
        }
        if kv.connect.as_deref().is_some_and(|ep| {
            ep.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().map_or(true, |p| p == 0))
        }) {
            return Err(err(
                "--zmq-endpoint",
                format!(
                    "needs a port in 1..65535, got {:?}",
                    kv.connect.as_deref().unwrap_or_default()
                ),
            ));
        }
        if kv.endpoint.is_none() && kv.replay_endpoint.is_some() {
            return Err(err(
                "--kv-events-replay-endpoint",
                "needs --kv-events-endpoint",
            ));
        }
        if kv.buffer_steps == 0 {
            return Err(err("--kv-events-buffer-steps", "must be at least 1"));
        }
        if kv.topic.as_deref().is_some_and(|t| t.is_empty()) {
            return Err(err("--kv-events-topic", "must not be empty"));
        }
        if self
            .tokenizer
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(err("--tokenizer", "must not be empty"));
        }
        let kt = &self.kv_transfer;
        non_negative("--kv-transfer-ms-per-block", kt.ms_per_block)?;
        if kt.timeout.is_zero() {
            return Err(err("--kv-transfer-timeout-secs", "must be more than 0"));
        }
        if kt.max_held == 0 {
            return Err(err("--kv-transfer-max-held", "must be at least 1"));
        }
        if kt
            .host
            .as_deref()
            .is_some_and(|h| h.trim().is_empty() || h.contains(['/', ' ']))
        {
            return Err(err(
                "--kv-transfer-host",
                format!(
                    "must be a host name or address, got {:?}",
                    kt.host.as_deref().unwrap_or_default()
                ),
            ));
        }
        if self.data_parallel_size == 0 {
            return Err(err("--data-parallel-size", "must be at least 1"));
        }
        if self.data_parallel_size > crate::pd::MAX_DATA_PARALLEL_SIZE {
            return Err(err(
                "--data-parallel-size",
                format!("must be at most {}", crate::pd::MAX_DATA_PARALLEL_SIZE),
            ));
        }
        if self.data_parallel_rank >= self.data_parallel_size {
            return Err(err(
                "--data-parallel-size",
                format!(
                    "rank {} does not exist with {} ranks",
                    self.data_parallel_rank, self.data_parallel_size
                ),
            ));
        }
        self.faults.validate().map_err(|e| {
            let flag = match e.field {
                "error_rate" => "--error-rate",
                "error_status" => "--error-status",
                _ => "--added-latency-ms",
            };
            err(flag, e.message)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        SimConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_flag() {
        type Mutation = Box<dyn Fn(&mut SimConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("--block-size", Box::new(|c| c.block_size = 0)),
            ("--max-num-seqs", Box::new(|c| c.max_num_seqs = 0)),
            ("--num-gpu-blocks", Box::new(|c| c.num_gpu_blocks = 0)),
            ("--jitter", Box::new(|c| c.latency.jitter = 1.0)),
            (
                "--inter-token-ms",
                Box::new(|c| c.latency.inter_token_ms = -1.0),
            ),
            ("--error-rate", Box::new(|c| c.faults.error_rate = 2.0)),
            ("--error-status", Box::new(|c| c.faults.error_status = 200)),
            (
                "--max-loras",
                Box::new(|c| {
                    c.lora_modules = vec!["a".into()];
                    c.max_loras = 0
                }),
            ),
            (
                "--lora-modules",
                Box::new(|c| c.lora_modules = vec!["a=/x".into(), "a".into()]),
            ),
            (
                "--kv-events-endpoint",
                Box::new(|c| c.kv_events.endpoint = Some("ipc:///tmp/x".into())),
            ),
            (
                "--kv-events-replay-endpoint",
                Box::new(|c| c.kv_events.replay_endpoint = Some("tcp://127.0.0.1:1".into())),
            ),
            (
                "--kv-events-buffer-steps",
                Box::new(|c| c.kv_events.buffer_steps = 0),
            ),
            (
                "--zmq-endpoint",
                Box::new(|c| c.kv_events.connect = Some("ipc:///tmp/x".into())),
            ),
            (
                "--zmq-endpoint",
                Box::new(|c| c.kv_events.connect = Some("tcp://127.0.0.1:0".into())),
            ),
            (
                "--zmq-endpoint",
                Box::new(|c| {
                    c.kv_events.connect = Some("tcp://127.0.0.1:5557".into());
                    c.kv_events.endpoint = Some("tcp://127.0.0.1:5558".into())
                }),
            ),
            (
                "--kv-transfer-ms-per-block",
                Box::new(|c| c.kv_transfer.ms_per_block = f64::NAN),
            ),
            (
                "--kv-transfer-timeout-secs",
                Box::new(|c| c.kv_transfer.timeout = Duration::ZERO),
            ),
            (
                "--kv-transfer-max-held",
                Box::new(|c| c.kv_transfer.max_held = 0),
            ),
            (
                "--kv-transfer-host",
                Box::new(|c| c.kv_transfer.host = Some("http://x".into())),
            ),
            (
                "--data-parallel-size",
                Box::new(|c| c.data_parallel_size = 0),
            ),
            (
                "--data-parallel-size",
                Box::new(|c| {
                    c.data_parallel_size = 2;
                    c.data_parallel_rank = 2
                }),
            ),
        ];
        for (flag, f) in cases {
            let mut c = SimConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.flag, flag);
            assert!(e.to_string().starts_with(&format!("invalid {flag}: ")));
        }
    }

    #[test]
    fn lora_names_strip_paths() {
        let c = SimConfig {
            lora_modules: vec!["a=/p/a".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(c.lora_names(), vec!["a".to_string(), "b".to_string()]);
    }
}
