//! Seeded, reproducible request streams for benchmarks and the demo.
//!
//! A [`Workload`] is a pure function from a request index to an OpenAI request: the same spec and
//! seed always give the same bytes, on every platform (we use our own splitmix64 generator rather
//! than a library RNG whose algorithm may change between versions). Generating by index lets a
//! duration-bounded run draw as many requests as it needs without materialising them up front.
//!
//! Lengths are in tokens, where one token is four characters of the rendered prompt (the
//! simulator's tokenizer); see [`crate::ideal`] for the exact accounting rule.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ideal::CHARS_PER_TOKEN;

/// Which OpenAI endpoint a request targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    /// `POST /v1/chat/completions` with `messages`.
    #[default]
    Chat,
    /// `POST /v1/completions` with `prompt`.
    Completions,
}

impl Api {
    /// Path below the base URL (which ends before `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

/// inference-perf's `shared_prefix` data: `num_groups` system prompts, each followed by
/// `num_prompts_per_group` distinct questions. One pass visits every (group, question) pair once in
/// a seeded random order; later passes repeat the same order (a dataset being cycled).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPrefix {
    pub num_groups: u32,
    pub num_prompts_per_group: u32,
    pub system_prompt_len: u32,
    pub question_len: u32,
    pub output_len: u32,
    #[serde(default)]
    pub api: Api,
}

impl Default for SharedPrefix {
    fn default() -> Self {
        Self {
            num_groups: 16,
            num_prompts_per_group: 64,
            system_prompt_len: 1024,
            question_len: 64,
            output_len: 16,
            api: Api::Chat,
        }
    }
}

/// Multi-turn chat: `num_sessions` conversations run interleaved; turn `t` of every session comes
/// before turn `t + 1` of any (each round in its own seeded order), so a session's next turn
/// arrives between 1 and `2 * num_sessions - 1` requests later.
/// Each turn's prompt is the whole previous conversation (system prompt, earlier user turns and
/// synthetic assistant replies of `output_len` tokens) plus a new user message. After the last turn
/// a fresh set of sessions starts. The system prompt is shared by every session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiTurn {
    pub num_sessions: u32,
    pub turns_per_session: u32,
    pub system_prompt_len: u32,
    pub user_len: u32,
    pub output_len: u32,
}

impl Default for MultiTurn {
    fn default() -> Self {
        Self {
            num_sessions: 16,
            turns_per_session: 8,
            system_prompt_len: 256,
            user_len: 96,
            output_len: 32,
        }
    }
}

/// Every prompt is fresh random text: nothing to reuse (ideal bound 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSharing {
    pub prompt_len: u32,
    pub output_len: u32,
    #[serde(default)]
    pub api: Api,
}

impl Default for NoSharing {
    fn default() -> Self {
        Self {
            prompt_len: 512,
            output_len: 16,
            api: Api::Chat,
        }
    }
}

/// Like shared-prefix, but group 0 carries `hot_fraction` of the traffic and the other groups share
/// the rest uniformly. Every question is fresh, so the reusable part is the system prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotSpot {
    pub num_groups: u32,
    pub hot_fraction: f64,
    pub system_prompt_len: u32,
    pub question_len: u32,
    pub output_len: u32,
    #[serde(default)]
    pub api: Api,
}

impl Default for HotSpot {
    fn default() -> Self {
        Self {
            num_groups: 8,
            hot_fraction: 0.8,
            system_prompt_len: 1024,
            question_len: 64,
            output_len: 16,
            api: Api::Chat,
        }
    }
}

/// Long prompts with short outputs, the shape where prefill/decode disaggregation matters:
/// every prompt is `prompt_len` tokens; its first `shared_fraction` of them (rounded down to
/// whole tokens) is the system prompt of one of `num_groups` groups (picked at random per
/// request), the rest is fresh text. `shared_fraction` 0: nothing to reuse; 0.9: most of each
/// prompt is cached once its group has been seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongPrompt {
    pub prompt_len: u32,
    pub output_len: u32,
    pub shared_fraction: f64,
    pub num_groups: u32,
    #[serde(default)]
    pub api: Api,
}

impl Default for LongPrompt {
    fn default() -> Self {
        Self {
            prompt_len: 8192,
            output_len: 32,
            shared_fraction: 0.0,
            num_groups: 4,
            api: Api::Chat,
        }
    }
}

impl LongPrompt {
    /// Tokens of the shared system prompt.
    pub fn shared_len(&self) -> u32 {
        (f64::from(self.prompt_len) * self.shared_fraction).floor() as u32
    }
}

/// A workload's parameters; serialised into reports so a run can be reproduced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum WorkloadSpec {
    SharedPrefix(SharedPrefix),
    MultiTurn(MultiTurn),
    NoSharing(NoSharing),
    HotSpot(HotSpot),
    LongPrompt(LongPrompt),
}

impl WorkloadSpec {
    /// Short name used in tables and file names.
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadSpec::SharedPrefix(_) => "shared-prefix",
            WorkloadSpec::MultiTurn(_) => "multi-turn",
            WorkloadSpec::NoSharing(_) => "no-sharing",
            WorkloadSpec::HotSpot(_) => "hot-spot",
            WorkloadSpec::LongPrompt(_) => "long-prompt",
        }
    }

    /// Output tokens every request asks for.
    pub fn output_len(&self) -> u32 {
        match self {
            WorkloadSpec::SharedPrefix(s) => s.output_len,
            WorkloadSpec::MultiTurn(s) => s.output_len,
            WorkloadSpec::NoSharing(s) => s.output_len,
            WorkloadSpec::HotSpot(s) => s.output_len,
            WorkloadSpec::LongPrompt(s) => s.output_len,
        }
    }
}

/// Invalid workload parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error("workload parameter `{field}` must be {what}")]
    Invalid {
        field: &'static str,
        what: &'static str,
    },
}

/// One generated request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Position in the workload (0-based).
    pub index: u64,
    pub api: Api,
    /// Request body without `model` / `stream` (the driver adds those): `messages` or `prompt`,
    /// and `max_tokens`.
    pub body: Value,
    /// The prompt as the server renders it (see [`render_chat`]); used for token accounting.
    pub prompt_text: String,
    pub max_tokens: u32,
    /// Prefix group (shared-prefix, hot-spot) or conversation id (multi-turn); index for no-sharing.
    pub group: u64,
}

/// Chat messages as `(role, content)`.
pub type Messages = Vec<(&'static str, String)>;

/// How a chat request's messages become prompt text for token accounting: exactly the
/// simulator's chat template ([`epp_sim::tokenizer::render_chat`]), so that the ideal bound and
/// the simulator's `cached_tokens` count the same tokens. The template is prefix-preserving across
/// turns (its generation cue is how the next assistant message begins), which is what lets a
/// prefix cache reuse earlier turns.
pub fn render_chat(messages: &[(&str, String)]) -> String {
    let msgs: Vec<epp_sim::tokenizer::ChatMessage> = messages
        .iter()
        .map(|(role, content)| epp_sim::tokenizer::ChatMessage {
            role: (*role).to_owned(),
            content: content.clone(),
        })
        .collect();
    epp_sim::tokenizer::render_chat(&msgs)
}

/// A ready-to-draw workload.
#[derive(Clone, Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    seed: u64,
    state: State,
}

#[derive(Clone, Debug)]
enum State {
    SharedPrefix {
        systems: Vec<String>,
        questions: Vec<String>,
        order: Vec<u32>,
    },
    MultiTurn {
        system: String,
    },
    NoSharing,
    HotSpot {
        systems: Vec<String>,
    },
    LongPrompt {
        systems: Vec<String>,
    },
}

// Stream identifiers keep the random streams of different purposes independent.
const S_SYSTEM: u64 = 1;
const S_QUESTION: u64 = 2;
const S_ORDER: u64 = 3;
const S_USER: u64 = 4;
const S_ASSISTANT: u64 = 5;
const S_PROMPT: u64 = 6;
const S_PICK: u64 = 7;

impl Workload {
    /// Validates `spec` and precomputes the shared texts.
    pub fn new(spec: WorkloadSpec, seed: u64) -> Result<Self, WorkloadError> {
        fn pos(v: u32, field: &'static str) -> Result<(), WorkloadError> {
            if v == 0 {
                return Err(WorkloadError::Invalid {
                    field,
                    what: "at least 1",
                });
            }
            Ok(())
        }
        let state = match &spec {
            WorkloadSpec::SharedPrefix(s) => {
                pos(s.num_groups, "num_groups")?;
                pos(s.num_prompts_per_group, "num_prompts_per_group")?;
                pos(s.output_len, "output_len")?;
                let total = u64::from(s.num_groups) * u64::from(s.num_prompts_per_group);
                if total > 10_000_000 {
                    return Err(WorkloadError::Invalid {
                        field: "num_groups",
                        what: "such that num_groups * num_prompts_per_group <= 10,000,000",
                    });
                }
                let systems = (0..s.num_groups)
                    .map(|g| synth_text(&[seed, S_SYSTEM, u64::from(g)], s.system_prompt_len))
                    .collect();
                let questions = (0..total)
                    .map(|q| synth_text(&[seed, S_QUESTION, q], s.question_len))
                    .collect();
                let mut order: Vec<u32> = (0..total as u32).collect();
                shuffle(&mut order, &mut Prng::new(&[seed, S_ORDER]));
                State::SharedPrefix {
                    systems,
                    questions,
                    order,
                }
            }
            WorkloadSpec::MultiTurn(s) => {
                pos(s.num_sessions, "num_sessions")?;
                pos(s.turns_per_session, "turns_per_session")?;
                pos(s.user_len, "user_len")?;
                pos(s.output_len, "output_len")?;
                State::MultiTurn {
                    system: synth_text(&[seed, S_SYSTEM, 0], s.system_prompt_len),
                }
            }
            WorkloadSpec::NoSharing(s) => {
                pos(s.prompt_len, "prompt_len")?;
                pos(s.output_len, "output_len")?;
                State::NoSharing
            }
            WorkloadSpec::HotSpot(s) => {
                pos(s.num_groups, "num_groups")?;
                pos(s.output_len, "output_len")?;
                if !(0.0..=1.0).contains(&s.hot_fraction) {
                    return Err(WorkloadError::Invalid {
                        field: "hot_fraction",
                        what: "between 0 and 1",
                    });
                }
                if s.num_groups == 1 && s.hot_fraction < 1.0 {
                    return Err(WorkloadError::Invalid {
                        field: "num_groups",
                        what: "at least 2 when hot_fraction < 1",
                    });
                }
                State::HotSpot {
                    systems: (0..s.num_groups)
                        .map(|g| synth_text(&[seed, S_SYSTEM, u64::from(g)], s.system_prompt_len))
                        .collect(),
                }
            }
            WorkloadSpec::LongPrompt(s) => {
                pos(s.prompt_len, "prompt_len")?;
                pos(s.output_len, "output_len")?;
                pos(s.num_groups, "num_groups")?;
                if !(0.0..=1.0).contains(&s.shared_fraction) {
                    return Err(WorkloadError::Invalid {
                        field: "shared_fraction",
                        what: "between 0 and 1",
                    });
                }
                if s.shared_fraction > 0.0 && s.shared_len() == s.prompt_len {
                    return Err(WorkloadError::Invalid {
                        field: "shared_fraction",
                        what: "below 1 by at least one token, so every prompt is distinct",
                    });
                }
                let shared = s.shared_len();
                State::LongPrompt {
                    systems: if shared == 0 {
                        Vec::new()
                    } else {
                        (0..s.num_groups)
                            .map(|g| synth_text(&[seed, S_SYSTEM, u64::from(g)], shared))
                            .collect()
                    },
                }
            }
        };
        Ok(Self { spec, seed, state })
    }

    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Requests in one pass over the data set, for workloads that have one (shared-prefix:
    /// groups x prompts; multi-turn: sessions x turns).
    pub fn pass_len(&self) -> Option<u64> {
        match &self.spec {
            WorkloadSpec::SharedPrefix(s) => {
                Some(u64::from(s.num_groups) * u64::from(s.num_prompts_per_group))
            }
            WorkloadSpec::MultiTurn(s) => {
                Some(u64::from(s.num_sessions) * u64::from(s.turns_per_session))
            }
            WorkloadSpec::NoSharing(_) | WorkloadSpec::HotSpot(_) | WorkloadSpec::LongPrompt(_) => {
                None
            }
        }
    }

    /// The `index`-th request. Pure: the same workload and index always give the same request.
    pub fn request(&self, index: u64) -> Request {
        let seed = self.seed;
        match (&self.spec, &self.state) {
            (
                WorkloadSpec::SharedPrefix(s),
                State::SharedPrefix {
                    systems,
                    questions,
                    order,
                },
            ) => {
                let q = order[(index % order.len() as u64) as usize] as usize;
                let g = q / s.num_prompts_per_group as usize;
                single_turn(
                    index,
                    s.api,
                    &systems[g],
                    questions[q].clone(),
                    s.output_len,
                    g as u64,
                )
            }
            (WorkloadSpec::MultiTurn(s), State::MultiTurn { system }) => {
                let sessions = u64::from(s.num_sessions);
                let per_pass = sessions * u64::from(s.turns_per_session);
                let pass = index / per_pass;
                let within = index % per_pass;
                let turn = within / sessions;
                // Each round (one turn of every session) visits the sessions in its own seeded
                // order, so the gap between a session's turns varies (no lock-step with a
                // round-robin over a number of backends that divides the session count).
                let mut order: Vec<u64> = (0..sessions).collect();
                shuffle(&mut order, &mut Prng::new(&[seed, S_ORDER, pass, turn]));
                let session = pass * sessions + order[(within % sessions) as usize];
                let mut messages: Messages = Vec::with_capacity(2 + 2 * turn as usize);
                if !system.is_empty() {
                    messages.push(("system", system.clone()));
                }
                for t in 0..=turn {
                    messages.push(("user", synth_text(&[seed, S_USER, session, t], s.user_len)));
                    if t < turn {
                        messages.push((
                            "assistant",
                            synth_text(&[seed, S_ASSISTANT, session, t], s.output_len),
                        ));
                    }
                }
                chat_request(index, messages, s.output_len, session)
            }
            (WorkloadSpec::NoSharing(s), State::NoSharing) => {
                let text = synth_text(&[seed, S_PROMPT, index], s.prompt_len);
                match s.api {
                    Api::Chat => chat_request(index, vec![("user", text)], s.output_len, index),
                    Api::Completions => completion_request(index, text, s.output_len, index),
                }
            }
            (WorkloadSpec::HotSpot(s), State::HotSpot { systems }) => {
                let mut rng = Prng::new(&[seed, S_PICK, index]);
                let g = if rng.next_f64() < s.hot_fraction {
                    0
                } else {
                    1 + rng.below(u64::from(s.num_groups) - 1)
                };
                let question = synth_text(&[seed, S_QUESTION, index], s.question_len);
                single_turn(
                    index,
                    s.api,
                    &systems[g as usize],
                    question,
                    s.output_len,
                    g,
                )
            }
            (WorkloadSpec::LongPrompt(s), State::LongPrompt { systems }) => {
                let unique = synth_text(&[seed, S_PROMPT, index], s.prompt_len - s.shared_len());
                if systems.is_empty() {
                    return match s.api {
                        Api::Chat => {
                            chat_request(index, vec![("user", unique)], s.output_len, index)
                        }
                        Api::Completions => completion_request(index, unique, s.output_len, index),
                    };
                }
                let g = Prng::new(&[seed, S_PICK, index]).below(u64::from(s.num_groups));
                single_turn(index, s.api, &systems[g as usize], unique, s.output_len, g)
            }
            _ => unreachable!("workload state always matches its spec"),
        }
    }

    /// Requests `0..n`.
    pub fn take(&self, n: u64) -> impl Iterator<Item = Request> + '_ {
        (0..n).map(|i| self.request(i))
    }
}

fn single_turn(
    index: u64,
    api: Api,
    system: &str,
    question: String,
    output_len: u32,
    group: u64,
) -> Request {
    match api {
        Api::Chat => {
            let mut messages: Messages = Vec::with_capacity(2);
            if !system.is_empty() {
                messages.push(("system", system.to_owned()));
            }
            messages.push(("user", question));
            chat_request(index, messages, output_len, group)
        }
        Api::Completions => {
            let mut prompt = String::with_capacity(system.len() + question.len());
            prompt.push_str(system);
            prompt.push_str(&question);
            completion_request(index, prompt, output_len, group)
        }
    }
}

fn chat_request(index: u64, messages: Messages, max_tokens: u32, group: u64) -> Request {
    let prompt_text = render_chat(&messages);
    let msgs: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Request {
        index,
        api: Api::Chat,
        body: json!({"messages": msgs, "max_tokens": max_tokens}),
        prompt_text,
        max_tokens,
        group,
    }
}

fn completion_request(index: u64, prompt: String, max_tokens: u32, group: u64) -> Request {
    Request {
        index,
        api: Api::Completions,
        body: json!({"prompt": prompt, "max_tokens": max_tokens}),
        prompt_text: prompt,
        max_tokens,
        group,
    }
}

/// splitmix64: tiny, fast, and fully specified, so seeds reproduce everywhere.
#[derive(Clone, Debug)]
pub struct Prng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Prng {
    /// A generator whose stream is a function of all `parts` (seed and stream identifiers).
    pub fn new(parts: &[u64]) -> Self {
        let mut h = 0x243F_6A88_85A3_08D3u64;
        for p in parts {
            h = splitmix(h ^ p);
        }
        Prng(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut Prng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

const CONSONANTS: &[u8] = b"bcdfghjklmnprstvwz";
const VOWELS: &[u8] = b"aeiou";

/// Pseudo-words, exactly `tokens` tokens long: each token is consonant-vowel-consonant plus a
/// space (four ASCII characters), so token and block boundaries are easy to reason about.
pub fn synth_text(parts: &[u64], tokens: u32) -> String {
    let mut rng = Prng::new(parts);
    let mut s = String::with_capacity(tokens as usize * CHARS_PER_TOKEN);
    for _ in 0..tokens {
        let r = rng.next_u64();
        s.push(CONSONANTS[(r % CONSONANTS.len() as u64) as usize] as char);
        s.push(VOWELS[((r >> 16) % VOWELS.len() as u64) as usize] as char);
        s.push(CONSONANTS[((r >> 32) % CONSONANTS.len() as u64) as usize] as char);
        s.push(' ');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(groups: u32, per: u32) -> Workload {
        Workload::new(
            WorkloadSpec::SharedPrefix(SharedPrefix {
                num_groups: groups,
                num_prompts_per_group: per,
                system_prompt_len: 32,
                question_len: 8,
                output_len: 4,
                api: Api::Completions,
            }),
            7,
        )
        .unwrap()
    }

    #[test]
    fn synth_text_has_exact_length_and_is_seeded() {
        let a = synth_text(&[1, 2], 10);
        assert_eq!(a.len(), 40);
        assert_eq!(a, synth_text(&[1, 2], 10));
        assert_ne!(a, synth_text(&[1, 3], 10));
        assert!(a.bytes().all(|b| b.is_ascii_lowercase() || b == b' '));
    }

    #[test]
    fn same_seed_same_requests_other_seed_differs() {
        for spec in [
            WorkloadSpec::SharedPrefix(SharedPrefix::default()),
            WorkloadSpec::MultiTurn(MultiTurn::default()),
            WorkloadSpec::NoSharing(NoSharing::default()),
            WorkloadSpec::HotSpot(HotSpot::default()),
            WorkloadSpec::LongPrompt(LongPrompt::default()),
            WorkloadSpec::LongPrompt(LongPrompt {
                shared_fraction: 0.9,
                ..LongPrompt::default()
            }),
        ] {
            let a = Workload::new(spec.clone(), 42).unwrap();
            let b = Workload::new(spec.clone(), 42).unwrap();
            let c = Workload::new(spec.clone(), 43).unwrap();
            let ra: Vec<_> = a.take(50).collect();
            let rb: Vec<_> = b.take(50).collect();
            let rc: Vec<_> = c.take(50).collect();
            assert_eq!(ra, rb, "{}", spec.name());
            assert_ne!(ra, rc, "{}", spec.name());
            // Pure by index: asking out of order gives the same request.
            assert_eq!(a.request(37), ra[37]);
        }
    }

    #[test]
    fn shared_prefix_pass_visits_every_pair_once_then_repeats() {
        let w = shared(3, 4);
        assert_eq!(w.pass_len(), Some(12));
        let first: Vec<_> = w.take(12).collect();
        let mut prompts: Vec<_> = first.iter().map(|r| r.prompt_text.clone()).collect();
        prompts.sort();
        prompts.dedup();
        assert_eq!(prompts.len(), 12);
        let mut per_group = [0; 3];
        for r in &first {
            per_group[r.group as usize] += 1;
            // system prompt (32 tokens) + question (8 tokens), 4 chars each
            assert_eq!(r.prompt_text.len(), 160);
            assert_eq!(r.body["max_tokens"], 4);
            assert_eq!(r.body["prompt"].as_str().unwrap(), r.prompt_text);
        }
        assert_eq!(per_group, [4, 4, 4]);
        for i in 0..12 {
            assert_eq!(w.request(12 + i).prompt_text, first[i as usize].prompt_text);
        }
        // Members of a group share the 128-char system prompt, other groups do not.
        let g0: Vec<_> = first.iter().filter(|r| r.group == 0).collect();
        let g1 = first.iter().find(|r| r.group == 1).unwrap();
        assert_eq!(g0[0].prompt_text[..128], g0[1].prompt_text[..128]);
        assert_ne!(g0[0].prompt_text[..4], g1.prompt_text[..4]);
    }

    #[test]
    fn chat_body_and_rendering_agree() {
        let w = Workload::new(WorkloadSpec::SharedPrefix(SharedPrefix::default()), 1).unwrap();
        let r = w.request(0);
        let msgs = r.body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["role"], "system");
        assert_eq!(msgs[1]["role"], "user");
        let expected = render_chat(&[
            ("system", msgs[0]["content"].as_str().unwrap().to_owned()),
            ("user", msgs[1]["content"].as_str().unwrap().to_owned()),
        ]);
        assert_eq!(r.prompt_text, expected);
        assert!(r.prompt_text.contains(msgs[1]["content"].as_str().unwrap()));
        assert_eq!(msgs[0]["content"].as_str().unwrap().len(), 1024 * 4);
    }

    #[test]
    fn multi_turn_extends_the_previous_turn() {
        let spec = MultiTurn {
            num_sessions: 3,
            turns_per_session: 4,
            system_prompt_len: 16,
            user_len: 8,
            output_len: 5,
        };
        let w = Workload::new(WorkloadSpec::MultiTurn(spec), 9).unwrap();
        // Every round of 3 requests holds each session once, at its turn.
        let first: Vec<_> = w.take(12).collect();
        for round in 0..4 {
            let mut groups: Vec<u64> = first[round * 3..round * 3 + 3]
                .iter()
                .map(|r| r.group)
                .collect();
            groups.sort();
            assert_eq!(groups, [0, 1, 2]);
        }
        let s1: Vec<_> = first.iter().filter(|r| r.group == 1).collect();
        assert_eq!(s1.len(), 4);
        let (t0, t1, t2) = (s1[0], s1[1], s1[2]);
        assert_eq!((t0.index / 3, t1.index / 3, t2.index / 3), (0, 1, 2));
        assert!(t1.prompt_text.starts_with(&t0.prompt_text));
        assert!(t2.prompt_text.starts_with(&t1.prompt_text));
        assert_eq!(t0.body["messages"].as_array().unwrap().len(), 2);
        assert_eq!(t1.body["messages"].as_array().unwrap().len(), 4);
        assert_eq!(t2.body["messages"].as_array().unwrap().len(), 6);
        assert_eq!(t1.body["messages"][2]["role"], "assistant");
        assert_eq!(
            t1.body["messages"][2]["content"].as_str().unwrap().len(),
            20
        );
        // A new pass starts new conversations.
        let next = w.request(12);
        assert_eq!(next.group, 3);
        assert_eq!(next.body["messages"].as_array().unwrap().len(), 2);
        assert_ne!(next.prompt_text, w.request(0).prompt_text);
        // Other sessions share only the system prompt.
        let other = first.iter().find(|r| r.group == 2).unwrap();
        assert!(!other.prompt_text.starts_with(&t0.prompt_text));
    }

    #[test]
    fn hot_spot_sends_the_hot_fraction_to_group_zero() {
        let w = Workload::new(WorkloadSpec::HotSpot(HotSpot::default()), 5).unwrap();
        let n = 4000;
        let hot = w.take(n).filter(|r| r.group == 0).count() as f64 / n as f64;
        assert!((hot - 0.8).abs() < 0.03, "hot share {hot}");
        let groups: std::collections::BTreeSet<_> = w.take(n).map(|r| r.group).collect();
        assert_eq!(groups, (0..8).collect());
    }

    #[test]
    fn long_prompts_share_their_group_prefix_and_nothing_else() {
        let spec = LongPrompt {
            prompt_len: 1000,
            output_len: 8,
            shared_fraction: 0.9,
            num_groups: 3,
            api: Api::Completions,
        };
        let w = Workload::new(WorkloadSpec::LongPrompt(spec.clone()), 4).unwrap();
        let reqs: Vec<_> = w.take(60).collect();
        let groups: std::collections::BTreeSet<_> = reqs.iter().map(|r| r.group).collect();
        assert_eq!(groups, (0..3).collect());
        for r in &reqs {
            assert_eq!(r.prompt_text.len(), 1000 * CHARS_PER_TOKEN);
            assert_eq!(r.max_tokens, 8);
        }
        let same: Vec<_> = reqs.iter().filter(|r| r.group == reqs[0].group).collect();
        let shared = 900 * CHARS_PER_TOKEN;
        assert_eq!(same[0].prompt_text[..shared], same[1].prompt_text[..shared]);
        assert_ne!(same[0].prompt_text[shared..], same[1].prompt_text[shared..]);
        let other = reqs.iter().find(|r| r.group != reqs[0].group).unwrap();
        assert_ne!(other.prompt_text[..4], reqs[0].prompt_text[..4]);
        // Without sharing: one user message per request, all distinct.
        let w = Workload::new(WorkloadSpec::LongPrompt(LongPrompt::default()), 4).unwrap();
        let (a, b) = (w.request(0), w.request(1));
        assert_eq!(a.body["messages"].as_array().unwrap().len(), 1);
        assert_ne!(a.prompt_text[..40], b.prompt_text[..40]);
        for (fraction, field) in [(1.5, "shared_fraction"), (1.0, "shared_fraction")] {
            let bad = LongPrompt {
                shared_fraction: fraction,
                ..spec.clone()
            };
            match Workload::new(WorkloadSpec::LongPrompt(bad), 0) {
                Err(WorkloadError::Invalid { field: f, .. }) => assert_eq!(f, field),
                Ok(_) => panic!("fraction {fraction} accepted"),
            }
        }
    }

    #[test]
    fn invalid_parameters_are_named() {
        let err = Workload::new(
            WorkloadSpec::HotSpot(HotSpot {
                hot_fraction: 1.5,
                ..HotSpot::default()
            }),
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "workload parameter `hot_fraction` must be between 0 and 1"
        );
        assert!(Workload::new(
            WorkloadSpec::SharedPrefix(SharedPrefix {
                num_groups: 0,
                ..SharedPrefix::default()
            }),
            0
        )
        .is_err());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = WorkloadSpec::HotSpot(HotSpot::default());
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("\"kind\":\"hot-spot\""));
        let back: WorkloadSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, spec);
    }
}
