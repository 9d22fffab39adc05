//! Numerically careful helpers in log space.

/// `ln(e^a + e^b)` without overflow; `-inf` is the identity.
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln Σ e^{x_i}` over a slice, stable for very large or very small terms.
pub(crate) fn log_sum_exp(terms: &[f64]) -> f64 {
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// `ln Γ(x + 1) = ln x!` for x ≥ 0, used for binomial coefficients at integer orders.
///
/// Exact summation of logarithms for small arguments (no approximation error), Stirling's
/// series beyond, where its truncation error is below 1e-17.
pub(crate) fn ln_factorial(n: u64) -> f64 {
    if n < 256 {
        (2..=n).map(|k| (k as f64).ln()).sum()
    } else {
        let x = n as f64 + 1.0;
        // ln Γ(x) ≈ (x − ½) ln x − x + ½ ln 2π + 1/(12x) − 1/(360x³) + 1/(1260x⁵)
        (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x)
            - 1.0 / (360.0 * x.powi(3))
            + 1.0 / (1260.0 * x.powi(5))
    }
}

/// `ln C(n, k)` for integers 0 ≤ k ≤ n.
pub(crate) fn ln_binomial(n: u64, k: u64) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_matches_direct_sum_and_handles_minus_infinity() {
        assert!((log_add(1.0_f64.ln(), 2.0_f64.ln()) - 3.0_f64.ln()).abs() < 1e-15);
        assert_eq!(log_add(f64::NEG_INFINITY, 5.0), 5.0);
        assert_eq!(
            log_add(f64::NEG_INFINITY, f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        assert!((log_add(1000.0, 1000.0) - (1000.0 + 2.0_f64.ln())).abs() < 1e-12);
    }

    #[test]
    fn log_sum_exp_of_huge_terms_does_not_overflow() {
        let v = log_sum_exp(&[800.0, 800.0, 800.0]);
        assert!((v - (800.0 + 3.0_f64.ln())).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
    }

    #[test]
    fn ln_factorial_is_continuous_across_the_stirling_switch() {
        // ln 256! − ln 255! must equal ln 256.
        let d = ln_factorial(256) - ln_factorial(255);
        assert!((d - 256.0_f64.ln()).abs() < 1e-12, "{d}");
        assert!((ln_binomial(10, 3) - 120.0_f64.ln()).abs() < 1e-13);
        assert!((ln_binomial(1024, 512) - ln_binomial(1024, 512)).abs() == 0.0);
    }
}
