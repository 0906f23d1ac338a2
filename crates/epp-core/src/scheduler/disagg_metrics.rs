//! Prefill/decode disaggregation metrics: llm-d-router's decision families (and their
//! `llm_d_inference_scheduler_*` twins), and the prefill calls `epp proxy` makes itself.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::LabelStr;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub plugin_name: LabelStr,
    pub plugin_type: &'static str,
    pub model_name: LabelStr,
    pub decision_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegacyDecisionLabels {
    pub model_name: LabelStr,
    pub decision_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefillLabels {
    pub outcome: &'static str,
}

/// How one prefill call of the proxy ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillOutcome {
    /// The prefill answered with `kv_transfer_params`; the decode request carried them.
    Transferred,
    /// The prefill answered with a status other than 2xx.
    Status,
    /// It did not answer within `--prefill-timeout`.
    Timeout,
    /// It could not be reached (connect failure, connection closed).
    Unreachable,
    /// It answered 2xx without a JSON object carrying `kv_transfer_params`.
    InvalidResponse,
}

impl PrefillOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PrefillOutcome::Transferred => "transferred",
            PrefillOutcome::Status => "error_status",
            PrefillOutcome::Timeout => "timeout",
            PrefillOutcome::Unreachable => "unreachable",
            PrefillOutcome::InvalidResponse => "invalid_response",
        }
    }
    pub const ALL: [PrefillOutcome; 5] = [
        PrefillOutcome::Transferred,
        PrefillOutcome::Status,
        PrefillOutcome::Timeout,
        PrefillOutcome::Unreachable,
        PrefillOutcome::InvalidResponse,
    ];
}

/// Buckets of the proxy's prefill-call duration: 1 ms .. 60 s.
const PREFILL_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

#[derive(Debug)]
pub struct DisaggMetrics {
    disagg: Family<DecisionLabels, Counter>,
    disagg_legacy: Family<LegacyDecisionLabels, Counter>,
    pd: Family<DecisionLabels, Counter>,
    pd_legacy: Family<LegacyDecisionLabels, Counter>,
    prefill: Family<PrefillLabels, Counter>,
    prefill_duration: Histogram,
}

impl DisaggMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let disagg = Family::<DecisionLabels, Counter>::default();
        r.register(
            "llm_d_epp_disagg_decision",
            "Disaggregation decisions of the disagg-profile-handler (decode-only or prefill-decode)",
            disagg.clone(),
        );
        let disagg_legacy = Family::<LegacyDecisionLabels, Counter>::default();
        r.register(
            "llm_d_inference_scheduler_disagg_decision",
            "Legacy twin of llm_d_epp_disagg_decision_total",
            disagg_legacy.clone(),
        );
        let pd = Family::<DecisionLabels, Counter>::default();
        r.register(
            "llm_d_epp_pd_decision",
            "P/D decisions of the deprecated pd-profile-handler (decode-only or prefill-decode)",
            pd.clone(),
        );
        let pd_legacy = Family::<LegacyDecisionLabels, Counter>::default();
        r.register(
            "llm_d_inference_scheduler_pd_decision",
            "Legacy twin of llm_d_epp_pd_decision_total",
            pd_legacy.clone(),
        );
        let prefill = Family::<PrefillLabels, Counter>::default();
        r.register(
            "epp_pd_prefill_requests",
            "Prefill calls epp proxy made for disaggregated requests, by outcome (transferred: the decode carried the prefill's kv_transfer_params; anything else: the decode ran alone)",
            prefill.clone(),
        );
        let prefill_duration = Histogram::new(PREFILL_BUCKETS);
        r.register(
            "epp_pd_prefill_duration_seconds",
            "Duration of the proxy's prefill calls, whatever their outcome, in seconds",
            prefill_duration.clone(),
        );
        Self {
            disagg,
            disagg_legacy,
            pd,
            pd_legacy,
            prefill,
            prefill_duration,
        }
    }

    /// One request's decision. `legacy_pd`: the deprecated handler's `pd_decision_total`.
    pub fn decision(
        &self,
        legacy_pd: bool,
        plugin_name: &str,
        plugin_type: &'static str,
        model: &str,
        decision_type: &'static str,
    ) {
        let model_name: LabelStr = if model.is_empty() { "unknown" } else { model }.into();
        let (llmd, legacy) = if legacy_pd {
            (&self.pd, &self.pd_legacy)
        } else {
            (&self.disagg, &self.disagg_legacy)
        };
        llmd.get_or_create(&DecisionLabels {
            plugin_name: plugin_name.into(),
            plugin_type,
            model_name: model_name.clone(),
            decision_type,
        })
        .inc();
        legacy
            .get_or_create(&LegacyDecisionLabels {
                model_name,
                decision_type,
            })
            .inc();
    }

    /// One prefill call of the proxy.
    pub fn prefill(&self, outcome: PrefillOutcome, seconds: f64) {
        self.prefill
            .get_or_create(&PrefillLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.prefill_duration.observe(seconds);
    }
}
