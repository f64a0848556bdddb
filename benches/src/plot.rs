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

/// One line: a name for the legend and its (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
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
        .map(|s| Series {
            name: s.name.clone(),
            points: s.points.iter().filter(|p| p.0 > 0.0 && p.1.is_finite()).map(|p| (p.0.log2(), p.1)).collect(),
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, v) in series.iter().flat_map(|s| s.points.iter()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(v);
        y1 = y1.max(v);
    }
    if x0 > x1 {
        return Err(anyhow!("nothing to plot"));
    }
    let xr = (x0 - 0.3)..(x1 + 0.3);
    match y {
        YAxis::Log => {
            let lo = (y0 / 2.0).max(f64::MIN_POSITIVE);
            draw(path, title, x_label, y_label, &series, xr, (lo..(y1 * 2.0)).log_scale())
        }
        YAxis::Linear => {
            let pad = ((y1 - y0) * 0.1).max(y1.abs() * 0.02).max(1e-9);
            // Rates and fractions are not negative: keep the axis from dipping below zero.
            let lo = if y0 >= 0.0 { (y0 - pad).max(0.0) } else { y0 - pad };
            draw(path, title, x_label, y_label, &series, xr, lo..(y1 + pad))
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
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
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
    fn a_plot_is_a_png_when_a_font_exists() {
        if font().is_err() {
            return; // nothing to draw text with on this machine: the caller reports it
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let s = [Series { name: "a".into(), points: vec![(64.0, 0.01), (256.0, 0.02)] }];
        lines(&path, "t", "x", "y", &s, YAxis::Log).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(lines(&path, "t", "x", "y", &[], YAxis::Linear).is_err(), "nothing to plot");
    }
}
