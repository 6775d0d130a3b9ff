//! Pictures of a run: the loss plot from `metrics.jsonl` and the quality curve, drawn with
//! `plotters` into PNG files.

use crate::{Result, TrainError};
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans (its licence is in `assets/DejaVuSans-LICENSE.txt`), embedded so that plots have
/// text on machines without fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Picture size of each plot.
const SIZE: (u32, u32) = (1200, 800);

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font, checked by the tests; a failure only means
        // plots without text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(format!("cannot draw the plot: {e}"))
}

/// The rows of a `metrics.jsonl`, in order; a line that is not a JSON object names its number.
/// A cut last line (no newline: a crash while it was written, which the next resume trims) is
/// left out.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut rows = Vec::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(m)) => rows.push(m),
            _ if i + 1 == lines.len() && !raw.ends_with('\n') => {
                tracing::warn!("{}: ignoring a cut last line", path.display());
            }
            _ => {
                return Err(TrainError::Config(format!(
                    "{} line {}: not a metrics row (a JSON object)",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if rows.is_empty() {
        return Err(TrainError::Config(format!(
            "{} holds no metrics rows yet",
            path.display()
        )));
    }
    Ok(rows)
}

/// One named line: (x, y) points.
type Series = (String, Vec<(f64, f64)>);

fn series(rows: &[serde_json::Map<String, serde_json::Value>], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| {
            let x = r.get("step")?.as_f64()?;
            let y = r.get(key)?.as_f64()?;
            y.is_finite().then_some((x, y))
        })
        .collect()
}

/// Minutes of training at each metrics row, from the speeds it logged (each window of
/// `images_per_sec` includes the grids and checkpoints written in it).
pub fn minutes_at_rows(
    rows: &[serde_json::Map<String, serde_json::Value>],
    batch_size: usize,
) -> Vec<(u64, f64)> {
    let mut out = Vec::with_capacity(rows.len());
    let (mut last_step, mut minutes) = (0u64, 0.0f64);
    for r in rows {
        let (Some(step), Some(ips)) = (
            r.get("step").and_then(|v| v.as_u64()),
            r.get("images_per_sec").and_then(|v| v.as_f64()),
        ) else {
            continue;
        };
        if ips > 0.0 && step > last_step {
            minutes += (step - last_step) as f64 * batch_size as f64 / ips / 60.0;
        }
        last_step = step;
        out.push((step, minutes));
    }
    out
}

/// A tick label: plain for ordinary magnitudes, scientific (1e-5) for very small or large ones
/// (a log axis would otherwise print 9.999999e-5).
fn tick_label(y: f64) -> String {
    let a = y.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{y:.0e}")
    } else if a >= 10.0 {
        format!("{y:.0}")
    } else {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws one panel: lines over x, on a log y axis when `log_y`.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    lines: &[Series],
    log_y: bool,
    legend: SeriesLabelPosition,
) -> Result<()> {
    // Non-finite values (a diverged checkpoint's score) are left out.
    let lines: Vec<Series> = lines
        .iter()
        .map(|(n, p)| {
            (
                n.clone(),
                p.iter().copied().filter(|q| q.1.is_finite()).collect(),
            )
        })
        .collect();
    let lines = &lines[..];
    let pts = || lines.iter().flat_map(|(_, p)| p.iter());
    let (x0, x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let ys = || pts().map(|p| p.1).filter(|y| !log_y || *y > 0.0);
    let (y0, y1) = ys().fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if x0 > x1 || y0 > y1 {
        return Ok(());
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let colours = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| tick_label(*y))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
            for (k, (name, p)) in lines.iter().enumerate() {
                let c = colours[k % colours.len()];
                let kept: Vec<(f64, f64)> = p
                    .iter()
                    .copied()
                    .filter(|(_, y)| !log_y || *y > 0.0)
                    .collect();
                chart
                    .draw_series(LineSeries::new(kept, c.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            }
            if lines.len() > 1 {
                chart
                    .configure_series_labels()
                    .position(legend.clone())
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(plot_err)?;
            }
        }};
    }
    if log_y {
        let (lo, hi) = (y0 * 0.9, if y1 > y0 { y1 * 1.1 } else { y0 * 2.0 });
        draw!(builder
            .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
            .map_err(plot_err)?);
    } else {
        let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 1.0 };
        draw!(builder
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(plot_err)?);
    }
    Ok(())
}

/// Draws one chart of lines (name, points) over x, on a log y axis when `log_y`, as a PNG.
pub fn line_plot(
    title: &str,
    x_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
    out: &Path,
) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        panel(
            &root,
            title,
            x_label,
            lines,
            log_y,
            SeriesLabelPosition::LowerLeft,
        )?;
        root.present().map_err(plot_err)?;
    }
    save_rgb(buf, out)
}

fn save_rgb(buf: Vec<u8>, path: &Path) -> Result<()> {
    let img = image::RgbImage::from_raw(SIZE.0, SIZE.1, buf)
        .ok_or_else(|| plot_err("the picture buffer has the wrong size"))?;
    crate::grid::save_png_atomically(&image::DynamicImage::ImageRgb8(img), path)
}

/// Draws `loss.png`: loss, mse and vb; mse and vb per quarter of the schedule; and the learning
/// rate, each against the step.
pub fn loss_plot(rows: &[serde_json::Map<String, serde_json::Value>], out: &Path) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((2, 2));
        let named = |keys: &[&str]| -> Vec<Series> {
            keys.iter()
                .map(|k| (k.to_string(), series(rows, k)))
                .filter(|(_, p)| !p.is_empty())
                .collect()
        };
        let quarters = |what: &str| -> Vec<Series> {
            (0..4)
                .map(|q| {
                    let label = format!("t in quarter {}", q + 1);
                    (label, series(rows, &format!("{what}_q{q}")))
                })
                .filter(|(_, p)| !p.is_empty())
                .collect()
        };
        panel(
            &areas[0],
            "training loss",
            "step",
            &named(&["loss", "mse", "vb"]),
            true,
            SeriesLabelPosition::MiddleRight,
        )?;
        panel(
            &areas[1],
            "mse by timestep quarter",
            "step",
            &quarters("mse"),
            true,
            SeriesLabelPosition::MiddleRight,
        )?;
        panel(
            &areas[2],
            "vb by timestep quarter",
            "step",
            &quarters("vb"),
            true,
            SeriesLabelPosition::MiddleRight,
        )?;
        panel(
            &areas[3],
            "learning rate",
            "step",
            &named(&["lr"]),
            false,
            SeriesLabelPosition::MiddleRight,
        )?;
        root.present().map_err(plot_err)?;
    }
    save_rgb(buf, out)
}

/// One checkpoint's point of a quality curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QualityPoint {
    /// Training step of the checkpoint (non-finite scores are stored as null and read back as
    /// NaN, which the plot leaves out).
    pub step: u64,
    /// Minutes of training to reach it.
    pub minutes: f64,
    /// Samples scored (and real images in the floor).
    #[serde(default)]
    pub num: usize,
    /// Fréchet distance of its samples.
    #[serde(deserialize_with = "nan_if_null")]
    pub frechet_distance: f64,
    /// The real-data floor at the same n.
    #[serde(deserialize_with = "nan_if_null")]
    pub floor: f64,
    /// Fraction of samples classified with confidence above 0.9.
    #[serde(deserialize_with = "nan_if_null")]
    pub confident_fraction: f64,
    /// Bits per dimension on a test subset, when measured.
    pub bits_per_dim: Option<f64>,
}

/// JSON has no NaN: serde_json writes it as null, which reads back as NaN here.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Draws the quality curve: Fréchet distance (and the real-data floor) against minutes of
/// training, and the confident fraction.
pub fn quality_plot(points: &[QualityPoint], title: &str, out: &Path) -> Result<()> {
    register_font();
    if points.is_empty() {
        return Err(TrainError::Config(
            "no checkpoints to draw a curve of".into(),
        ));
    }
    let mut buf = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, bottom) = root.split_vertically(SIZE.1 * 3 / 5);
        let fd = points
            .iter()
            .map(|p| (p.minutes, p.frechet_distance))
            .collect();
        let floor = points.iter().map(|p| (p.minutes, p.floor)).collect();
        panel(
            &top,
            title,
            "minutes of training",
            &[
                ("Fréchet distance of the samples".into(), fd),
                ("real-data floor (same n)".into(), floor),
            ],
            true,
            SeriesLabelPosition::MiddleRight,
        )?;
        let conf = points
            .iter()
            .map(|p| (p.minutes, 100.0 * p.confident_fraction))
            .collect();
        panel(
            &bottom,
            "samples classified with confidence > 0.9 (%)",
            "minutes of training",
            &[("confident %".into(), conf)],
            false,
            SeriesLabelPosition::MiddleRight,
        )?;
        root.present().map_err(plot_err)?;
    }
    save_rgb(buf, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64) -> Vec<serde_json::Map<String, serde_json::Value>> {
        (1..=n)
            .map(|i| {
                let mut m = serde_json::Map::new();
                m.insert("step".into(), (i * 10).into());
                m.insert("images_per_sec".into(), 80.0.into());
                for (k, v) in [("loss", 1.0 / i as f64), ("mse", 0.8 / i as f64)] {
                    m.insert(k.into(), v.into());
                }
                m.insert("vb".into(), (0.2 / i as f64).into());
                for q in 0..4 {
                    m.insert(
                        format!("mse_q{q}"),
                        (0.1 * (q + 1) as f64 / i as f64).into(),
                    );
                    m.insert(format!("vb_q{q}"), (0.01 * (q + 1) as f64).into());
                }
                m.insert("lr".into(), (1e-3 * i as f64 / n as f64).into());
                m
            })
            .collect()
    }

    #[test]
    fn the_font_is_a_font() {
        assert!(plotters::style::register_font("ddpm-test", FontStyle::Normal, FONT).is_ok());
    }

    #[test]
    fn loss_and_quality_plots_are_pictures_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let loss = dir.path().join("loss.png");
        loss_plot(&rows(50), &loss).unwrap();
        let img = image::open(&loss).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        // Blue (the first line of each panel) and red (the second) are drawn.
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count([0, 0, 255]) > 500 && count([255, 0, 0]) > 500);
        let pts: Vec<QualityPoint> = (1..=4)
            .map(|i| QualityPoint {
                step: i * 500,
                minutes: i as f64 * 3.0,
                num: 1000,
                frechet_distance: 400.0 / i as f64,
                floor: 15.0,
                confident_fraction: 0.5 + 0.1 * i as f64,
                bits_per_dim: None,
            })
            .collect();
        let q = dir.path().join("quality.png");
        quality_plot(&pts, "test", &q).unwrap();
        assert_eq!(image::open(&q).unwrap().to_rgb8().dimensions(), SIZE);
        // A NaN score is written as null and read back as NaN; the plot leaves it out.
        let mut with_nan = pts.clone();
        with_nan[1].frechet_distance = f64::NAN;
        let back: Vec<QualityPoint> =
            serde_json::from_slice(&serde_json::to_vec(&with_nan).unwrap()).unwrap();
        assert!(back[1].frechet_distance.is_nan() && back[2] == pts[2]);
        quality_plot(&back, "test", &q).unwrap();
        assert!(quality_plot(&[], "x", &q).is_err());
    }

    #[test]
    fn metrics_are_read_and_timed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let text: String = rows(3)
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(&p, &text).unwrap();
        let read = read_metrics(&p).unwrap();
        assert_eq!(read.len(), 3);
        // 10 steps of 8 images at 80 images/s: a second each.
        let m = minutes_at_rows(&read, 8);
        assert_eq!(m.len(), 3);
        assert!((m[2].1 - 3.0 / 60.0).abs() < 1e-12, "{m:?}");
        std::fs::write(&p, text.clone() + "oops\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
        // A cut last line (a crash mid-write) is left out; a bad line before the last is not.
        std::fs::write(&p, text.clone() + "{\"step\": 4").unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 3);
        std::fs::write(&p, "{\"step\"\n".to_string() + &text).unwrap();
        assert!(read_metrics(&p).unwrap_err().to_string().contains("line 1"));
        std::fs::write(&p, "").unwrap();
        assert!(read_metrics(&p)
            .unwrap_err()
            .to_string()
            .contains("no metrics"));
        assert!(read_metrics(&dir.path().join("missing")).is_err());
    }
}
