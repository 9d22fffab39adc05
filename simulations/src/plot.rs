//! Plots as PNG and SVG with plotters: metrics against the round, and RMSE against ε from a
//! sweep. Both formats carry the title, the axis labels and a legend. No system font library
//! is used: the PNG's text is rasterised by `ab_glyph` from DejaVu Sans, embedded in the
//! binary (the `dejavu` crate; DejaVu's licence allows embedding and redistribution), and the
//! SVG's text is drawn by the viewer.

use std::path::{Path, PathBuf};
use std::sync::Once;

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

/// One named line of a plot.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend's entry.
    pub name: String,
    /// The points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// The font family every plot's text uses.
pub(crate) const FONT: &str = "sans-serif";

static REGISTER_FONT: Once = Once::new();

/// Registers the embedded DejaVu Sans as plotters' `sans-serif` (once per process).
pub(crate) fn register_font() {
    REGISTER_FONT.call_once(|| {
        // The bytes are a valid TrueType font shipped inside the dependency; a failure here
        // would be a broken build, not bad input.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            panic!("the embedded DejaVu Sans font could not be parsed");
        }
    });
}

pub(crate) const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

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

/// What to draw: the title, the axis labels and the series.
struct Figure<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
}

/// Draws `figure` on `root`; `labels: false` leaves out every piece of text (title, axis
/// labels, tick labels, legend) — only the tests use it, to see what the text adds.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    figure: &Figure,
    labels: bool,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = figure
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let ((x0, x1), (y0, y1)) = bounds(&all);
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption(figure.title, (FONT, 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc(figure.x_label)
            .y_desc(figure.y_label)
            .label_style((FONT, 13));
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (i, s) in figure.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let drawn = chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &colour))
            .map_err(|e| e.to_string())?;
        if labels {
            drawn.label(s.name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| e.to_string())?;
    }
    if labels {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Draws `points` (x, y) as `<stem>.png` and `<stem>.svg`, with the legend entry `y_label`;
/// returns the two paths. Nothing is drawn for no points.
pub fn line_plot(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> Result<Vec<PathBuf>, PlotError> {
    lines_plot(
        stem,
        title,
        x_label,
        y_label,
        &[Series {
            name: y_label.to_string(),
            points: points.to_vec(),
        }],
    )
}

/// Draws several named series on one pair of axes as `<stem>.png` and `<stem>.svg`, with a
/// legend; returns the two paths. Series without points are left out, and nothing is drawn
/// when none has any.
pub fn lines_plot(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Vec<PathBuf>, PlotError> {
    let series: Vec<Series> = series
        .iter()
        .filter(|s| !s.points.is_empty())
        .cloned()
        .collect();
    if series.is_empty() {
        return Ok(vec![]);
    }
    register_font();
    let figure = Figure {
        title,
        x_label,
        y_label,
        series: &series,
    };
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let err = |file: &Path| {
        let file = file.display().to_string();
        move |message: String| PlotError { file, message }
    };
    draw(
        BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
        &figure,
        true,
    )
    .map_err(err(&png))?;
    draw(
        SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
        &figure,
        true,
    )
    .map_err(err(&svg))?;
    Ok(vec![png, svg])
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u32 = 800;
    const H: u32 = 500;

    fn render(labels: bool) -> Vec<u8> {
        register_font();
        let series = [Series {
            name: "test RMSE".into(),
            points: vec![(1.0, 1.2), (2.0, 1.1), (3.0, 1.05)],
        }];
        let figure = Figure {
            title: "test RMSE by round",
            x_label: "round",
            y_label: "test RMSE",
            series: &series,
        };
        let mut buffer = vec![0u8; (W * H * 3) as usize];
        draw(
            BitMapBackend::with_buffer(&mut buffer, (W, H)).into_drawing_area(),
            &figure,
            labels,
        )
        .unwrap();
        buffer
    }

    /// Pixels of rows `rows` darker than light grey (text is black; the background white).
    fn dark_pixels(buffer: &[u8], rows: std::ops::Range<u32>) -> usize {
        rows.flat_map(|y| (0..W).map(move |x| ((y * W + x) * 3) as usize))
            .filter(|&i| buffer[i..i + 3].iter().all(|&c| c < 128))
            .count()
    }

    #[test]
    fn the_png_title_band_holds_rasterised_text_only_when_labels_are_drawn() {
        // Rows 0..40 are the margin and the caption: with no text they stay white.
        let plain = render(false);
        let labelled = render(true);
        assert_eq!(dark_pixels(&plain, 0..20), 0);
        assert_eq!(dark_pixels(&plain, 20..40), 0, "no text, no dark pixels");
        let title = dark_pixels(&labelled, 20..40);
        assert!(title > 200, "the caption drew {title} dark pixels");
        // The x-axis description sits in the bottom label area, below the tick labels.
        let x_desc = dark_pixels(&labelled, H - 40..H - 20);
        assert!(x_desc > 50, "the x label drew {x_desc} dark pixels");
    }

    #[test]
    fn every_series_gets_a_legend_entry_and_empty_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let files = lines_plot(
            &dir.path().join("cohorts"),
            "RMSE per cohort",
            "round",
            "test RMSE",
            &[
                Series {
                    name: "light".into(),
                    points: vec![(1.0, 1.0), (2.0, 0.9)],
                },
                Series {
                    name: "heavy".into(),
                    points: vec![(1.0, 0.8), (2.0, 0.7)],
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                },
            ],
        )
        .unwrap();
        assert_eq!(files.len(), 2);
        let svg = std::fs::read_to_string(dir.path().join("cohorts.svg")).unwrap();
        // plotters writes each text element's content on a line of its own.
        assert!(svg.contains("\nlight\n") && svg.contains("\nheavy\n"));
        assert!(!svg.contains("\nempty\n"));
        assert!(
            lines_plot(&dir.path().join("none"), "t", "x", "y", &[])
                .unwrap()
                .is_empty()
        );
    }
}
