//! Reading a case's fields and comparing arrays, with bookkeeping of what was used.

use super::Mismatch;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Absolute and relative tolerance: |got - expected| <= atol + rtol·|expected|.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

impl Tol {
    /// Schedules and respacing, computed in f64 like the original.
    pub const SCHEDULE: Tol = Tol {
        atol: 1e-15,
        rtol: 1e-10,
    };
    /// Tensor math in f64 against the original's f64 values.
    pub const F64: Tol = Tol {
        atol: 1e-12,
        rtol: 1e-9,
    };
    /// Tensor math in f32 (README: about 1e-4 relative).
    pub const F32: Tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// Log-likelihoods in f32, whose argument can sit near a bin edge (README: 1e-3 absolute).
    pub const F32_LOGLIK: Tol = Tol {
        atol: 1e-3,
        rtol: 1e-4,
    };
}

/// A case being checked: typed field access plus a record of which fields were used.
pub struct Case {
    fields: Map<String, Value>,
    expected: Map<String, Value>,
    dir: PathBuf,
    used: RefCell<BTreeSet<String>>,
    checked: RefCell<BTreeSet<String>>,
    mismatches: RefCell<Vec<Mismatch>>,
}

impl Case {
    /// Wraps a raw case; `dir` is where files named by the case live.
    pub fn new(raw: &Value, dir: &Path) -> Result<Self> {
        let fields = raw.as_object().context("case is not an object")?.clone();
        let expected = fields
            .get("expected")
            .and_then(Value::as_object)
            .context("case has no \"expected\" object")?
            .clone();
        Ok(Self {
            fields,
            expected,
            dir: dir.to_path_buf(),
            used: RefCell::default(),
            checked: RefCell::default(),
            mismatches: RefCell::default(),
        })
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.used.borrow_mut().insert(key.to_string());
        self.fields
            .get(key)
            .ok_or_else(|| anyhow!("input field {key:?} is missing"))
    }

    /// Whether an input field is present (and marks it used).
    pub fn has(&self, key: &str) -> bool {
        self.used.borrow_mut().insert(key.to_string());
        self.fields.get(key).is_some_and(|v| !v.is_null())
    }

    /// The raw value of an input field.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.get(key)
    }

    /// A string input.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| anyhow!("input field {key:?} is not a string"))
    }

    /// An optional string input (absent or null gives `None`).
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        if !self.has(key) {
            return Ok(None);
        }
        self.str(key).map(Some)
    }

    /// A non-negative integer input.
    pub fn usize(&self, key: &str) -> Result<usize> {
        as_usize(self.get(key)?).with_context(|| format!("input field {key:?}"))
    }

    /// A number input.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| anyhow!("input field {key:?} is not a number"))
    }

    /// A boolean input.
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .as_bool()
            .ok_or_else(|| anyhow!("input field {key:?} is not a boolean"))
    }

    /// An array of numbers.
    pub fn f64s(&self, key: &str) -> Result<Vec<f64>> {
        as_f64s(self.get(key)?).with_context(|| format!("input field {key:?}"))
    }

    /// An array of non-negative integers.
    pub fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        let v = self
            .get(key)?
            .as_array()
            .ok_or_else(|| anyhow!("input field {key:?} is not an array"))?;
        v.iter()
            .map(as_usize)
            .collect::<Result<_>>()
            .with_context(|| format!("input field {key:?}"))
    }

    /// A path relative to the cases file.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        Ok(self.dir.join(self.str(key)?))
    }

    /// An expected array of numbers (marks the field as checked).
    pub fn expected_f64s(&self, key: &str) -> Result<Vec<f64>> {
        self.checked.borrow_mut().insert(key.to_string());
        let v = self
            .expected
            .get(key)
            .ok_or_else(|| anyhow!("expected field {key:?} is missing"))?;
        as_f64s(v).with_context(|| format!("expected field {key:?}"))
    }

    /// An expected field's raw value (marks it as checked).
    pub fn expected_value(&self, key: &str) -> Result<&Value> {
        self.checked.borrow_mut().insert(key.to_string());
        self.expected
            .get(key)
            .ok_or_else(|| anyhow!("expected field {key:?} is missing"))
    }

    /// Names of every expected field.
    pub fn expected_keys(&self) -> Vec<String> {
        self.expected.keys().cloned().collect()
    }

    /// Whether an expected field is present.
    pub fn expects(&self, key: &str) -> bool {
        self.expected.contains_key(key)
    }

    /// Compares `got` with expected field `key` within `tol`; `label` says how it was computed.
    pub fn compare(&self, key: &str, label: &str, got: &[f64], tol: Tol) -> Result<()> {
        let want = self.expected_f64s(key)?;
        self.compare_values(&format!("{key}{label}"), &want, got, tol);
        Ok(())
    }

    /// Compares two arrays, recording each difference.
    pub fn compare_values(&self, field: &str, want: &[f64], got: &[f64], tol: Tol) {
        let mut ms = self.mismatches.borrow_mut();
        if want.len() != got.len() {
            ms.push(Mismatch {
                field: field.to_string(),
                index: None,
                expected: format!("{} values", want.len()),
                got: format!("{} values", got.len()),
            });
            return;
        }
        for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
            let ok = (g - w).abs() <= tol.atol + tol.rtol * w.abs() || (g == w);
            if !ok || g.is_nan() != w.is_nan() {
                ms.push(Mismatch {
                    field: field.to_string(),
                    index: Some(i),
                    expected: format!("{w:e}"),
                    got: format!("{g:e}"),
                });
            }
        }
    }

    /// Compares integers exactly.
    pub fn compare_exact(&self, key: &str, got: &[usize]) -> Result<()> {
        let want = self.expected_f64s(key)?;
        let got: Vec<f64> = got.iter().map(|&g| g as f64).collect();
        self.compare_values(
            key,
            &want,
            &got,
            Tol {
                atol: 0.0,
                rtol: 0.0,
            },
        );
        Ok(())
    }

    pub(super) fn take_mismatches(&self) -> Vec<Mismatch> {
        std::mem::take(&mut self.mismatches.borrow_mut())
    }

    /// Expected fields that no check looked at: the case asks for something we do not verify.
    pub(super) fn unchecked_expected(&self) -> Vec<Mismatch> {
        let checked = self.checked.borrow();
        self.expected
            .keys()
            .filter(|k| !checked.contains(*k))
            .map(|k| Mismatch {
                field: k.clone(),
                index: None,
                expected: "a checked value".into(),
                got: "no check for this field".into(),
            })
            .collect()
    }

    /// Input fields that the kind's check never read, as an explanation.
    pub(super) fn unknown_inputs(&self, kind: &str) -> Option<String> {
        let used = self.used.borrow();
        let unknown: Vec<&str> = self
            .fields
            .keys()
            .map(String::as_str)
            .filter(|k| !matches!(*k, "id" | "kind" | "expected") && !used.contains(*k))
            .collect();
        (!unknown.is_empty()).then(|| {
            format!("{kind} case has input field(s) the checker does not understand: {unknown:?}")
        })
    }
}

fn as_usize(v: &Value) -> Result<usize> {
    match v.as_u64() {
        Some(n) => Ok(n as usize),
        None => bail!("{v} is not a non-negative integer"),
    }
}

fn as_f64s(v: &Value) -> Result<Vec<f64>> {
    let arr = v.as_array().ok_or_else(|| anyhow!("not an array"))?;
    arr.iter()
        .map(|x| x.as_f64().ok_or_else(|| anyhow!("{x} is not a number")))
        .collect()
}
