//! Minimal SVG line and scatter charts with error bars, for self-contained reports.
//!
//! Hand-written rather than `plotters`: plotters' SVG backend needs a font
//! library (`ttf`/`font-kit`) to lay out text, which this project does not want
//! to depend on; SVG `<text>` needs no font metrics.
//!
//! Axes are linear or log10 (`Chart::x_log`, `Chart::y_log`); on a log axis values
//! ≤ 0 are not drawn. Dashed reference lines (`Chart::hlines`, `Chart::vlines`)
//! mark levels such as chance.

use std::fmt::Write;

/// One line of a chart: (x, y, ± y error) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, Option<f64>)>,
    /// Join the points with a line (false: a scatter).
    pub line: bool,
}

/// A point with error bars on both axes (± x_err horizontally, ± y_err vertically).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XyPoint {
    pub x: f64,
    pub y: f64,
    pub x_err: Option<f64>,
    pub y_err: Option<f64>,
}

/// A series whose points carry errors in x as well as in y (e.g. one point per λ
/// with the spread over seeds of both measures). Drawn like a [`Series`]; listed
/// in the legend after the chart's `series`.
#[derive(Debug, Clone)]
pub struct XySeries {
    pub name: String,
    pub points: Vec<XyPoint>,
    /// Join the points with a line (false: a scatter).
    pub line: bool,
}

impl From<&Series> for XySeries {
    fn from(s: &Series) -> Self {
        XySeries {
            name: s.name.clone(),
            points: s
                .points
                .iter()
                .map(|&(x, y, y_err)| XyPoint {
                    x,
                    y,
                    x_err: None,
                    y_err,
                })
                .collect(),
            line: s.line,
        }
    }
}

/// A line or scatter chart.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Fixed x tick positions and labels (categorical axes); auto when None. On a
    /// log x axis, fixed ticks at ≤ 0 are skipped.
    pub x_ticks: Option<Vec<(f64, String)>>,
    pub series: Vec<Series>,
    /// Series with horizontal error bars too; drawn after `series`.
    pub xy_series: Vec<XySeries>,
    /// log10 x axis: ticks at powers of ten, values ≤ 0 skipped.
    pub x_log: bool,
    /// log10 y axis: ticks at powers of ten, values ≤ 0 skipped, error bars clipped
    /// at the bottom of the plot where they would reach ≤ 0.
    pub y_log: bool,
    /// Dashed horizontal reference lines (y, label), e.g. a chance level. The y
    /// range is widened to include them.
    pub hlines: Vec<(f64, String)>,
    /// Dashed vertical reference lines (x, label); the x range includes them.
    pub vlines: Vec<(f64, String)>,
    pub width: f64,
    pub height: f64,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Colour of reference lines and their labels.
const REFERENCE_COLOUR: &str = "#777";

/// Escape text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut t = Vec::new();
    let mut v = start;
    while v <= hi + step * 1e-9 {
        t.push(v);
        v += step;
    }
    t
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Ticks of a log10 axis spanning 10^lo..10^hi: the powers of ten, labelled 1e-4,
/// 1e-3, …, 1, 10, 100, 1000, 1e4, … (every n-th power when the span is wide). Where fewer than two powers
/// fall in the span (always so under one decade) the 2 and 5 multiples are added
/// (2e-4, 5e-4); spans too short even for those get linear ticks.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let every = ((hi - lo) / 8.0).ceil().max(1.0) as i32;
    let mut ticks = log_ticks_with(lo, hi, &[1], every);
    if ticks.len() < 2 {
        ticks = log_ticks_with(lo, hi, &[1, 2, 5], 1);
    }
    if ticks.len() < 2 {
        ticks = nice_ticks(10f64.powf(lo), 10f64.powf(hi), 4)
            .into_iter()
            .filter(|v| *v > 0.0)
            .map(|v| (v, fmt_tick(v)))
            .collect();
    }
    ticks
}

/// m·10^k written 1e-4, 2e-4, …, but as a plain integer from 1 to 5000 (1, 20, 500).
fn log_tick_label(m: u8, k: i32) -> String {
    if (0..=3).contains(&k) {
        (u32::from(m) * 10u32.pow(k as u32)).to_string()
    } else {
        format!("{m}e{k}")
    }
}

/// The ticks m·10^k (m in `multiples`, k a multiple of `every`) within 10^lo..10^hi.
fn log_ticks_with(lo: f64, hi: f64, multiples: &[u8], every: i32) -> Vec<(f64, String)> {
    const EPS: f64 = 1e-9;
    let mut ticks = Vec::new();
    for k in (lo.floor() as i32)..=(hi.floor() as i32) {
        if k.rem_euclid(every) != 0 {
            continue;
        }
        for &m in multiples {
            let at = k as f64 + f64::from(m).log10();
            if at >= lo - EPS && at <= hi + EPS {
                ticks.push((f64::from(m) * 10f64.powi(k), log_tick_label(m, k)));
            }
        }
    }
    ticks
}

/// A value in axis units (log10 on a log axis); None where it cannot be drawn.
fn to_axis(v: f64, log: bool) -> Option<f64> {
    match (v.is_finite(), log) {
        (false, _) => None,
        (true, true) if v <= 0.0 => None,
        (true, true) => Some(v.log10()),
        (true, false) => Some(v),
    }
}

/// The mapping of one axis's data range onto [0, 1]; `lo`/`hi` in axis units.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Scale {
    /// Fits the drawable values, widened by `pad` of the span on each side. A single
    /// value gets ± `flat_half(v)` (linear) or ± half a decade (log). None when no
    /// value is drawable.
    fn fit(
        values: impl IntoIterator<Item = f64>,
        log: bool,
        pad: f64,
        flat_half: impl Fn(f64) -> f64,
    ) -> Option<Scale> {
        let (mut lo, mut hi) = values
            .into_iter()
            .filter_map(|v| to_axis(v, log))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        if lo > hi {
            return None;
        }
        if hi <= lo {
            let half = if log { 0.5 } else { flat_half(lo) };
            (lo, hi) = (lo - half, hi + half);
        }
        let p = (hi - lo) * pad;
        Some(Scale {
            lo: lo - p,
            hi: hi + p,
            log,
        })
    }

    /// Position of `v` as a fraction of the axis; None where it cannot be drawn.
    fn frac(&self, v: f64) -> Option<f64> {
        to_axis(v, self.log).map(|a| (a - self.lo) / (self.hi - self.lo))
    }

    /// Position of an error-bar end, clipped to the axis: an end at ≤ 0 on a log
    /// axis goes to the axis' low edge.
    fn frac_clipped(&self, v: f64) -> Option<f64> {
        if self.log && v <= 0.0 && v.is_finite() {
            return Some(0.0);
        }
        self.frac(v).map(|f| f.clamp(0.0, 1.0))
    }

    fn ticks(&self, n: usize) -> Vec<(f64, String)> {
        if self.log {
            log_ticks(self.lo, self.hi)
        } else {
            nice_ticks(self.lo, self.hi, n)
                .into_iter()
                .map(|v| (v, fmt_tick(v)))
                .collect()
        }
    }
}

/// The plot area in pixels and the scales of its two axes.
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: Scale,
    y: Scale,
}

impl Frame {
    fn px(&self, x: f64) -> Option<f64> {
        self.x.frac(x).map(|f| self.left + f * self.width)
    }
    fn py(&self, y: f64) -> Option<f64> {
        self.y.frac(y).map(|f| self.top + (1.0 - f) * self.height)
    }
    fn bottom(&self) -> f64 {
        self.top + self.height
    }
    fn right(&self) -> f64 {
        self.left + self.width
    }

    /// Horizontal grid lines with the y tick labels.
    fn write_y_ticks(&self, out: &mut String) {
        for (v, label) in self.y.ticks(5) {
            let Some(y) = self.py(v) else { continue };
            let _ = write!(
                out,
                r##"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                self.left,
                self.right(),
                self.left - 5.0,
                y + 4.0,
                esc(&label)
            );
        }
    }

    /// Tick marks and labels on the x axis: `fixed` when given, else automatic.
    fn write_x_ticks(&self, out: &mut String, fixed: Option<&Vec<(f64, String)>>) {
        let ticks = fixed.cloned().unwrap_or_else(|| self.x.ticks(6));
        for (v, label) in ticks {
            let Some(x) = self.px(v) else { continue };
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#444"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                self.bottom(),
                self.bottom() + 4.0,
                self.bottom() + 16.0,
                esc(&label)
            );
        }
    }

    /// Dashed reference lines with their labels (skipped where not drawable).
    fn write_reference_lines(
        &self,
        out: &mut String,
        hlines: &[(f64, String)],
        vlines: &[(f64, String)],
    ) {
        let c = REFERENCE_COLOUR;
        for (v, label) in hlines {
            let Some(y) = self.py(*v) else { continue };
            let _ = write!(
                out,
                r#"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{c}" stroke-dasharray="5,4"/><text x="{}" y="{:.1}" text-anchor="end" fill="{c}" font-size="10">{}</text>"#,
                self.left,
                self.right(),
                self.right() - 4.0,
                y - 3.0,
                esc(label)
            );
        }
        for (v, label) in vlines {
            let Some(x) = self.px(*v) else { continue };
            let _ = write!(
                out,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="{c}" stroke-dasharray="5,4"/><text x="{:.1}" y="{}" fill="{c}" font-size="10">{}</text>"#,
                self.top,
                self.bottom(),
                x + 3.0,
                self.top + 10.0,
                esc(label)
            );
        }
    }

    /// Error bars of one point (with end caps), ends clipped to the plot.
    fn write_error_bars(&self, out: &mut String, p: &XyPoint, (x, y): (f64, f64), c: &str) {
        let valid = |e: Option<f64>| e.filter(|e| *e > 0.0 && e.is_finite());
        if let Some(e) = valid(p.y_err) {
            let end = |v: f64| {
                self.y
                    .frac_clipped(v)
                    .map(|f| self.top + (1.0 - f) * self.height)
            };
            if let (Some(ya), Some(yb)) = (end(p.y - e), end(p.y + e)) {
                let _ = write!(
                    out,
                    r#"<line x1="{x:.1}" x2="{x:.1}" y1="{ya:.1}" y2="{yb:.1}" stroke="{c}"/><line x1="{:.1}" x2="{:.1}" y1="{ya:.1}" y2="{ya:.1}" stroke="{c}"/><line x1="{:.1}" x2="{:.1}" y1="{yb:.1}" y2="{yb:.1}" stroke="{c}"/>"#,
                    x - 3.0,
                    x + 3.0,
                    x - 3.0,
                    x + 3.0
                );
            }
        }
        if let Some(e) = valid(p.x_err) {
            let end = |v: f64| self.x.frac_clipped(v).map(|f| self.left + f * self.width);
            if let (Some(xa), Some(xb)) = (end(p.x - e), end(p.x + e)) {
                let _ = write!(
                    out,
                    r#"<line x1="{xa:.1}" x2="{xb:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{c}"/><line x1="{xa:.1}" x2="{xa:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}"/><line x1="{xb:.1}" x2="{xb:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}"/>"#,
                    y - 3.0,
                    y + 3.0,
                    y - 3.0,
                    y + 3.0
                );
            }
        }
    }

    /// One series: its line, error bars, markers and legend entry (`index` picks
    /// the colour and the legend row).
    fn write_series(&self, out: &mut String, s: &XySeries, index: usize) {
        let c = PALETTE[index % PALETTE.len()];
        let drawn: Vec<(&XyPoint, (f64, f64))> = s
            .points
            .iter()
            .filter_map(|p| Some((p, (self.px(p.x)?, self.py(p.y)?))))
            .collect();
        if drawn.len() > 1 && s.line {
            let d: Vec<String> = drawn
                .iter()
                .map(|(_, (x, y))| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{}"/>"#,
                d.join(" ")
            );
        }
        for (p, (x, y)) in &drawn {
            self.write_error_bars(out, p, (*x, *y), c);
            if drawn.len() <= 40 || !s.line {
                let _ = write!(
                    out,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.6" fill="{c}"/>"#
                );
            }
        }
        let ly = self.top + 12.0 + 16.0 * index as f64;
        let _ = write!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            self.right() + 10.0,
            self.right() + 28.0,
            self.right() + 32.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
}

impl Chart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_ticks: None,
            series: vec![],
            xy_series: vec![],
            x_log: false,
            y_log: false,
            hlines: vec![],
            vlines: vec![],
            width: 520.0,
            height: 320.0,
        }
    }

    /// All series in drawing (and legend) order.
    fn all_series(&self) -> Vec<XySeries> {
        let mut all: Vec<XySeries> = self.series.iter().map(XySeries::from).collect();
        all.extend(self.xy_series.iter().cloned());
        all
    }

    /// The axis scales fitting the drawable points, their error bars and the
    /// reference lines; None when no point can be drawn.
    fn fit_scales(&self, series: &[XySeries]) -> Option<(Scale, Scale)> {
        let drawable: Vec<&XyPoint> = series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|p| to_axis(p.x, self.x_log).is_some() && to_axis(p.y, self.y_log).is_some())
            .collect();
        if drawable.is_empty() {
            return None;
        }
        let with_err = |v: f64, e: Option<f64>| {
            let e = e.filter(|e| e.is_finite()).unwrap_or(0.0);
            [v, v - e, v + e]
        };
        let xs = drawable.iter().flat_map(|p| with_err(p.x, p.x_err));
        let xs = xs.chain(self.vlines.iter().map(|l| l.0));
        let ys = drawable.iter().flat_map(|p| with_err(p.y, p.y_err));
        let ys = ys.chain(self.hlines.iter().map(|l| l.0));
        let x = Scale::fit(xs, self.x_log, 0.04, |_| 0.5)?;
        let y = Scale::fit(ys, self.y_log, 0.08, |v| {
            if v == 0.0 {
                1.0
            } else {
                v.abs() * 0.1
            }
        })?;
        Some((x, y))
    }

    /// Render as an `<svg>` element.
    pub fn svg(&self) -> String {
        let (w, h) = (self.width, self.height);
        let (ml, mr, mt, mb) = (70.0, 130.0, 30.0, 45.0);
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="18" font-size="13" font-weight="bold">{}</text>"#,
            ml,
            esc(&self.title)
        );
        let series = self.all_series();
        let Some((x, y)) = self.fit_scales(&series) else {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}">no data</text></svg>"#,
                ml + 10.0,
                mt + ph / 2.0
            );
            return out;
        };
        let frame = Frame {
            left: ml,
            top: mt,
            width: pw,
            height: ph,
            x,
            y,
        };
        let _ = write!(
            out,
            r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        frame.write_y_ticks(&mut out);
        frame.write_x_ticks(&mut out, self.x_ticks.as_ref());
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            ml + pw / 2.0,
            h - 8.0,
            esc(&self.x_label)
        );
        let _ = write!(
            out,
            r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
            mt + ph / 2.0,
            mt + ph / 2.0,
            esc(&self.y_label)
        );
        frame.write_reference_lines(&mut out, &self.hlines, &self.vlines);
        for (i, s) in series.iter().enumerate() {
            frame.write_series(&mut out, s, i);
        }
        out.push_str("</svg>");
        out
    }
}

/// An E×E heatmap of values in [lo, hi] (null cells grey), with the values written in.
#[allow(clippy::needless_range_loop)]
pub fn heatmap(title: &str, m: &[Vec<Option<f64>>], lo: f64, hi: f64) -> String {
    let e = m.len();
    let cell = 34.0;
    let (ml, mt) = (30.0, 34.0);
    let (w, h) = (ml + cell * e as f64 + 10.0, mt + cell * e as f64 + 10.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="9"><text x="4" y="14" font-size="11" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for i in 0..e {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{i}</text>"#,
            ml + cell * (i as f64 + 0.5),
            mt - 4.0
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{i}</text>"#,
            ml - 4.0,
            mt + cell * (i as f64 + 0.6)
        );
        for j in 0..e {
            let (x, y) = (ml + cell * j as f64, mt + cell * i as f64);
            let (fill, label) = match m[i].get(j).copied().flatten() {
                Some(v) => {
                    let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
                    // white (lo) to dark red (hi)
                    let g = (255.0 * (1.0 - t)) as u8;
                    let r = (255.0 - 80.0 * t) as u8;
                    (format!("rgb({r},{g},{g})"), format!("{v:.2}"))
                }
                None => ("#e0e0e0".to_string(), String::new()),
            };
            let _ = write!(
                out,
                r#"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="white"/><text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
                x + cell / 2.0,
                y + cell / 2.0 + 3.0
            );
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_renders_points_error_bars_and_escapes() {
        let mut c = Chart::new("a < b", "x", "y");
        c.series.push(Series {
            name: "s&1".into(),
            points: vec![(0.0, 1.0, Some(0.1)), (1.0, 2.0, None)],
            line: true,
        });
        let s = c.svg();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("a &lt; b") && s.contains("s&amp;1") && s.contains("<polyline"));
        assert_eq!(s.matches("<circle").count(), 2);
        assert!(Chart::new("e", "x", "y").svg().contains("no data"));
    }
    /// The tick labels of a chart: the text of every `<text … text-anchor="end">`
    /// (y ticks) or `"middle"` (x ticks and the x label).
    fn texts(svg: &str, anchor: &str) -> Vec<String> {
        let open = format!(r#"text-anchor="{anchor}">"#);
        svg.split(&open)
            .skip(1)
            .map(|rest| rest.split("</text>").next().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn log_y_axis_ticks_at_powers_of_ten() {
        let mut c = Chart::new("log", "λ", "MSO");
        c.y_log = true;
        let ys = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];
        c.series.push(Series {
            name: "s".into(),
            points: ys
                .iter()
                .enumerate()
                .map(|(i, y)| (i as f64, *y, Some(y * 0.5)))
                .collect(),
            line: true,
        });
        let s = c.svg();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
        let y_ticks = texts(&s, "end");
        let want: Vec<String> = (-6..=-1).map(|k| format!("1e{k}")).collect();
        assert_eq!(y_ticks, want, "{s}");
        assert_eq!(s.matches("<circle").count(), 6);
    }

    #[test]
    fn log_axis_skips_non_positive_values_and_clips_error_bars() {
        let mut c = Chart::new("log x", "weight MSO", "act MSO");
        c.x_log = true;
        c.xy_series.push(XySeries {
            name: "λ".into(),
            points: vec![
                XyPoint {
                    x: 0.0,
                    y: 0.3,
                    x_err: None,
                    y_err: None,
                },
                XyPoint {
                    x: -1e-3,
                    y: 0.3,
                    x_err: None,
                    y_err: None,
                },
                XyPoint {
                    x: 1e-4,
                    y: 0.3,
                    x_err: Some(5e-4),
                    y_err: Some(0.05),
                },
                XyPoint {
                    x: 1e-2,
                    y: 0.5,
                    x_err: Some(1e-3),
                    y_err: None,
                },
                XyPoint {
                    x: f64::NAN,
                    y: 0.5,
                    x_err: None,
                    y_err: None,
                },
            ],
            line: false,
        });
        let s = c.svg();
        assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
        assert_eq!(
            s.matches("<circle").count(),
            2,
            "only the positive x are drawn"
        );
        // x error bar of the point at 1e-4 reaches below 0: clipped to the left edge (x = 70).
        assert!(s.contains(r#"x1="70.0""#), "{s}");
        let x_ticks = texts(&s, "middle");
        for k in -4..=-2 {
            assert!(x_ticks.contains(&format!("1e{k}")), "{x_ticks:?}");
        }
        // A log axis with nothing positive on it has no data.
        let mut empty = Chart::new("e", "x", "y");
        empty.y_log = true;
        empty.series.push(Series {
            name: "z".into(),
            points: vec![(1.0, 0.0, None), (2.0, -1.0, None)],
            line: true,
        });
        assert!(empty.svg().contains("no data"));
    }

    #[test]
    fn log_axis_under_one_decade_adds_2_and_5_multiples() {
        let labels = |lo: f64, hi: f64| {
            log_ticks(lo, hi)
                .into_iter()
                .map(|t| t.1)
                .collect::<Vec<_>>()
        };
        // 1.26e-4 .. 7.9e-4: under one decade, no power of ten inside.
        assert_eq!(labels(-3.9, -3.1), ["2e-4", "5e-4"]);
        // 1.2 decades holding one power of ten: the multiples are added too.
        assert_eq!(labels(-3.4, -2.2), ["5e-4", "1e-3", "2e-3", "5e-3"]);
        // From 1 to 5000 the labels are plain integers.
        assert_eq!(labels(2.6, 3.4), ["500", "1000", "2000"]);
        assert_eq!(labels(-1.0, 4.0), ["1e-1", "1", "10", "100", "1000", "1e4"]);
        // Wide spans thin to every n-th power of ten.
        assert_eq!(log_ticks(-20.0, 0.0).len(), 7);
        // Too narrow for two 1-2-5 ticks: linear ticks, still positive and finite.
        let t = log_ticks(0.31, 0.39);
        assert!(
            t.len() >= 2 && t.iter().all(|(v, _)| *v > 0.0 && v.is_finite()),
            "{t:?}"
        );
    }

    #[test]
    fn reference_lines_are_dashed_labelled_and_in_range() {
        let mut c = Chart::new("chance", "λ", "MSO");
        c.y_log = true;
        c.series.push(Series {
            name: "up".into(),
            points: vec![(0.0, 1e-3, None), (1.0, 2e-2, None)],
            line: true,
        });
        c.hlines.push((3.8e-6, "chance 1/P".into()));
        c.hlines.push((-1.0, "not drawable on a log axis".into()));
        c.vlines.push((0.5, "v & w".into()));
        let s = c.svg();
        assert_eq!(s.matches("stroke-dasharray").count(), 2, "{s}");
        assert!(s.contains("chance 1/P") && s.contains("v &amp; w"));
        assert!(!s.contains("not drawable"));
        // The y range reaches down to the chance line.
        assert!(texts(&s, "end").contains(&"1e-5".to_string()), "{s}");
        assert!(!s.contains("NaN"));
    }
}
