//! Crafted snapshots for the scorers' unit tests.

use std::sync::Arc;

use crate::datastore::{DatastoreWriter, Endpoint, EndpointSpec, HealthConfig, ModelServerMetrics};
use crate::prefix::PrefixMatch;
use crate::request::ParsedRequest;
use crate::scheduler::plugins::Plugin;
use crate::scheduler::{PrefixMatches, RequestData, SchedCtx};

/// A datastore plus one request's context.
pub struct TestWorld {
    pub w: DatastoreWriter,
    pub req: ParsedRequest,
    pub prefix: PrefixMatch,
    pub data: RequestData,
}

impl TestWorld {
    /// Run `f` over a context of the current snapshot.
    pub fn with_ctx<R>(&self, f: impl FnOnce(&SchedCtx<'_>) -> R) -> R {
        let snap = self.w.snapshot();
        let prefix = PrefixMatches::approximate(self.prefix.clone(), self.data.prefix_block_tokens);
        let ctx = SchedCtx {
            snapshot: &snap,
            request: &self.req,
            prefix: &prefix,
            data: &self.data,
        };
        f(&ctx)
    }

    /// Give endpoint `i` (snapshot order) `blocks` matched prefix blocks of `total`.
    pub fn set_prefix(&mut self, i: usize, blocks: u32, total: u32) {
        let slot = self.w.snapshot().endpoints[i].slot();
        if self.prefix.blocks.len() <= slot {
            self.prefix.blocks.resize(slot + 1, 0);
        }
        self.prefix.blocks[slot] = blocks;
        self.prefix.total_blocks = total;
    }
}

/// Endpoints `ep-0`, `ep-1`, … at `10.0.0.{i}:8000`, each with `(waiting, running)` scraped.
pub fn ctx_with(eps: &[(f64, f64)]) -> (TestWorld, Vec<Arc<Endpoint>>) {
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(
        (0..eps.len())
            .map(|i| EndpointSpec {
                name: format!("ep-{i}"),
                ..EndpointSpec::new(format!("10.0.0.{i}:8000"))
            })
            .collect(),
    );
    for (i, (waiting, running)) in eps.iter().enumerate() {
        w.record_scrape(
            &format!("10.0.0.{i}:8000"),
            Ok(ModelServerMetrics {
                waiting_queue: *waiting,
                running: *running,
                ..Default::default()
            }),
        );
    }
    let endpoints = w
        .snapshot()
        .endpoints
        .iter()
        .map(|e| e.endpoint.clone())
        .collect();
    (
        TestWorld {
            w,
            req: ParsedRequest::default(),
            prefix: PrefixMatch::default(),
            data: RequestData::default(),
        },
        endpoints,
    )
}

/// The scores a scorer plugin gives every endpoint of `w`, in snapshot order.
pub fn scores(w: &TestWorld, p: &Plugin) -> Vec<f64> {
    let Plugin::Scorer(s) = p else {
        panic!("not a scorer")
    };
    w.with_ctx(|ctx| {
        let all: Vec<usize> = (0..ctx.snapshot.endpoints.len()).collect();
        let mut out = vec![f64::NAN; all.len()];
        s.score(ctx, &all, &mut out);
        out
    })
}
