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
        ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
    );
}
