//! Minimal SVG line charts with error bars, for self-contained reports.
//!
//! Hand-written rather than `plotters`: plotters' SVG backend needs a font
//! library (`ttf`/`font-kit`) to lay out text, which this project does not want
//! to depend on; SVG `<text>` needs no font metrics.

use std::fmt::Write;

/// One line of a chart: (x, y, ± error) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, Option<f64>)>,
    /// Join the points with a line (false: a scatter).
    pub line: bool,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Fixed x tick positions and labels (categorical axes); auto when None.
    pub x_ticks: Option<Vec<(f64, String)>>,
    pub series: Vec<Series>,
    pub width: f64,
    pub height: f64,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

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

impl Chart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_ticks: None,
            series: vec![],
            width: 520.0,
            height: 320.0,
        }
    }

    /// Render as an `<svg>` element.
    pub fn svg(&self) -> String {
        let (w, h) = (self.width, self.height);
        let (ml, mr, mt, mb) = (70.0, 130.0, 30.0, 45.0);
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let pts: Vec<(f64, f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|&(x, y, e)| (x, y, e.unwrap_or(0.0))))
            .filter(|(x, y, _)| x.is_finite() && y.is_finite())
            .collect();
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
        if pts.is_empty() {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}">no data</text></svg>"#,
                ml + 10.0,
                mt + ph / 2.0
            );
            return out;
        }
        let (mut x0, mut x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.min(p.0), a.1.max(p.0))
        });
        let (mut y0, mut y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.min(p.1 - p.2), a.1.max(p.1 + p.2))
        });
        if x1 <= x0 {
            x0 -= 0.5;
            x1 += 0.5;
        }
        if y1 <= y0 {
            let d = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
            y0 -= d;
            y1 += d;
        }
        let pad = (y1 - y0) * 0.08;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let xpad = (x1 - x0) * 0.04;
        let (x0, x1) = (x0 - xpad, x1 + xpad);
        let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
        let _ = write!(
            out,
            r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        for t in nice_ticks(y0, y1, 5) {
            let y = sy(t);
            let _ = write!(
                out,
                r##"<line x1="{ml}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                ml + pw,
                ml - 5.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        let xt: Vec<(f64, String)> = match &self.x_ticks {
            Some(t) => t.clone(),
            None => nice_ticks(x0, x1, 6)
                .into_iter()
                .map(|v| (v, fmt_tick(v)))
                .collect(),
        };
        for (v, label) in xt {
            let x = sx(v);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#444"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                mt + ph,
                mt + ph + 4.0,
                mt + ph + 16.0,
                esc(&label)
            );
        }
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
        for (i, s) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let ps: Vec<&(f64, f64, Option<f64>)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            if ps.len() > 1 && s.line {
                let d: Vec<String> = ps
                    .iter()
                    .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
                    .collect();
                let _ = write!(
                    out,
                    r#"<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{}"/>"#,
                    d.join(" ")
                );
            }
            for p in &ps {
                let (x, y) = (sx(p.0), sy(p.1));
                if let Some(e) = p.2.filter(|e| *e > 0.0 && e.is_finite()) {
                    let (ya, yb) = (sy(p.1 - e), sy(p.1 + e));
                    let _ = write!(
                        out,
                        r#"<line x1="{x:.1}" x2="{x:.1}" y1="{ya:.1}" y2="{yb:.1}" stroke="{c}"/><line x1="{:.1}" x2="{:.1}" y1="{ya:.1}" y2="{ya:.1}" stroke="{c}"/><line x1="{:.1}" x2="{:.1}" y1="{yb:.1}" y2="{yb:.1}" stroke="{c}"/>"#,
                        x - 3.0,
                        x + 3.0,
                        x - 3.0,
                        x + 3.0
                    );
                }
                if ps.len() <= 40 || !s.line {
                    let _ = write!(
                        out,
                        r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.6" fill="{c}"/>"#
                    );
                }
            }
            let ly = mt + 12.0 + 16.0 * i as f64;
            let _ = write!(
                out,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                ml + pw + 10.0,
                ml + pw + 28.0,
                ml + pw + 32.0,
                ly + 4.0,
                esc(&s.name)
            );
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
}
