//! PNG line plots with plotters: one line per system, sizes on a log axis.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend takes the bytes instead of asking a
//! system font library, so the font is read at run time from the usual places (or
//! `$CKPTD_BENCH_FONT`). Without one there are no plots, and the caller says so: the JSON and
//! the markdown table carry the same numbers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::anyhow;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Places a sans-serif TrueType font usually is.
const FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// One line: a name for the legend, its (x, y) points (the medians), and for each point the
/// (lowest, highest) of its runs when known: drawn as a bar, so the spread is never hidden.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Empty, or one (min, max) per point.
    pub spread: Vec<(f64, f64)>,
}

impl Series {
    /// A line without spread (a model's output, one measurement).
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, spread: Vec::new() }
    }
}

/// How the y axis is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YAxis {
    Linear,
    Log,
}

/// Registers a font once; the error says where it looked.
pub fn font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut candidates: Vec<PathBuf> =
            std::env::var_os("CKPTD_BENCH_FONT").map(PathBuf::from).into_iter().collect();
        candidates.extend(FONTS.iter().map(PathBuf::from));
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps the font for the life of the process: leak it once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!("no TrueType font found (set CKPTD_BENCH_FONT; looked in {})", FONTS.join(", ")))
    })
    .clone()
}

/// Draws `series` to `path` (800×500 PNG). The x axis is log2 (sizes and rank counts double), drawn
/// as a linear axis over log2(x) with the labels written back as x: plotters' own log axis labels
/// only powers of ten, which a 64 MiB–1 GiB sweep may not contain.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y: YAxis,
) -> anyhow::Result<()> {
    font().map_err(|e| anyhow!(e))?;
    let series: Vec<Series> = series
        .iter()
        .map(|s| {
            let keep = |i: usize| s.points[i].0 > 0.0 && s.points[i].1.is_finite();
            let kept: Vec<usize> = (0..s.points.len()).filter(|&i| keep(i)).collect();
            Series {
                name: s.name.clone(),
                points: kept.iter().map(|&i| (s.points[i].0.log2(), s.points[i].1)).collect(),
                spread: if s.spread.len() == s.points.len() {
                    kept.iter().map(|&i| s.spread[i]).collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for s in &series {
        for &(x, v) in &s.points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(v), y1.max(v));
        }
        for &(lo, hi) in s.spread.iter().filter(|(lo, hi)| lo.is_finite() && hi.is_finite()) {
            (y0, y1) = (y0.min(lo), y1.max(hi));
        }
    }
    if x0 > x1 {
        return Err(anyhow!("nothing to plot"));
    }
    let xr = (x0 - 0.3)..(x1 + 0.3);
    let (lo, hi) = y_range(y, y0, y1, series.len());
    match y {
        YAxis::Log => draw(path, title, x_label, y_label, &series, xr, (lo..hi).log_scale()),
        YAxis::Linear => draw(path, title, x_label, y_label, &series, xr, lo..hi),
    }
}

/// The y axis for data from `y0` to `y1` under a legend of `lines` lines in the upper left.
/// Linear axes start at zero (rates, ratios and fractions here are never negative), so bars
/// compare by their length; both kinds leave the top part of the plot, where the legend sits,
/// free of data, so the legend hides no point.
fn y_range(axis: YAxis, y0: f64, y1: f64, lines: usize) -> (f64, f64) {
    // About 18 px per legend line and 20 px of frame, of a plot area about 400 px high.
    let legend = ((18 * lines + 20) as f64 / 400.0).clamp(0.15, 0.6);
    match axis {
        YAxis::Log => {
            let lo = (y0 / 2.0).max(f64::MIN_POSITIVE);
            let top = y1.max(lo * 2.0);
            let span = (top / lo).ln();
            (lo, (top.ln() + span * legend / (1.0 - legend)).exp())
        }
        YAxis::Linear => {
            let lo = y0.min(0.0);
            let top = if y1 > lo { y1 } else { lo + 1.0 };
            (lo, lo + (top - lo) / (1.0 - legend))
        }
    }
}

/// `2^v` as a label: whole numbers where they are whole.
fn pow2_label(v: &f64) -> String {
    let x = v.exp2();
    if (x - x.round()).abs() < 1e-6 * x.max(1.0) { format!("{x:.0}") } else { format!("{x:.3}") }
}

fn draw<Y>(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    xr: std::ops::Range<f64>,
    yr: Y,
) -> anyhow::Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let xr_span = xr.end - xr.start;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr, yr)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_labels(((xr_span.ceil() as usize) + 1).max(2))
        .x_label_formatter(&pow2_label)
        .light_line_style(WHITE)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = s.points.clone();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
        // Lowest to highest run at each point, with small caps.
        let cap = xr_span / 150.0;
        let bars = pts.iter().zip(&s.spread).flat_map(|(&(x, _), &(lo, hi))| {
            [
                PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(1)),
                PathElement::new(vec![(x - cap, lo), (x + cap, lo)], color.stroke_width(1)),
                PathElement::new(vec![(x - cap, hi), (x + cap, hi)], color.stroke_width(1)),
            ]
        });
        chart.draw_series(bars).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_back_as_sizes() {
        assert_eq!(pow2_label(&6.0), "64");
        assert_eq!(pow2_label(&10.0), "1024");
        assert_eq!(pow2_label(&0.0), "1");
        assert_eq!(pow2_label(&0.5), "1.414");
    }

    #[test]
    fn linear_axes_start_at_zero_and_leave_the_legend_room() {
        let (lo, hi) = y_range(YAxis::Linear, 0.9, 1.0, 4);
        assert_eq!(lo, 0.0, "a throughput or a goodput of 0.9-1.0 is drawn from zero");
        let legend = (18.0 * 4.0 + 20.0) / 400.0;
        assert!((hi - 1.0 / (1.0 - legend)).abs() < 1e-12, "the top {legend} is the legend's: {hi}");
        let (lo, hi) = y_range(YAxis::Log, 0.001, 10.0, 8);
        assert!(lo > 0.0 && lo <= 0.0005 && hi > 10.0 * 100.0, "{lo}..{hi}");
        assert_eq!(y_range(YAxis::Linear, 0.0, 0.0, 1), (0.0, 1.0 / (1.0 - 0.15)), "flat data still gets an axis");
    }

    #[test]
    fn a_plot_is_a_png_when_a_font_exists() {
        if font().is_err() {
            return; // nothing to draw text with on this machine: the caller reports it
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let s = [Series {
            name: "a".into(),
            points: vec![(64.0, 0.01), (256.0, 0.02)],
            spread: vec![(0.008, 0.012), (0.015, 0.03)],
        }];
        lines(&path, "t", "x", "y", &s, YAxis::Log).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(lines(&path, "t", "x", "y", &[], YAxis::Linear).is_err(), "nothing to plot");
    }
}
