//! A PNG comparing runs: test accuracy against rounds and against cumulative traffic.
//!
//! Plotters' `ab_glyph` feature draws text with a font registered at run time, so no
//! system font library is linked. We load DejaVu Sans from the Debian package
//! `fonts-dejavu-core` once per process; a missing file is an error that names the package,
//! never a chart silently drawn without labels.

use std::fs;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};
use plotters::coord::Shift;
use plotters::coord::combinators::{BindKeyPoints, IntoLogRange};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::RunHistory;

/// The regular font every label is drawn with.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The Debian package that provides [`FONT_PATH`], named in the error when it is missing.
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// The bold face from the same package, used for titles when present.
const BOLD_FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
/// The family name plotters looks fonts up by; `("sans-serif", size)` styles resolve to it.
const FAMILY: &str = "sans-serif";

/// Image size: two charts side by side, each roughly 700 x 560 below the title.
const SIZE: (u32, u32) = (1400, 600);

/// Tableau 10, a palette chosen to stay distinguishable for most colour-blind readers;
/// runs beyond ten reuse colours in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws `runs` into one PNG at `path`: accuracy (%) per round on the left, accuracy
/// against cumulative up + down traffic (MB, log scale) on the right, one colour per run.
///
/// A log scale spreads out the early rounds, where strategies differ most in what they
/// pay per point of accuracy. Rounds with no traffic yet cannot sit on a log axis and are
/// left out of the right chart only.
pub fn plot_runs(path: &Path, runs: &[RunHistory], title: &str) -> anyhow::Result<()> {
    ensure_fonts()?;
    if runs.iter().all(|run| run.rounds.is_empty()) {
        bail!(
            "nothing to plot: none of the {} runs has a round",
            runs.len()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
    }
    draw(path, runs, title).with_context(|| format!("cannot draw {}", path.display()))
}

/// Lays out the title and both charts, then writes the file.
fn draw(path: &Path, runs: &[RunHistory], title: &str) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    // `FontDesc::style` keeps the regular face it was made from, so build the bold one anew.
    let title_font = FontDesc::new(FontFamily::Name(FAMILY), 24.0, FontStyle::Bold);
    let body = root.titled(title, title_font)?;
    let (left, right) = body.split_horizontally(SIZE.0 / 2);
    let y_range = 0.0..accuracy_ceiling(runs);

    let max_round = runs
        .iter()
        .flat_map(|r| &r.rounds)
        .map(|r| r.round)
        .max()
        .unwrap_or(1);
    let mut chart = chart_builder(&left, "Test accuracy per round")
        .build_cartesian_2d(0usize..max_round.max(1), y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("test accuracy (%)")
        .y_label_formatter(&|acc| format!("{acc:.0}"))
        .max_light_lines(1)
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<_> = run
            .rounds
            .iter()
            .map(|r| (r.round, r.accuracy * 100.0))
            .collect();
        chart.draw_series(markers(&points, colour))?;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(run.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 22, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .margin(12)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(190, 190, 190))
        .draw()?;

    let traffic = traffic_range(runs);
    let (bold, light) = log_ticks(&traffic);
    let x_axis = traffic
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light);
    let mut chart = chart_builder(&right, "Test accuracy against traffic")
        .build_cartesian_2d(x_axis, y_range)?;
    chart
        .configure_mesh()
        .x_desc("cumulative traffic, up + down (MB, log scale)")
        .y_desc("test accuracy (%)")
        .x_label_formatter(&|mb| format_mb(*mb))
        .y_label_formatter(&|acc| format!("{acc:.0}"))
        .y_max_light_lines(1)
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<_> = run
            .rounds
            .iter()
            .filter(|r| r.traffic_bytes() > 0)
            .map(|r| (r.traffic_mb(), r.accuracy * 100.0))
            .collect();
        chart.draw_series(markers(&points, colour))?;
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Dots on each point of a short run: a line alone hides a run of one point and makes a
/// few points look like measured curves. Long runs get no dots, which would only clutter.
fn markers<X: Copy, Y: Copy>(points: &[(X, Y)], colour: RGBColor) -> Vec<Circle<(X, Y), u32>> {
    const MAX_MARKED: usize = 20;
    if points.len() > MAX_MARKED {
        return Vec::new();
    }
    points
        .iter()
        .map(|&p| Circle::new(p, 3, colour.filled()))
        .collect()
}

/// A chart builder with the margins, caption and label areas both charts share.
fn chart_builder<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FAMILY, 19))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(62);
    builder
}

/// Top of the accuracy axis: the best accuracy rounded up to the next 10 %, so curves
/// fill the chart, but never above 100 % and never below 10 %.
fn accuracy_ceiling(runs: &[RunHistory]) -> f64 {
    let best = runs
        .iter()
        .flat_map(|r| &r.rounds)
        .map(|r| r.accuracy * 100.0)
        .filter(|a| a.is_finite())
        .fold(0.0, f64::max);
    ((best / 10.0).floor() * 10.0 + 10.0).clamp(10.0, 100.0)
}

/// The traffic axis in MB, padded a little on both sides; falls back to a decade around
/// whatever single value there is, since a log axis needs a non-empty positive range.
fn traffic_range(runs: &[RunHistory]) -> Range<f64> {
    let values = runs
        .iter()
        .flat_map(|r| &r.rounds)
        .filter(|r| r.traffic_bytes() > 0)
        .map(|r| r.traffic_mb());
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.1..10.0;
    }
    if hi / lo < 1.5 {
        return lo / 3.0..hi * 3.0;
    }
    lo / 1.15..hi * 1.15
}

/// Labelled and unlabelled ticks for a log axis over `range`: labels at 1, 2 and 5 times
/// each power of ten (only the powers when the range spans more than four decades, so
/// labels never crowd), light grid lines at every integer multiple of each power.
fn log_ticks(range: &Range<f64>) -> (Vec<f64>, Vec<f64>) {
    let (lo, hi) = (range.start, range.end);
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    let labelled: &[f64] = if last - first > 4 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    for exponent in first..=last {
        for multiple in 1..10 {
            // Dividing for negative exponents keeps 0.3 exactly 0.3, not 3 * 0.1.
            let value = if exponent < 0 {
                f64::from(multiple) / 10f64.powi(-exponent)
            } else {
                f64::from(multiple) * 10f64.powi(exponent)
            };
            if value < lo || value > hi {
                continue;
            }
            if labelled.contains(&f64::from(multiple)) {
                bold.push(value);
            } else {
                light.push(value);
            }
        }
    }
    (bold, light)
}

/// A traffic tick label with just the decimals a 1-2-5 tick needs ("0.05", "0.2", "20").
fn format_mb(mb: f64) -> String {
    let decimals = (-mb.log10().floor()).max(0.0) as usize;
    format!("{mb:.decimals$}")
}

/// Registers the fonts once per process; a failure is not cached, so installing the
/// package and retrying works without a restart.
fn ensure_fonts() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    if REGISTERED.get().is_none() {
        register_fonts(Path::new(FONT_PATH), Path::new(BOLD_FONT_PATH))?;
        let _ = REGISTERED.set(());
    }
    Ok(())
}

/// Registers `regular` (required) and `bold` (optional: titles fall back to regular).
///
/// Plotters keeps fonts as `&'static [u8]`, so the bytes are leaked on purpose; this
/// happens at most once per face per process, about 1 MB in all.
fn register_fonts(regular: &Path, bold: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(regular).map_err(|e| {
        anyhow!(
            "cannot read the plot font {} ({e}); install the Debian package {FONT_PACKAGE} \
             (apt-get install -y {FONT_PACKAGE})",
            regular.display()
        )
    })?;
    register(regular, FontStyle::Normal, bytes)?;
    if let Ok(bytes) = fs::read(bold) {
        register(bold, FontStyle::Bold, bytes)?;
    }
    Ok(())
}

/// Hands one face to plotters under [`FAMILY`].
fn register(path: &Path, style: FontStyle, bytes: Vec<u8>) -> anyhow::Result<()> {
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, style, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::run;

    #[test]
    fn plot_writes_a_non_empty_png() {
        // Prepare: two strategies, three seeds, one run without traffic in round 1.
        let mut runs = vec![
            run(
                "astraea seed 1",
                "astraea",
                1,
                &[0.2, 0.45, 0.6, 0.7, 0.74, 0.78],
            ),
            run(
                "astraea seed 2",
                "astraea",
                2,
                &[0.25, 0.4, 0.58, 0.69, 0.75, 0.77],
            ),
            run(
                "fedavg seed 1",
                "fedavg",
                1,
                &[0.15, 0.3, 0.41, 0.5, 0.55, 0.6],
            ),
        ];
        runs[2].rounds[0].bytes_up = 0;
        runs[2].rounds[0].bytes_down = 0;
        let path = std::env::temp_dir()
            .join(format!("astraea-report-{}", std::process::id()))
            .join("plot.png");

        // Execute: fails with the fonts-dejavu-core message if the font is absent.
        plot_runs(&path, &runs, "Astraea vs FedAvg (test)").unwrap();

        // Assert
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.len() > 10_000, "png is only {} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn missing_font_error_names_the_package() {
        let missing = Path::new("/nonexistent/DejaVuSans.ttf");

        let err = register_fonts(missing, missing).unwrap_err().to_string();

        assert!(
            err.contains(FONT_PACKAGE) && err.contains("/nonexistent"),
            "{err}"
        );
    }

    #[test]
    fn plot_refuses_runs_without_rounds() {
        let runs = [run("empty", "fedavg", 1, &[])];

        let err = plot_runs(Path::new("/tmp/never-written.png"), &runs, "t").unwrap_err();

        assert!(err.to_string().contains("nothing to plot"), "{err}");
    }

    #[test]
    fn axis_ranges_stay_valid_for_edge_cases() {
        let one_point = [run("a", "s", 1, &[0.93])];

        assert_eq!(accuracy_ceiling(&one_point), 100.0);
        assert_eq!(accuracy_ceiling(&[run("b", "s", 1, &[0.42])]), 50.0);
        let range = traffic_range(&one_point);
        assert!(
            range.start > 0.0 && range.start < 3.0 && range.end > 3.0,
            "{range:?}"
        );
    }

    #[test]
    fn log_ticks_label_one_two_five_and_format_without_noise() {
        let (bold, light) = log_ticks(&(0.15..60.0));

        let labels: Vec<String> = bold.iter().map(|&mb| format_mb(mb)).collect();
        assert_eq!(labels, ["0.2", "0.5", "1", "2", "5", "10", "20", "50"]);
        assert!(light.contains(&0.3) && light.contains(&30.0) && !light.contains(&70.0));
        assert_eq!(log_ticks(&(0.01..1e6)).0.len(), 9);
    }
}
