//! Plots as PNG and SVG with plotters: a metric against the round, and RMSE against ε from a
//! sweep. Built without font dependencies: the SVG's text is drawn by the viewer; the PNG
//! has no font to draw with, so its axes carry no labels (read them off the SVG).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct PlotError {
    /// The file.
    pub file: String,
    /// What went wrong.
    pub message: String,
}

fn bounds(points: &[(f64, f64)]) -> ((f64, f64), (f64, f64)) {
    let fold = |f: fn(&(f64, f64)) -> f64| {
        points
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let pad = |(lo, hi): (f64, f64)| {
        let span = (hi - lo).abs().max(1e-9);
        (lo - 0.05 * span, hi + 0.05 * span)
    };
    (pad(fold(|p| p.0)), pad(fold(|p| p.1)))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
    labels: bool,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let ((x0, x1), (y0, y1)) = bounds(points);
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc(x_label).y_desc(y_label);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Draws `points` (x, y) as `<stem>.png` and `<stem>.svg`; returns the two paths. Nothing
/// is drawn for fewer than one point.
pub fn line_plot(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> Result<Vec<PathBuf>, PlotError> {
    if points.is_empty() {
        return Ok(vec![]);
    }
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let err = |file: &Path| {
        let file = file.display().to_string();
        move |message: String| PlotError { file, message }
    };
    draw(
        BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
        title,
        x_label,
        y_label,
        points,
        // No font backend: drawing text on a bitmap would panic inside plotters.
        false,
    )
    .map_err(err(&png))?;
    draw(
        SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
        title,
        x_label,
        y_label,
        points,
        true,
    )
    .map_err(err(&svg))?;
    Ok(vec![png, svg])
}
