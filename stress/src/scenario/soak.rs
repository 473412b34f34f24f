//! `stress soak`: a long steady run that watches the relay's memory and store size. Growth is
//! the slope of a least-squares line through the samples after the first tenth of the run
//! (start-up and cache warm-up excluded), per hour.

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::SoakArgs;
use crate::producer::Schedule;
use crate::report::Report;
use crate::sampler::Point;
use crate::workload::Profile;
use std::time::Duration;

/// Slope of `y` over `t` (units per second), least squares; `None` under 3 points.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (st, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t, b + y));
    let (mt, my) = (st / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, y)| {
        (num + (t - mt) * (y - my), den + (t - mt) * (t - mt))
    });
    (den > 0.0).then(|| num / den)
}

/// Growth figures of a series.
pub fn growth(series: &[Point], load_s: f64) -> serde_json::Value {
    let warm = load_s * 0.1;
    let pick = |f: fn(&Point) -> Option<u64>| -> Vec<(f64, f64)> {
        series
            .iter()
            .filter(|p| p.t_s >= warm && p.t_s <= load_s)
            .filter_map(|p| f(p).map(|v| (p.t_s, v as f64)))
            .collect()
    };
    let rss = pick(|p| p.relay_rss_bytes);
    let store = pick(|p| p.store_bytes);
    let first_last = |v: &[(f64, f64)]| (v.first().map(|p| p.1), v.last().map(|p| p.1));
    let (rss_first, rss_last) = first_last(&rss);
    let (store_first, store_last) = first_last(&store);
    serde_json::json!({
        "rss_after_warmup_bytes": rss_first,
        "rss_end_bytes": rss_last,
        "rss_growth_bytes_per_hour": slope(&rss).map(|s| s * 3600.0),
        "store_after_warmup_bytes": store_first,
        "store_end_bytes": store_last,
        "store_growth_bytes_per_hour": slope(&store).map(|s| s * 3600.0),
    })
}

/// Runs the scenario.
pub async fn run(a: &SoakArgs) -> Result<Report, Error> {
    let mut session = Session::open(&a.target, &a.workload, false, "").await?;
    let spec = phase_spec(
        0,
        "soak",
        Schedule::Open(Profile::constant(a.rate, a.duration)),
        &a.output,
        Duration::from_secs(5),
    );
    let phase = session.phase(&spec).await?;
    let result = growth(&phase.run.series, phase.run.load_s);
    session.finish("soak", &a.output, result, Vec::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|t| (t as f64, 5.0 + 2.0 * t as f64)).collect();
        assert!((slope(&pts).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(slope(&pts[..2]), None);
    }

    #[test]
    fn growth_skips_the_warm_up() {
        let series: Vec<Point> = (0..100)
            .map(|t| Point {
                t_s: t as f64,
                relay_rss_bytes: Some(if t < 5 { 1 } else { 1000 }),
                store_bytes: Some(t * 10),
                ..Point::default()
            })
            .collect();
        let g = growth(&series, 100.0);
        assert_eq!(g["rss_growth_bytes_per_hour"].as_f64(), Some(0.0));
        assert!((g["store_growth_bytes_per_hour"].as_f64().unwrap() - 36_000.0).abs() < 1.0);
    }
}
