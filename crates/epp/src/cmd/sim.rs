//! `epp sim`: run one or more simulated vLLM servers (the `epp-sim` crate) until SIGTERM/SIGINT.
//! This module only turns flags into `SimConfig`s, validates them before anything binds, starts
//! the servers and shuts them down gracefully.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use epp_core::telemetry::Shutdown;
use epp_sim::{Faults, KvEventsConfig, KvTransferConfig, LatencyModel, Role, SimConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Number of independent servers to start (each with its own cache, queue and metrics).
    #[arg(long, default_value_t = 1)]
    pub count: usize,

    /// Port of the first server; server i listens on base-port + i (with --data-parallel-size
    /// N: rank r of server i on base-port + i*N + r). 0 = ephemeral ports.
    #[arg(long, default_value_t = 8000)]
    pub base_port: u16,

    /// Data-parallel ranks per server, one engine (cache, queue, metrics) each, as vLLM's
    /// --data-parallel-size: rank r of server i listens on base-port + i*N + r, publishes KV events
    /// on the KV-event ports + i*N + r with data_parallel_rank r, and answers with
    /// `x-data-parallel-rank: r`. Combines with --count.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub data_parallel_size: usize,

    /// Address to listen on (vLLM's default is all interfaces).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Server names are `<prefix>-<i>` (i from 0), sent in the `x-inference-pod` header.
    #[arg(long, default_value = "sim")]
    pub name_prefix: String,

    /// Served model name (`/v1/models` id and the `model_name` metric label).
    #[arg(long, alias = "served-model-name", default_value = "sim-model")]
    pub model: String,

    /// LoRA adapters served on top of the model: `name` or `name=path`, space-separated.
    #[arg(long, num_args = 1.., value_name = "NAME[=PATH]")]
    pub lora_modules: Vec<String>,

    /// Maximum number of distinct LoRA adapters running at once.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,

    /// Maximum number of running sequences; further requests wait in a FIFO queue.
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,

    /// KV cache block size in tokens (1 token = 4 characters).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// KV cache capacity in blocks.
    #[arg(long, alias = "kv-cache-blocks", default_value_t = 8192)]
    pub num_gpu_blocks: usize,

    /// Maximum prompt + output length in tokens; longer requests get 400.
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: usize,

    /// Output tokens when a request sets neither max_tokens nor max_completion_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: usize,

    /// Fixed prefill cost per request, in ms (fractional allowed).
    #[arg(long, default_value_t = 5.0)]
    pub prefill_overhead_ms: f64,

    /// Prefill cost per uncached prompt token, in ms.
    #[arg(long, default_value_t = 0.05)]
    pub prefill_per_token_ms: f64,

    /// Time between output tokens with one running sequence, in ms.
    #[arg(long, default_value_t = 10.0)]
    pub inter_token_ms: f64,

    /// Extra inter-token time per additional running sequence, in ms.
    #[arg(long, default_value_t = 0.2)]
    pub inter_token_per_seq_ms: f64,

    /// Relative jitter applied to every latency, in [0, 1) (0.1 = ±10%).
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,

    /// Prefill/decode interference, as vLLM's per-step token budget C: while requests compute
    /// P uncached prompt tokens, every inter-token gap of the other running sequences grows by
    /// min(C, P) × --prefill-per-token-ms (prefill chunks share the decode steps). 0: off.
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    pub prefill_interference_tokens: usize,

    /// Seed of the RNG used for jitter and error injection (server i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Fault: fraction in [0, 1] of inference requests answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,

    /// Fault: HTTP status of injected errors (e.g. 429, 500, 503).
    #[arg(long, default_value_t = 503)]
    pub error_status: u16,

    /// Fault: latency added before every inference request, in ms.
    #[arg(long, default_value_t = 0.0)]
    pub added_latency_ms: f64,

    /// Fault: /health answers 503.
    #[arg(long)]
    pub unhealthy: bool,

    /// Fault: refuse connections for this many ms after start-up, then accept.
    #[arg(long, value_name = "MS")]
    pub refuse_connections_ms: Option<f64>,

    /// Publish KV-cache events (vLLM's ZeroMQ format) on this PUB endpoint, bound by the
    /// simulator; off when unset. Server i binds port + i (rank r of server i: port + i*N + r).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    pub kv_events_endpoint: Option<String>,

    /// Publish KV-cache events by connecting to a central SUB socket the picker binds
    /// (llm-d's kvEventsConfig.zmqEndpoint, llm-d-inference-sim's --zmq-endpoint) instead of
    /// binding a PUB socket: every server and rank connects to this same endpoint, reconnecting
    /// when it goes away, each with its own topic kv@<host:port>@<model> (the host is
    /// --kv-transfer-host, else the listen address, loopback for 0.0.0.0). Excludes
    /// --kv-events-endpoint.
    #[arg(long, value_name = "tcp://HOST:PORT")]
    pub zmq_endpoint: Option<String>,

    /// Topic of every KV-event message [default: kv@<server name>@<model>; with --zmq-endpoint
    /// kv@<host:port>@<model>, the pod id the picker maps to an endpoint].
    #[arg(long, value_name = "TOPIC")]
    pub kv_events_topic: Option<String>,

    /// Answer KV-event replay requests on this ROUTER endpoint. Server i binds port + i (rank r
    /// of server i: port + i*N + r).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    pub kv_events_replay_endpoint: Option<String>,

    /// KV-event batches kept for replay (vLLM's buffer_steps).
    #[arg(long, default_value_t = epp_sim::kv_events::DEFAULT_BUFFER_STEPS)]
    pub kv_events_buffer_steps: usize,

    /// KV-event encoding: `array` (positional, tag first) or `map` (tagged by "type").
    #[arg(long, default_value = "array", value_parser = ["array", "map"])]
    pub kv_events_format: String,

    /// Tokenize with this Hugging Face tokenizer.json (prompt lengths, /tokenize, KV-event token
    /// ids, block hashes) instead of 4 bytes per token. Loaded at start-up, never downloaded.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<std::path::PathBuf>,

    /// Prefill/decode role (llm-d's llm-d.ai/role): `prefill` serves P/D prefills
    /// (kv_transfer_params.do_remote_decode) and refuses decodes, `decode` the reverse, `both`
    /// serves both. Every role serves plain requests.
    #[arg(long, default_value = "both", value_parser = ["prefill", "decode", "both"])]
    pub role: String,

    /// Cost of reading one KV block from a prefill server, in ms (default: a 2 MiB block of an
    /// 8B model over a 25 GB/s NIXL link).
    #[arg(long, default_value_t = 0.08, value_name = "MS")]
    pub kv_transfer_ms_per_block: f64,

    /// How long a prefill keeps its KV blocks for a decoder that does not read them, in seconds
    /// (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    #[arg(
        long,
        alias = "kv-transfer-timeout",
        default_value_t = 480.0,
        value_name = "SECS"
    )]
    pub kv_transfer_timeout_secs: f64,

    /// Most prefills holding KV blocks for decoders at once; further prefills get 503.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub kv_transfer_max_held: usize,

    /// Host that prefill answers name in kv_transfer_params.remote_host, where decoders release
    /// the blocks [default: the --host address; 127.0.0.1 when it is 0.0.0.0 or ::]. Set it to
    /// the pod IP in Kubernetes.
    #[arg(long, value_name = "HOST")]
    pub kv_transfer_host: Option<String>,

    /// Grace period for in-flight requests on SIGTERM/SIGINT, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_secs: f64,
}

impl Args {
    /// The configuration shared by every server (name and seed are set per server).
    pub fn to_config(&self) -> Result<SimConfig, String> {
        if self.count == 0 {
            return Err("invalid --count: must be at least 1".into());
        }
        if self.data_parallel_size == 0 {
            return Err("invalid --data-parallel-size: must be at least 1".into());
        }
        let engines = self.count.saturating_mul(self.data_parallel_size);
        if self.base_port != 0 && self.base_port as usize + engines - 1 > u16::MAX as usize {
            return Err(format!(
                "invalid --base-port: {} + {} servers × {} ranks runs past port 65535",
                self.base_port, self.count, self.data_parallel_size
            ));
        }
        if !self.kv_transfer_timeout_secs.is_finite()
            || self.kv_transfer_timeout_secs <= 0.0
            || self.kv_transfer_timeout_secs > 1e9
        {
            return Err(format!(
                "invalid --kv-transfer-timeout-secs: must be a positive number of seconds, got {}",
                self.kv_transfer_timeout_secs
            ));
        }
        if self.name_prefix.trim().is_empty() {
            return Err("invalid --name-prefix: must not be empty".into());
        }
        if !self.shutdown_grace_secs.is_finite() || self.shutdown_grace_secs < 0.0 {
            return Err(format!(
                "invalid --shutdown-grace-secs: must be a non-negative number, got {}",
                self.shutdown_grace_secs
            ));
        }
        if let Some(ms) = self.refuse_connections_ms {
            if !ms.is_finite() || ms < 0.0 {
                return Err(format!(
                    "invalid --refuse-connections-ms: must be a non-negative number, got {ms}"
                ));
            }
        }
        let cfg = SimConfig {
            name: format!("{}-0", self.name_prefix),
            model: self.model.clone(),
            lora_modules: self.lora_modules.clone(),
            max_loras: self.max_loras,
            max_num_seqs: self.max_num_seqs,
            block_size: self.block_size,
            num_gpu_blocks: self.num_gpu_blocks,
            max_model_len: self.max_model_len,
            default_max_tokens: self.default_max_tokens,
            latency: LatencyModel {
                prefill_overhead_ms: self.prefill_overhead_ms,
                prefill_per_token_ms: self.prefill_per_token_ms,
                inter_token_ms: self.inter_token_ms,
                inter_token_per_seq_ms: self.inter_token_per_seq_ms,
                jitter: self.jitter,
            },
            prefill_interference_tokens: self.prefill_interference_tokens,
            seed: self.seed,
            max_body_bytes: self.max_body_bytes,
            faults: Faults {
                error_rate: self.error_rate,
                error_status: self.error_status,
                added_latency_ms: self.added_latency_ms,
                unhealthy: self.unhealthy,
                refuse_connections: false,
            },
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_secs),
            kv_events: KvEventsConfig {
                endpoint: self.kv_events_endpoint.clone(),
                connect: self.zmq_endpoint.clone(),
                topic: self.kv_events_topic.clone(),
                replay_endpoint: self.kv_events_replay_endpoint.clone(),
                buffer_steps: self.kv_events_buffer_steps,
                format: self
                    .kv_events_format
                    .parse()
                    .map_err(|e| format!("invalid --kv-events-format: {e}"))?,
            },
            tokenizer: self.tokenizer.clone(),
            role: self
                .role
                .parse::<Role>()
                .map_err(|e| format!("invalid --role: {e}"))?,
            kv_transfer: KvTransferConfig {
                ms_per_block: self.kv_transfer_ms_per_block,
                timeout: Duration::from_secs_f64(self.kv_transfer_timeout_secs),
                max_held: self.kv_transfer_max_held,
                host: self.kv_transfer_host.clone(),
            },
            data_parallel_size: self.data_parallel_size,
            data_parallel_rank: 0,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = match args.to_config() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("error: {msg}");
            return Ok(ExitCode::from(2));
        }
    };
    let shutdown = Shutdown::on_signal();
    tracing::info!(
        count = args.count,
        data_parallel_size = cfg.data_parallel_size,
        role = %cfg.role,
        kv_transfer = ?cfg.kv_transfer,
        model = %cfg.model,
        lora_modules = ?cfg.lora_modules,
        max_loras = cfg.max_loras,
        max_num_seqs = cfg.max_num_seqs,
        block_size = cfg.block_size,
        num_gpu_blocks = cfg.num_gpu_blocks,
        max_model_len = cfg.max_model_len,
        default_max_tokens = cfg.default_max_tokens,
        latency = ?cfg.latency,
        seed = cfg.seed,
        faults = ?cfg.faults,
        tokenizer = ?cfg.tokenizer,
        "starting simulated vLLM servers"
    );
    let servers = match epp_sim::spawn_many(
        &cfg,
        &args.name_prefix,
        args.host,
        args.base_port,
        args.count,
    )
    .await
    {
        Ok(s) => s,
        // A tokenizer file that does not load is a bad flag, refused before anything binds.
        Err(e) if e.downcast_ref::<epp_sim::ConfigError>().is_some() => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e),
    };
    for s in &servers {
        if let Some(ms) = args.refuse_connections_ms {
            s.faults()
                .refuse_connections_for(Duration::from_secs_f64(ms / 1000.0));
        }
        tracing::info!(server = s.name(), rank = s.data_parallel_rank(), addr = %s.addr(), "listening (http://{}/v1)", s.addr());
        if let Some(kv) = s.kv_events() {
            tracing::info!(server = s.name(), endpoint = %kv.endpoint, replay = ?kv.replay_endpoint, topic = %kv.topic, "publishing KV events");
        }
    }
    shutdown.wait().await;
    tracing::info!(
        grace_s = cfg.shutdown_grace.as_secs_f64(),
        "shutting down: no new connections, finishing in-flight requests"
    );
    futures_join_all(servers).await;
    Ok(ExitCode::SUCCESS)
}

/// Shut every server down concurrently.
async fn futures_join_all(servers: Vec<epp_sim::SimServer>) {
    let mut set = tokio::task::JoinSet::new();
    for s in servers {
        set.spawn(s.shutdown());
    }
    while set.join_next().await.is_some() {}
}
