//! The checklist `epp doctor` prints: one line per check, marked ✓ (passed), ✗ (failed, followed
//! by a `fix:` line), ! (a warning that does not fail the run, e.g. "no traffic yet", followed by
//! a `hint:` line) or - (skipped because an earlier check failed). Lines are printed as the
//! checks run.

use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Pass,
    Fail,
    Warn,
    Skip,
}

impl Mark {
    fn symbol(self) -> &'static str {
        match self {
            Mark::Pass => "✓",
            Mark::Fail => "✗",
            Mark::Warn => "!",
            Mark::Skip => "-",
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub warned: usize,
    pub skipped: usize,
}

impl Report {
    pub fn section(&mut self, title: &str) {
        self.emit(&format!("\n{title}"));
    }

    pub fn note(&mut self, text: &str) {
        self.emit(text);
    }

    pub fn pass(&mut self, what: &str, detail: impl AsRef<str>) {
        self.passed += 1;
        self.line(Mark::Pass, what, detail.as_ref(), None);
    }

    pub fn fail(&mut self, what: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failed += 1;
        self.line(
            Mark::Fail,
            what,
            detail.as_ref(),
            Some(("fix", fix.as_ref())),
        );
    }

    pub fn warn(&mut self, what: &str, detail: impl AsRef<str>, hint: impl AsRef<str>) {
        self.warned += 1;
        self.line(
            Mark::Warn,
            what,
            detail.as_ref(),
            Some(("hint", hint.as_ref())),
        );
    }

    pub fn skip(&mut self, what: &str, why: impl AsRef<str>) {
        self.skipped += 1;
        self.line(
            Mark::Skip,
            what,
            &format!("skipped: {}", why.as_ref()),
            None,
        );
    }

    /// Records a finding with the given mark (`Skip` ignores `fix`).
    pub fn add(&mut self, mark: Mark, what: &str, detail: &str, fix: &str) {
        match mark {
            Mark::Pass => self.pass(what, detail),
            Mark::Fail => self.fail(what, detail, fix),
            Mark::Warn => self.warn(what, detail, fix),
            Mark::Skip => self.skip(what, detail),
        }
    }

    fn line(&mut self, mark: Mark, what: &str, detail: &str, extra: Option<(&str, &str)>) {
        let mut text = format!("{} {what}: {detail}", mark.symbol());
        if let Some((label, body)) = extra.filter(|(_, b)| !b.is_empty()) {
            for (i, l) in body.lines().enumerate() {
                if i == 0 {
                    text.push_str(&format!("\n    {label}: {l}"));
                } else {
                    text.push_str(&format!("\n    {:width$}  {l}", "", width = label.len()));
                }
            }
        }
        self.emit(&text);
    }

    fn emit(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// The closing line.
    pub fn summary(&mut self) {
        let total = self.passed + self.failed + self.warned + self.skipped;
        let mut text = if self.failed == 0 {
            format!("\nepp doctor: all {} checks passed", self.passed)
        } else {
            format!("\nepp doctor: {} of {total} checks failed", self.failed)
        };
        if self.warned > 0 {
            text.push_str(&format!(
                ", {} warning{}",
                self.warned,
                if self.warned == 1 { "" } else { "s" }
            ));
        }
        if self.skipped > 0 {
            text.push_str(&format!(", {} skipped", self.skipped));
        }
        self.emit(&text);
    }
}
