//! Benchmark figures in one shape, for the table `scripts/bench` prints from every service's
//! benchmark: each is also printed as a line `FIGURE|service|figure|goal|measured|baseline|ratio`.

/// One measured figure, with the goal it is held to and, when there is one, the baseline
/// measured in the same run and the ratio of the two.
pub fn figure(
    service: &str,
    name: &str,
    goal: &str,
    measured: &str,
    baseline: Option<&str>,
    ratio: Option<f64>,
) {
    println!(
        "FIGURE|{service}|{name}|{goal}|{measured}|{}|{}",
        baseline.unwrap_or("-"),
        ratio.map_or_else(|| "-".to_owned(), ratio_text)
    );
}

/// Two decimals, or as many significant digits as a ratio far below one needs.
fn ratio_text(ratio: f64) -> String {
    if ratio >= 0.01 || ratio <= 0.0 {
        format!("{ratio:.2}x")
    } else {
        format!("{ratio:.1e}x")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_small_ratio_keeps_its_digits() {
        assert_eq!(super::ratio_text(2.5), "2.50x");
        assert_eq!(super::ratio_text(0.18), "0.18x");
        assert_eq!(super::ratio_text(0.000_26), "2.6e-4x");
    }
}
