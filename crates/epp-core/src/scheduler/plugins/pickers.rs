//! Pickers: order the scored candidates, best first, then the fallbacks. One file each, plus the
//! parameters they share.

pub mod max_score;
pub mod random;
pub mod round_robin;
pub mod weighted_random;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// How many endpoints to return (primary + fallbacks).
    pub max_num_of_endpoints: usize,
}

impl Default for PickerParams {
    fn default() -> Self {
        Self {
            max_num_of_endpoints: 3,
        }
    }
}

impl PickerParams {
    pub fn limit(&self, n: usize) -> usize {
        self.max_num_of_endpoints.clamp(1, n.max(1))
    }
}
