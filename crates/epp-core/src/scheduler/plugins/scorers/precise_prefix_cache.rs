//! `precise-prefix-cache-scorer`: llm-d's deprecated all-in-one form, a
//! `precise-prefix-cache-producer` and a `prefix-cache-scorer` reading it behind one type. With a
//! `precise-prefix-cache-producer` configured elsewhere it scores that one and its own parameters
//! are ignored (with a warning); otherwise its parameters (the producer's, same names) build the
//! producer it brings. `indexerConfig.tokenizersPoolConfig` (the form's in-process tokenizer) is
//! refused, naming it: tokenize with a `token-producer`.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::producers::precise_prefix::{
    PrecisePrefixParams, PrecisePrefixProducer,
};
use crate::scheduler::plugins::scorers::prefix_cache::PrefixCacheScorer;
use crate::scheduler::plugins::{params, Plugin, PrefixConsumer, Producer, Scorer};
use crate::scheduler::{PrefixSource, SchedCtx};

pub const TYPE: &str = "precise-prefix-cache-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PrecisePrefixParams = params(spec, field)?;
    let settings = p.settings(field)?;
    tracing::warn!(
        plugin = field,
        "DEPRECATION: precise-prefix-cache-scorer is deprecated; configure precise-prefix-cache-producer + prefix-cache-scorer with prefixMatchInfoProducerName: precise-prefix-cache-producer"
    );
    Ok(Plugin::Scorer(Arc::new(LegacyPreciseScorer {
        scorer: PrefixCacheScorer::of_precise(spec.name()),
        producer: Arc::new(PrecisePrefixProducer::new(spec.name(), settings)),
    })))
}

pub struct LegacyPreciseScorer {
    scorer: PrefixCacheScorer,
    producer: Arc<PrecisePrefixProducer>,
}

impl Scorer for LegacyPreciseScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        self.scorer.name()
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        self.scorer.score(ctx, cands, out)
    }
    fn prefix_consumer(&self) -> Option<PrefixConsumer> {
        self.scorer.prefix_consumer()
    }
    fn bind_prefix(&self, source: PrefixSource) {
        self.scorer.bind_prefix(source)
    }
    fn embedded_producer(&self) -> Option<Arc<dyn Producer>> {
        Some(self.producer.clone())
    }
}
