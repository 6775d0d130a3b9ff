//! `cargo xtask reference-check`: runs the original's recorded cases through our public API.
//!
//! Every case is checked strictly: an unknown kind, an input field the kind does not take, or an
//! expected field that no check consumed makes the case unsupported or failed, so new cases can
//! never be skipped silently.

mod case;
mod kinds;

pub use case::{Case, Tol};

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One difference between an expected and a computed value.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Field name, with the precision it was computed in.
    pub field: String,
    /// Index into the flat array (`None` for a length or type mismatch).
    pub index: Option<usize>,
    /// Expected value, as text.
    pub expected: String,
    /// Computed value, as text.
    pub got: String,
}

/// How one case ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every field matched.
    Passed,
    /// Some fields differed, or the case could not be run.
    Failed(Vec<Mismatch>),
    /// The checker does not understand this case.
    Unsupported(String),
}

/// Totals of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases the checker does not understand.
    pub unsupported: usize,
}

impl Summary {
    /// Whether the run is clean: nothing failed, nothing unsupported.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.unsupported == 0 && self.passed > 0
    }
}

/// Runs every case of `path`, printing failures, and returns the totals.
pub fn run_file(path: &Path, verbose: bool) -> Result<Summary> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read reference cases {}", path.display()))?;
    let root: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let cases = root
        .get("cases")
        .and_then(Value::as_array)
        .with_context(|| format!("{} has no \"cases\" array", path.display()))?;
    let dir: PathBuf = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut summary = Summary::default();
    for (i, raw) in cases.iter().enumerate() {
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or(format!("#{i}"));
        let outcome = run_case(raw, &dir);
        match &outcome {
            Outcome::Passed => {
                summary.passed += 1;
                if verbose {
                    println!("ok      {id}");
                }
            }
            Outcome::Failed(ms) => {
                summary.failed += 1;
                println!("FAILED  {id}");
                for m in ms.iter().take(10) {
                    match m.index {
                        Some(i) => println!(
                            "    {}[{i}]: expected {}, got {}",
                            m.field, m.expected, m.got
                        ),
                        None => println!("    {}: expected {}, got {}", m.field, m.expected, m.got),
                    }
                }
                if ms.len() > 10 {
                    println!("    ... and {} more", ms.len() - 10);
                }
            }
            Outcome::Unsupported(why) => {
                summary.unsupported += 1;
                println!("UNSUPPORTED {id}: {why}");
            }
        }
    }
    Ok(summary)
}

/// Runs one case; any error while running it is a failure that says what went wrong.
pub fn run_case(raw: &Value, dir: &Path) -> Outcome {
    let Some(obj) = raw.as_object() else {
        return Outcome::Unsupported("case is not a JSON object".into());
    };
    let Some(kind) = obj.get("kind").and_then(Value::as_str) else {
        return Outcome::Unsupported("case has no \"kind\"".into());
    };
    let case = match Case::new(raw, dir) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(vec![error_mismatch(format!("{e:#}"))]),
    };
    // A panic inside a check fails its case; the other cases still run.
    let checked =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kinds::check(kind, &case)));
    let result = match checked {
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Outcome::Failed(vec![error_mismatch(format!("the check panicked: {what}"))]);
        }
        Ok(None) => return Outcome::Unsupported(format!("unknown kind {kind:?}")),
        Ok(Some(r)) => r,
    };
    match result {
        // Only a case that ran to the end has read every field it understands: unread inputs
        // then mean the checker does not understand the case, and unread expected fields are
        // values it does not verify.
        Ok(()) => {
            if let Some(why) = case.unknown_inputs(kind) {
                return Outcome::Unsupported(why);
            }
            let mut mismatches = case.take_mismatches();
            mismatches.extend(case.unchecked_expected());
            if mismatches.is_empty() {
                Outcome::Passed
            } else {
                Outcome::Failed(mismatches)
            }
        }
        // An error stops a case before it reads its later fields; it is a failure, never
        // "unsupported", and says what went wrong (after any differences found before it).
        Err(e) => {
            let mut mismatches = case.take_mismatches();
            mismatches.push(error_mismatch(format!("{e:#}")));
            Outcome::Failed(mismatches)
        }
    }
}

/// The record of an error that stopped a case.
fn error_mismatch(got: String) -> Mismatch {
    Mismatch {
        field: "(error)".into(),
        index: None,
        expected: "a result".into(),
        got,
    }
}

#[cfg(test)]
mod tests;
