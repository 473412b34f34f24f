//! The SVG plot of a run: throughput, p99 latency and queue depth over time, one panel each,
//! phases laid end to end.

use crate::sampler::Point;
use plotters::prelude::*;
use std::path::Path;

/// A phase's series with its start on the run's time axis.
pub struct Track<'a> {
    /// Phase name.
    pub name: &'a str,
    /// Seconds from the run start to the phase start.
    pub offset_s: f64,
    /// Its samples.
    pub points: &'a [Point],
}

/// Draws the three panels into `path`.
pub fn write_svg(path: &Path, title: &str, tracks: &[Track<'_>]) -> Result<(), String> {
    let all: Vec<(f64, &Point)> = tracks
        .iter()
        .flat_map(|t| t.points.iter().map(move |p| (t.offset_s + p.t_s, p)))
        .collect();
    if all.is_empty() {
        return Err("no samples to plot (the run was shorter than one sampling interval)".into());
    }
    let t_max = all.iter().map(|(t, _)| *t).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (1100, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((3, 1));

    let sent: Vec<(f64, f64)> = all.iter().map(|(t, p)| (*t, p.sent_per_s)).collect();
    let accepted: Vec<(f64, f64)> = all.iter().map(|(t, p)| (*t, p.accepted_per_s)).collect();
    let delivered: Vec<(f64, f64)> = all.iter().map(|(t, p)| (*t, p.delivered_per_s)).collect();
    let rate_max = accepted
        .iter()
        .chain(&delivered)
        .chain(&sent)
        .map(|(_, v)| *v)
        .fold(1.0, f64::max);
    panel(
        &panels[0],
        "throughput",
        "msgs/s",
        t_max,
        rate_max * 1.1,
        &[
            ("sent", &sent, RGBColor(150, 150, 150)),
            ("accepted", &accepted, BLUE),
            ("delivered", &delivered, GREEN),
        ],
    )?;

    let p99: Vec<(f64, f64)> = all
        .iter()
        .filter_map(|(t, p)| p.p99_ms.map(|v| (*t, v)))
        .collect();
    let p99_max = p99.iter().map(|(_, v)| *v).fold(1.0, f64::max);
    panel(
        &panels[1],
        "p99 end-to-end latency (per interval, corrected)",
        "ms",
        t_max,
        p99_max * 1.1,
        &[("p99", &p99, RED)],
    )?;

    let queue: Vec<(f64, f64)> = all
        .iter()
        .filter_map(|(t, p)| p.queue_messages.map(|q| (*t, q as f64)))
        .collect();
    let watched: Vec<(f64, f64)> = all
        .iter()
        .filter_map(|(t, p)| p.queue_watched.map(|q| (*t, q as f64)))
        .collect();
    let q_max = queue
        .iter()
        .chain(&watched)
        .map(|(_, v)| *v)
        .fold(1.0, f64::max);
    let mut lines = vec![("all destinations", &queue, MAGENTA)];
    if !watched.is_empty() {
        lines.push(("offline platform", &watched, BLACK));
    }
    panel(
        &panels[2],
        "queue depth",
        "messages",
        t_max,
        q_max * 1.1,
        &lines,
    )?;
    root.present().map_err(|e| e.to_string())
}

type Line<'a> = (&'a str, &'a Vec<(f64, f64)>, RGBColor);

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    t_max: f64,
    y_max: f64,
    lines: &[Line<'_>],
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc(unit)
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, points, color) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        let points: Vec<Point> = (0..10)
            .map(|i| Point {
                t_s: i as f64,
                accepted_per_s: 100.0 * i as f64,
                delivered_per_s: 90.0 * i as f64,
                p99_ms: Some(1.0 + i as f64),
                queue_messages: Some(10 * i),
                ..Point::default()
            })
            .collect();
        write_svg(
            &path,
            "test",
            &[Track {
                name: "steady",
                offset_s: 0.0,
                points: &points,
            }],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("throughput"));
    }
}
