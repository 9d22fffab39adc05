//! The report's charts, as inline SVG for the HTML page (Markdown gives their numbers as
//! tables instead). Text drawn in a chart is escaped here.

use std::fmt::Write;

use super::html::esc;
use super::{PerDevice, Spend, eps};

const SERIES_COLOURS: [&str; 3] = ["#1f5fa8", "#2e8540", "#7a3e9d"];
const BUDGET_COLOUR: &str = "#b00020";

/// A round-number tick step giving at most about `n` ticks over `[0, max]`.
fn tick_step(max: f64, n: usize) -> f64 {
    let raw = max / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// The cumulative ε of each audience, round by round, against the budget line.
pub(super) fn epsilon_chart(s: &Spend) -> String {
    let (w, h) = (440.0, 260.0);
    let (l, r, t, b) = (48.0, 12.0, 24.0, 36.0);
    let x_max = s
        .series
        .iter()
        .filter_map(|se| se.points.last().map(|p| p.round))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let top = s
        .series
        .iter()
        .flat_map(|se| se.points.iter().map(|p| p.epsilon))
        .fold(s.budget_epsilon, f64::max)
        * 1.08;
    let x = |v: f64| l + (w - l - r) * v / x_max;
    let y = |v: f64| h - b - (h - t - b) * v / top;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"epsilon-chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Cumulative epsilon per round against the budget\">"
    );
    let _ = writeln!(
        o,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{l}\" y=\"14\" font-weight=\"bold\">Cumulative ε per round (δ = {:e})</text>",
        s.delta
    );
    let ystep = tick_step(top, 5);
    let mut v = 0.0;
    while v <= top + 1e-12 {
        let _ = writeln!(
            o,
            "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e3e3e3\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            y(v),
            w - r,
            y(v),
            l - 4.0,
            y(v) + 4.0,
            trim_num(v)
        );
        v += ystep;
    }
    let xstep = tick_step(x_max, 8).max(1.0).round();
    let mut v = 0.0;
    while v <= x_max + 1e-9 {
        let _ = writeln!(
            o,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(v),
            h - b,
            x(v),
            h - b + 4.0,
            x(v),
            h - b + 16.0,
            v as u64
        );
        v += xstep;
    }
    let _ = writeln!(
        o,
        "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">round</text>",
        (l + w - r) / 2.0,
        h - 4.0
    );
    let _ = writeln!(
        o,
        "<line id=\"budget-line\" x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{BUDGET_COLOUR}\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{BUDGET_COLOUR}\">budget ε = {}</text>",
        y(s.budget_epsilon),
        w - r,
        y(s.budget_epsilon),
        w - r - 2.0,
        y(s.budget_epsilon) - 4.0,
        trim_num(s.budget_epsilon)
    );
    for (i, se) in s.series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.round as f64), y(p.epsilon)))
            .collect();
        let _ = writeln!(
            o,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        let ly = t + 8.0 + 14.0 * i as f64;
        let _ = writeln!(
            o,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"2.5\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            l + 8.0,
            l + 26.0,
            l + 30.0,
            ly + 4.0,
            esc(&se.audience.replace('_', " "))
        );
    }
    if s.series.is_empty() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no round committed yet</text>",
            (l + w - r) / 2.0,
            (t + h - b) / 2.0
        );
    }
    let _ = writeln!(o, "</svg>");
    o
}

/// The histogram of per-device ε.
pub(super) fn histogram_chart(pd: &PerDevice) -> String {
    let (w, h) = (440.0, 260.0);
    let (l, r, t, b) = (48.0, 12.0, 24.0, 36.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"device-histogram\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Histogram of per-device epsilon\">"
    );
    let _ = writeln!(
        o,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{l}\" y=\"14\" font-weight=\"bold\">Devices by their own ε (no amplification)</text>"
    );
    let peak = pd.histogram.iter().map(|b| b.devices).max().unwrap_or(0);
    if peak == 0 {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no device has taken part yet</text>",
            (l + w - r) / 2.0,
            (t + h - b) / 2.0
        );
        let _ = writeln!(o, "</svg>");
        return o;
    }
    let top = peak as f64 * 1.1;
    let y = |v: f64| h - b - (h - t - b) * v / top;
    let ystep = tick_step(top, 5).max(1.0).round();
    let mut v = 0.0;
    while v <= top {
        let _ = writeln!(
            o,
            "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e3e3e3\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            y(v),
            w - r,
            y(v),
            l - 4.0,
            y(v) + 4.0,
            v as u64
        );
        v += ystep;
    }
    let n = pd.histogram.len() as f64;
    let bw = (w - l - r) / n;
    for (i, bin) in pd.histogram.iter().enumerate() {
        let x0 = l + bw * i as f64;
        let _ = writeln!(
            o,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#1f5fa8\"><title>{} devices with ε in [{}, {}]</title></rect>",
            x0 + 1.0,
            y(bin.devices as f64),
            bw - 2.0,
            h - b - y(bin.devices as f64),
            bin.devices,
            eps(bin.from),
            eps(bin.to)
        );
        if i % 2 == 0 || pd.histogram.len() <= 5 {
            let _ = writeln!(
                o,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0,
                h - b + 14.0,
                trim_num(bin.from)
            );
        }
    }
    if let Some(last) = pd.histogram.last() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            w - r,
            h - b + 14.0,
            trim_num(last.to)
        );
    }
    let _ = writeln!(
        o,
        "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">ε per device</text>",
        h - b,
        w - r,
        h - b,
        (l + w - r) / 2.0,
        h - 4.0
    );
    let _ = writeln!(o, "</svg>");
    o
}

/// A short number for axis labels: at most three significant decimals, no trailing zeros.
pub(super) fn trim_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round_numbers() {
        assert_eq!(tick_step(4.4, 5), 1.0);
        assert_eq!(tick_step(22.0, 5), 5.0);
        assert_eq!(tick_step(0.9, 5), 0.2);
        assert_eq!(trim_num(2.50), "2.5");
        assert_eq!(trim_num(0.0), "0");
    }
}
