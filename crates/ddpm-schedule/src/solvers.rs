//! Multistep solvers of the probability-flow ODE in data-prediction form: DPM-Solver++(2M)
//! (Lu et al. 2022) and UniPC with the B(h) = e^{-h} - 1 variant, UniP-2 + UniC (Zhao et al. 2023).
//!
//! Both step on the (respaced) timesteps of the process, with alpha_i = sqrt(alpha_bar_i),
//! sigma_i = sqrt(1 - alpha_bar_i) and lambda_i = ln(alpha_i / sigma_i), and after index 0 they
//! step to the clean point (alpha = 1, sigma = 0). Every update is a linear combination of the
//! current sample and x_0 predictions, so each is written as scalar coefficients on tensors.

use crate::{Result, Schedule};
use candle_core::Tensor;

/// Which multistep ODE solver a [`Multistep`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OdeSolver {
    /// DPM-Solver++(2M), midpoint form.
    DpmSolverPp2m,
    /// UniPC (bh2), UniP-2 predictor with UniC corrector.
    UniPc,
}

/// alpha_i and sigma_i of respaced index `i`.
fn alpha_sigma(s: &Schedule, i: usize) -> (f64, f64) {
    let ab = s.alphas_cumprod[i];
    (ab.sqrt(), (1.0 - ab).sqrt())
}

/// lambda_i = ln(alpha_i / sigma_i), the half log-SNR of respaced index `i`.
fn lambda(s: &Schedule, i: usize) -> f64 {
    let (a, sg) = alpha_sigma(s, i);
    (a / sg).ln()
}

/// Coefficients (on x_s, x0_s) of the first-order step from index `from` to index `to`.
///
/// This is DDIM's deterministic update written in lambda: x_t = (sigma_t / sigma_s)·x_s
/// + alpha_t·(1 - e^{-h})·x0_s, with h = lambda_t - lambda_s.
pub(crate) fn first_order_coefs(s: &Schedule, from: usize, to: usize) -> [f64; 2] {
    let (_, sg_s) = alpha_sigma(s, from);
    let (a_t, sg_t) = alpha_sigma(s, to);
    let h = lambda(s, to) - lambda(s, from);
    // expm1 keeps 1 - e^{-h} accurate when a fine schedule makes h small.
    [sg_t / sg_s, -a_t * (-h).exp_m1()]
}

/// Coefficients (on x_s, x0_s, x0_prev) of the DPM-Solver++(2M) step `from` -> `to`, with
/// `prev` the index of the evaluation before `from`.
///
/// Midpoint form: x_t = (sigma_t / sigma_s)·x_s + alpha_t·(1 - e^{-h})·(D0 + D1 / 2), with
/// D0 = x0_s, D1 = (x0_s - x0_prev) / r, r = h_prev / h. With bh2, UniP-2 is this same step.
pub(crate) fn dpm_solver_pp_2m_coefs(
    s: &Schedule,
    prev: usize,
    from: usize,
    to: usize,
) -> [f64; 3] {
    let [c_x, c_d] = first_order_coefs(s, from, to);
    let h = lambda(s, to) - lambda(s, from);
    let r = (lambda(s, from) - lambda(s, prev)) / h;
    let half_d1 = 0.5 * c_d / r;
    [c_x, c_d + half_d1, -half_d1]
}

/// Coefficients (on x_s, x0_s, x0_t) of UniC-1, the corrector after a first-order step.
///
/// With one earlier point UniC's rho is 1/2: x0_s + (x0_t - x0_s) / 2 replaces x0_s.
pub(crate) fn unic1_coefs(s: &Schedule, from: usize, to: usize) -> [f64; 3] {
    let [c_x, c_d] = first_order_coefs(s, from, to);
    [c_x, 0.5 * c_d, 0.5 * c_d]
}

/// Coefficients (on x_s, x0_s, x0_prev, x0_t) of UniC-2, the corrector after a second-order step.
///
/// rho solves [[1, 1], [r, 1]]·rho = g, where r = (lambda_prev - lambda_s) / h and
/// g_k = k!·phi_{k+1}(-h)·(-h)^k / B(h) are the bh2 right-hand sides (phi_k as in the paper);
/// rho_1 weighs D1 = (x0_prev - x0_s) / r, rho_2 weighs x0_t - x0_s.
pub(crate) fn unic2_coefs(s: &Schedule, prev: usize, from: usize, to: usize) -> [f64; 4] {
    let [c_x, c_d] = first_order_coefs(s, from, to);
    let h = lambda(s, to) - lambda(s, from);
    let r = (lambda(s, prev) - lambda(s, from)) / h;
    let hh = -h;
    let b_h = hh.exp_m1();
    let phi2 = hh.exp_m1() / hh - 1.0;
    let phi3 = phi2 / hh - 0.5;
    let (g1, g2) = (phi2 / b_h, 2.0 * phi3 / b_h);
    let rho1 = (g1 - g2) / (1.0 - r);
    let rho2 = g1 - rho1;
    // -alpha_t·B(h) = c_d, so each rho term adds c_d·rho·(its difference).
    let on_d1 = c_d * rho1 / r;
    let on_t = c_d * rho2;
    [c_x, c_d - on_d1 - on_t, on_d1, on_t]
}

/// Sum of coefficient · tensor pairs.
fn combine(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, x) in terms {
        let term = x.affine(c, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    Ok(acc.expect("a solver update has at least one term"))
}

/// A UniPC predictor step, remembered until the next evaluation corrects it.
#[derive(Debug)]
struct Predicted {
    /// The sample the predictor started from.
    x_s: Tensor,
    /// The predictor's order, which is the order its corrector uses.
    order: usize,
}

/// The state a multistep solver carries from one model evaluation to the next.
#[derive(Debug)]
pub(crate) struct Multistep {
    solver: OdeSolver,
    /// (index, x_0 prediction) of the last two evaluations, oldest first.
    history: Vec<(usize, Tensor)>,
    /// UniPC's last predictor step, for the corrector.
    predicted: Option<Predicted>,
}

impl Multistep {
    /// A solver with no history, ready to start at x_T.
    pub(crate) fn new(solver: OdeSolver) -> Self {
        Self {
            solver,
            history: Vec::with_capacity(2),
            predicted: None,
        }
    }

    /// Takes the model's x_0 prediction at index `i` (made from `x_i`, the sample the model saw)
    /// and returns the sample at `i - 1`, or the clean sample when `i` is 0.
    ///
    /// Calls must run i = N-1 down to 0, one index at a time; the solver is spent after i = 0.
    pub(crate) fn step(
        &mut self,
        s: &Schedule,
        x_i: &Tensor,
        i: usize,
        pred_xstart: &Tensor,
    ) -> Result<Tensor> {
        debug_assert!(self.history.last().is_none_or(|&(j, _)| j == i + 1));
        let predicted = self.predicted.take();
        // The clean point has sigma = 0 (lambda = inf): the step there is first order and lands
        // on the x_0 prediction itself, whatever x_i is, so a correction of x_i would be lost.
        if i == 0 {
            return Ok(pred_xstart.clone());
        }
        // UniC refines x_i with the evaluation just made at the uncorrected x_i, which is what
        // saves it a model call; the next step then starts from the refined x_i.
        let x_s = match predicted {
            Some(p) => self.correct(s, &p, i, pred_xstart)?,
            None => x_i.clone(),
        };
        if self.history.len() == 2 {
            self.history.remove(0);
        }
        self.history.push((i, pred_xstart.clone()));
        let (order, sample) = match self.history.as_slice() {
            [(prev, x0_prev), (_, x0_s)] => {
                let [c_x, c_s, c_p] = dpm_solver_pp_2m_coefs(s, *prev, i, i - 1);
                (2, combine(&[(c_x, &x_s), (c_s, x0_s), (c_p, x0_prev)])?)
            }
            _ => {
                let [c_x, c_s] = first_order_coefs(s, i, i - 1);
                (1, combine(&[(c_x, &x_s), (c_s, pred_xstart)])?)
            }
        };
        if self.solver == OdeSolver::UniPc {
            self.predicted = Some(Predicted { x_s, order });
        }
        Ok(sample)
    }

    /// UniC: the predictor's step from `p.x_s` to index `to`, redone with x0_t included.
    ///
    /// Must run before `history` takes x0_t: its newest entry is still the step's start.
    fn correct(&self, s: &Schedule, p: &Predicted, to: usize, x0_t: &Tensor) -> Result<Tensor> {
        match (p.order, self.history.as_slice()) {
            (2, [(prev, x0_prev), (from, x0_s)]) => {
                let [c_x, c_s, c_p, c_t] = unic2_coefs(s, *prev, *from, to);
                combine(&[(c_x, &p.x_s), (c_s, x0_s), (c_p, x0_prev), (c_t, x0_t)])
            }
            (_, [.., (from, x0_s)]) => {
                let [c_x, c_s, c_t] = unic1_coefs(s, *from, to);
                combine(&[(c_x, &p.x_s), (c_s, x0_s), (c_t, x0_t)])
            }
            (_, []) => unreachable!("a predictor step always follows an evaluation"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BetaSchedule;

    #[test]
    fn coefficients_integrate_polynomial_data_predictions() {
        // The exact flow is x_t = sigma_t·(x_s / sigma_s + ∫ e^lambda x0(lambda) dlambda) over
        // [lambda_s, lambda_t]. First-order steps must be exact for constant x0 and UniC-2 for
        // x0 quadratic in lambda; midpoint 2M misses the linear part by its h³ term.
        let s = Schedule::named(BetaSchedule::Linear, 1000)
            .unwrap()
            .respace_spec("10")
            .unwrap()
            .schedule;
        let (prev, from, to) = (5, 4, 3);
        let l = |i| lambda(&s, i);
        let (ls, lt) = (l(from), l(to));
        let h = lt - ls;
        let (a_t, sg_t) = alpha_sigma(&s, to);
        let x_s = 0.7;
        // Antiderivatives of e^l, l·e^l and l²·e^l.
        let prim = |l: f64| {
            [
                l.exp(),
                (l - 1.0) * l.exp(),
                (l * l - 2.0 * l + 2.0) * l.exp(),
            ]
        };
        let (p_t, p_s) = (prim(lt), prim(ls));
        let exact = |c: [f64; 3]| {
            let integral: f64 = (0..3).map(|k| c[k] * (p_t[k] - p_s[k])).sum();
            sg_t * (x_s / alpha_sigma(&s, from).1 + integral)
        };
        let x0 = |c: [f64; 3], i: usize| c[0] + c[1] * l(i) + c[2] * l(i) * l(i);
        let constant = [0.3, 0.0, 0.0];
        let [c, d] = first_order_coefs(&s, from, to);
        let got = c * x_s + d * x0(constant, from);
        assert!((got - exact(constant)).abs() < 1e-12, "{got}");
        let [c, d, t] = unic1_coefs(&s, from, to);
        let got = c * x_s + d * x0(constant, from) + t * x0(constant, to);
        assert!((got - exact(constant)).abs() < 1e-12, "{got}");

        let linear = [0.3, 0.2, 0.0];
        let [c, d, p] = dpm_solver_pp_2m_coefs(&s, prev, from, to);
        let err = c * x_s + d * x0(linear, from) + p * x0(linear, prev) - exact(linear);
        // Its error is -b·alpha_t·(h³/12 - h⁴/24 + ...) for slope b.
        let lead = linear[1] * a_t * h.powi(3) / 12.0;
        assert!(
            err < 0.0 && -err < lead && -err > 0.5 * lead,
            "{err} vs {lead}"
        );

        let quadratic = [0.3, 0.2, -0.05];
        let [c, d, p, t] = unic2_coefs(&s, prev, from, to);
        let got =
            c * x_s + d * x0(quadratic, from) + p * x0(quadratic, prev) + t * x0(quadratic, to);
        assert!(
            (got - exact(quadratic)).abs() < 1e-12,
            "{got} vs {}",
            exact(quadratic)
        );
    }
}
