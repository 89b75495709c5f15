//! SVG charts for comparing routing policies: per-policy bar charts and load-sweep curves.
//!
//! Text is emitted as SVG `<text>` elements (plotters' built-in naive font metrics), so no
//! font files are needed. Output is deterministic: the same input yields byte-identical SVG.

use std::path::Path;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::full_palette as fp;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One bar of a per-policy chart: mean over seeds with a ±std whisker.
#[derive(Debug, Clone)]
pub struct PolicyBar {
    /// Policy name, used as the x-axis label.
    pub policy: String,
    /// Mean over seeds (NaN if the policy produced nothing).
    pub mean: f64,
    /// Standard deviation over seeds (NaN is treated as 0).
    pub std: f64,
}

/// One curve of a load sweep: (x = load value, mean, std) per point, x ascending.
#[derive(Debug, Clone)]
pub struct SweepCurve {
    /// Policy name, shown in the legend.
    pub policy: String,
    /// `(x, mean, std)` per sweep point, x ascending; NaN points are skipped (the line breaks there).
    pub points: Vec<(f64, f64, f64)>,
}

/// Errors raised while drawing a chart.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The plotting backend failed (e.g. the file could not be written).
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
    /// The input contained nothing drawable.
    #[error("nothing to plot in {path}: {what}")]
    Empty { path: String, what: String },
}

/// Fixed, colour-blind-friendly-ish palette; policies cycle through it by index.
const PALETTE: [RGBColor; 10] = [
    fp::BLUE_700,
    fp::ORANGE_800,
    fp::GREEN_700,
    fp::RED_700,
    fp::PURPLE_500,
    fp::BROWN_500,
    fp::PINK_400,
    fp::BLUEGREY_600,
    fp::LIME_800,
    fp::CYAN_600,
];

const FONT: &str = "sans-serif";
const HEIGHT: u32 = 520;

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn draw_err<E: std::fmt::Display>(path: &Path, e: E) -> PlotError {
    PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn empty(path: &Path, what: &str) -> PlotError {
    PlotError::Empty {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

/// Category x axis: slot `i` is centred on `i as f64`, labelled with the i-th name.
#[derive(Debug)]
struct Categories(Vec<String>);

impl Ranged for Categories {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, (lo, hi): (i32, i32)) -> i32 {
        let frac = (v + 0.5) / self.0.len() as f64;
        lo + (frac * f64::from(hi - lo)).round() as i32
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            vec![]
        } else {
            (0..self.0.len()).map(|i| i as f64).collect()
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0.len() as f64 - 0.5
    }
}

impl ValueFormatter<f64> for Categories {
    fn format_ext(&self, v: &f64) -> String {
        self.0.get(v.round() as usize).cloned().unwrap_or_default()
    }
}

/// Top of the y axis: ~10% above the largest finite mean+std, at least 1.0 when nothing is positive.
fn y_top(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let max = pairs
        .filter(|(m, _)| m.is_finite())
        .map(|(m, s)| m + if s.is_finite() { s.abs() } else { 0.0 })
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    if max > 0.0 {
        (max * 1.1).min(f64::MAX)
    } else {
        1.0
    }
}

/// Whisker bounds `(lo, hi)` clamped to the visible y range.
fn whisker(mean: f64, std: f64, top: f64) -> (f64, f64) {
    let s = if std.is_finite() { std.abs() } else { 0.0 };
    ((mean - s).clamp(0.0, top), (mean + s).clamp(0.0, top))
}

/// Draws a vertical error bar at `x` from `lo` to `hi` with horizontal caps of `cap` pixels.
fn error_bar<X: Ranged>(
    area: &DrawingArea<SVGBackend<'_>, Cartesian2d<X, RangedCoordf64>>,
    x: X::ValueType,
    (lo, hi): (f64, f64),
    cap: i32,
    style: ShapeStyle,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>>
where
    X::ValueType: Clone,
{
    area.draw(&PathElement::new(
        vec![(x.clone(), lo), (x.clone(), hi)],
        style,
    ))?;
    for y in [lo, hi] {
        area.draw(
            &(EmptyElement::at((x.clone(), y))
                + PathElement::new(vec![(-cap, 0), (cap, 0)], style)),
        )?;
    }
    Ok(())
}

/// Human-friendly value label: ~3 significant digits.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Bar chart, one bar per policy (in the given order), with std whiskers and the value printed above each bar.
pub fn policy_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    bars: &[PolicyBar],
) -> Result<(), PlotError> {
    if bars.is_empty() {
        return Err(empty(path, "no policies"));
    }
    let n = bars.len();
    // Size each bar slot so the longest name fits horizontally (~8 px per char at 14 px font).
    let max_chars = bars
        .iter()
        .map(|b| b.policy.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let slot = (max_chars * 8 + 24).max(80);
    let width = (n as u32 * slot + 110).max(480);
    let top = y_top(bars.iter().map(|b| (b.mean, b.std)));

    let root = SVGBackend::new(path, (width, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            Categories(bars.iter().map(|b| b.policy.clone()).collect()),
            0.0..top,
        )
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_style((FONT, 14))
        .y_label_style((FONT, 13))
        .y_desc(y_label)
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    let area = chart.plotting_area();
    let text_style = TextStyle::from((FONT, 13)).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, b) in bars.iter().enumerate() {
        let x = i as f64;
        if !b.mean.is_finite() {
            let na = EmptyElement::at((x, 0.0)) + Text::new("n/a", (0, -4), text_style.clone());
            area.draw(&na).map_err(|e| draw_err(path, e))?;
            continue;
        }
        let h = b.mean.clamp(0.0, top);
        let rect = Rectangle::new([(x - 0.3, 0.0), (x + 0.3, h)], color(i).mix(0.85).filled());
        area.draw(&rect).map_err(|e| draw_err(path, e))?;
        let (lo, hi) = whisker(b.mean, b.std, top);
        error_bar(area, x, (lo, hi), 8, BLACK.stroke_width(1)).map_err(|e| draw_err(path, e))?;
        let value = EmptyElement::at((x, hi.max(h)))
            + Text::new(fmt_value(b.mean), (0, -4), text_style.clone());
        area.draw(&value).map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// One series of a grouped bar chart: a name (legend) and one value per group (NaN: no bar).
#[derive(Debug, Clone)]
pub struct BarSeries {
    /// Series name, shown in the legend.
    pub name: String,
    /// One value per group, in group order.
    pub values: Vec<f64>,
}

/// Grouped bar chart: one group per category (x axis), one bar per series inside each group,
/// coloured by series, with a legend (e.g. each expert's share of the requests, per policy).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[BarSeries],
) -> Result<(), PlotError> {
    if groups.is_empty() || series.is_empty() {
        return Err(empty(path, "no groups or no series"));
    }
    let max_chars = groups.iter().map(|g| g.chars().count()).max().unwrap_or(0) as u32;
    let slot = (max_chars * 7 + 16).max(30 * series.len() as u32 + 20);
    let legend_chars = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let legend_w = legend_chars * 8 + 50;
    let plot_w = (groups.len() as u32 * slot + 110).max(480);
    let top = y_top(
        series
            .iter()
            .flat_map(|s| s.values.iter().map(|v| (*v, 0.0))),
    );
    let root = SVGBackend::new(path, (plot_w + legend_w, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let body = root
        .titled(title, (FONT, 22))
        .map_err(|e| draw_err(path, e))?;
    let (plot_area, legend_area) = body.split_horizontally(plot_w);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(Categories(groups.to_vec()), 0.0..top)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(groups.len())
        .x_label_style((FONT, 12))
        .y_label_style((FONT, 13))
        .y_desc(y_label)
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    let area = chart.plotting_area();
    let width = 0.8 / series.len() as f64;
    for (k, s) in series.iter().enumerate() {
        for (i, v) in s.values.iter().enumerate().take(groups.len()) {
            if !v.is_finite() {
                continue;
            }
            let left = i as f64 - 0.4 + k as f64 * width;
            let rect = Rectangle::new(
                [(left, 0.0), (left + width * 0.9, v.clamp(0.0, top))],
                color(k).mix(0.85).filled(),
            );
            area.draw(&rect).map_err(|e| draw_err(path, e))?;
        }
    }
    for (k, s) in series.iter().enumerate() {
        let (x, y) = (10, 30 + 24 * k as i32);
        let entry = EmptyElement::at((x, y))
            + Rectangle::new([(0, -6), (20, 6)], color(k).mix(0.85).filled())
            + Text::new(
                s.name.clone(),
                (28, 0),
                TextStyle::from((FONT, 14)).pos(Pos::new(HPos::Left, VPos::Center)),
            );
        legend_area.draw(&entry).map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// One line (with point markers and ±std error bars) per policy over the sweep variable, with a legend.
pub fn sweep_curves(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[SweepCurve],
) -> Result<(), PlotError> {
    if curves.is_empty() {
        return Err(empty(path, "no curves"));
    }
    let xs = || {
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0))
            .filter(|x| x.is_finite())
    };
    let (Some(x_min), Some(x_max)) = (xs().reduce(f64::min), xs().reduce(f64::max)) else {
        return Err(empty(path, "no points with a finite x value"));
    };
    let span = x_max - x_min;
    let pad = if span > 0.0 {
        span * 0.04
    } else {
        x_min.abs().max(1.0) * 0.5
    };
    let top = y_top(
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| (p.1, p.2))),
    );

    // Legend lives in its own column to the right so it never hides data.
    let max_chars = curves
        .iter()
        .map(|c| c.policy.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let legend_w = max_chars * 8 + 60;
    let plot_w = 820;
    let root = SVGBackend::new(path, (plot_w + legend_w, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let body = root
        .titled(title, (FONT, 22))
        .map_err(|e| draw_err(path, e))?;
    let (plot_area, legend_area) = body.split_horizontally(plot_w);

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min - pad..x_max + pad, 0.0..top)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    let finite = |p: &&(f64, f64, f64)| p.0.is_finite() && p.1.is_finite();
    for (i, curve) in curves.iter().enumerate() {
        let c = color(i);
        // Break the line wherever a point is missing (NaN).
        for segment in curve
            .points
            .split(|p| !(p.0.is_finite() && p.1.is_finite()))
        {
            let pts = segment.iter().map(|p| (p.0, p.1.clamp(0.0, top)));
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|e| draw_err(path, e))?;
        }
        for p in curve.points.iter().filter(finite) {
            error_bar(
                chart.plotting_area(),
                p.0,
                whisker(p.1, p.2, top),
                4,
                c.stroke_width(1),
            )
            .map_err(|e| draw_err(path, e))?;
        }
        let markers = curve
            .points
            .iter()
            .filter(finite)
            .map(|p| (p.0, p.1.clamp(0.0, top)));
        chart
            .draw_series(PointSeries::of_element(
                markers,
                4,
                c.filled(),
                &|pos, size, style| EmptyElement::at(pos) + Circle::new((0, 0), size, style),
            ))
            .map_err(|e| draw_err(path, e))?;
    }

    // Legend: a short line with a marker, then the policy name, one row per curve.
    for (i, curve) in curves.iter().enumerate() {
        let (x, y) = (10, 30 + 24 * i as i32);
        let c = color(i);
        let entry = EmptyElement::at((x, y))
            + PathElement::new(vec![(0, 0), (28, 0)], c.stroke_width(2))
            + Circle::new((14, 0), 4, c.filled())
            + Text::new(
                curve.policy.clone(),
                (36, 0),
                TextStyle::from((FONT, 14)).pos(Pos::new(HPos::Left, VPos::Center)),
            );
        legend_area.draw(&entry).map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// One group of points of a scatter plot, shown in the legend.
#[derive(Debug, Clone)]
pub struct ScatterSeries {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Predicted (y) against measured (x) on equal axes from 0, with the line y = x: points above
/// it are over-predicted, below it under-predicted.
pub fn scatter_predicted_measured(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[ScatterSeries],
) -> Result<(), PlotError> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).flat_map(|p| [p.0, p.1]))
        .reduce(f64::max)
        .ok_or_else(|| empty(path, "no finite points"))?;
    let top = if top > 0.0 { top * 1.08 } else { 1.0 };
    let max_chars = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let legend_w = max_chars * 8 + 60;
    let plot_w = 620;
    let root = SVGBackend::new(path, (plot_w + legend_w, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let body = root
        .titled(title, (FONT, 20))
        .map_err(|e| draw_err(path, e))?;
    let (plot_area, legend_area) = body.split_horizontally(plot_w);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..top, 0.0..top)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (top, top)],
            fp::GREY_500.stroke_width(1),
        ))
        .map_err(|e| draw_err(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(PointSeries::of_element(
                s.points.iter().filter(finite).copied(),
                4,
                c.filled(),
                &|pos, size, style| EmptyElement::at(pos) + Circle::new((0, 0), size, style),
            ))
            .map_err(|e| draw_err(path, e))?;
    }
    for (i, s) in series.iter().enumerate() {
        let (x, y) = (10, 30 + 24 * i as i32);
        let entry = EmptyElement::at((x, y))
            + Circle::new((14, 0), 4, color(i).filled())
            + Text::new(
                s.label.clone(),
                (36, 0),
                TextStyle::from((FONT, 14)).pos(Pos::new(HPos::Left, VPos::Center)),
            );
        legend_area.draw(&entry).map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn out_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("qosroute-plot-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const POLICIES: [&str; 8] = [
        "latency-greedy",
        "quality-greedy",
        "round-robin",
        "random",
        "cost-aware",
        "qos-lagrangian",
        "least-loaded",
        "oracle",
    ];

    fn bars() -> Vec<PolicyBar> {
        POLICIES
            .iter()
            .enumerate()
            .map(|(i, p)| PolicyBar {
                policy: p.to_string(),
                mean: 0.5 + i as f64 * 0.37,
                std: 0.05 * i as f64,
            })
            .collect()
    }

    fn curves() -> Vec<SweepCurve> {
        POLICIES[..5]
            .iter()
            .enumerate()
            .map(|(i, p)| SweepCurve {
                policy: p.to_string(),
                points: (1..=6)
                    .map(|k| (k as f64 * 0.25, (k * (i + 1)) as f64 * 10.0, 2.0 + k as f64))
                    .collect(),
            })
            .collect()
    }

    fn check(path: &Path, names: &[&str]) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..40.min(text.len())]);
        for n in names {
            assert!(text.contains(n), "missing {n}");
        }
        bytes
    }

    #[test]
    fn bars_render_deterministically() {
        let dir = out_dir("bars");
        let (a, b) = (dir.join("a.svg"), dir.join("b.svg"));
        policy_bars(&a, "Mean latency", "latency (s)", &bars()).unwrap();
        policy_bars(&b, "Mean latency", "latency (s)", &bars()).unwrap();
        assert_eq!(check(&a, &POLICIES), check(&b, &POLICIES));
    }

    #[test]
    fn curves_render_deterministically() {
        let dir = out_dir("curves");
        let (a, b) = (dir.join("a.svg"), dir.join("b.svg"));
        sweep_curves(
            &a,
            "Latency vs load",
            "load (req/s)",
            "p95 latency (s)",
            &curves(),
        )
        .unwrap();
        sweep_curves(
            &b,
            "Latency vs load",
            "load (req/s)",
            "p95 latency (s)",
            &curves(),
        )
        .unwrap();
        assert_eq!(check(&a, &POLICIES[..5]), check(&b, &POLICIES[..5]));
    }

    #[test]
    fn grouped_bars_render_deterministically() {
        let dir = out_dir("grouped");
        let groups: Vec<String> = ["rtx4090-gemma2-9b", "l4-qwen25-7b-awq", "orin-nano"]
            .map(String::from)
            .to_vec();
        let series = vec![
            BarSeries {
                name: "han".into(),
                values: vec![0.2, 0.5, f64::NAN],
            },
            BarSeries {
                name: "qos-greedy".into(),
                values: vec![0.3, 0.4, 0.3],
            },
        ];
        let (a, b) = (dir.join("a.svg"), dir.join("b.svg"));
        grouped_bars(&a, "Share", "share", &groups, &series).unwrap();
        grouped_bars(&b, "Share", "share", &groups, &series).unwrap();
        assert_eq!(
            check(&a, &["han", "qos-greedy", "l4-qwen25-7b-awq"]),
            check(&b, &["han"])
        );
        assert!(matches!(
            grouped_bars(&dir.join("e.svg"), "t", "y", &[], &series),
            Err(PlotError::Empty { .. })
        ));
    }

    #[test]
    fn nan_and_zero_values_and_empty_input() {
        let dir = out_dir("edge");
        let nan_bars = vec![
            PolicyBar {
                policy: "ok".into(),
                mean: 1.0,
                std: f64::NAN,
            },
            PolicyBar {
                policy: "none".into(),
                mean: f64::NAN,
                std: f64::NAN,
            },
        ];
        policy_bars(&dir.join("nan_bars.svg"), "t", "y", &nan_bars).unwrap();
        let zero_bars = vec![PolicyBar {
            policy: "zero".into(),
            mean: 0.0,
            std: 0.0,
        }];
        policy_bars(&dir.join("zero_bars.svg"), "t", "y", &zero_bars).unwrap();

        let nan_curves = vec![
            SweepCurve {
                policy: "gappy".into(),
                points: vec![
                    (1.0, 2.0, 0.1),
                    (2.0, f64::NAN, f64::NAN),
                    (3.0, 4.0, f64::NAN),
                ],
            },
            SweepCurve {
                policy: "all-nan".into(),
                points: vec![(1.0, f64::NAN, f64::NAN)],
            },
            SweepCurve {
                policy: "no-points".into(),
                points: vec![],
            },
        ];
        sweep_curves(&dir.join("nan_curves.svg"), "t", "x", "y", &nan_curves).unwrap();
        let zero_curves = vec![SweepCurve {
            policy: "zero".into(),
            points: vec![(5.0, 0.0, 0.0)],
        }];
        sweep_curves(&dir.join("zero_curves.svg"), "t", "x", "y", &zero_curves).unwrap();

        assert!(matches!(
            policy_bars(&dir.join("e.svg"), "t", "y", &[]),
            Err(PlotError::Empty { .. })
        ));
        assert!(matches!(
            sweep_curves(&dir.join("e.svg"), "t", "x", "y", &[]),
            Err(PlotError::Empty { .. })
        ));
        let missing = dir.join("no-such-dir").join("x.svg");
        assert!(matches!(
            policy_bars(&missing, "t", "y", &zero_bars),
            Err(PlotError::Draw { .. })
        ));
    }
}
