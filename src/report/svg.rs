//! Small SVG charts for the reports: series over time (lines, steps, thresholds, marked
//! moments), a step timeline, and grouped histograms. Drawn by hand: the reports need these
//! three shapes only, and none of them earns a plotting crate's compile time.
//!
//! The SVG is written for inline use in HTML5 (no XML namespace, so no URL in the page).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

const WIDTH: f64 = 760.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 34.0;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    Line,
    /// Holds each value until the next point (a limit, a planned share).
    Steps,
    /// A dashed line (thresholds).
    Dashed,
    /// Points only.
    Dots,
}

/// One named series; x is seconds since the Unix epoch.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub style: Style,
    pub points: Vec<(f64, f64)>,
}

/// A moment marked across a chart with a vertical line and a label.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: f64,
    pub label: String,
    pub color: &'static str,
}

/// A chart of series over time.
#[derive(Debug, Clone, Default)]
pub struct TimeChart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub marks: Vec<Mark>,
    /// Bounds the y axis always includes.
    pub y_floor: Option<f64>,
    pub y_ceiling: Option<f64>,
    /// Labels at points: (x, y, text).
    pub notes: Vec<(f64, f64, String)>,
}

/// One band of a timeline: from, to (seconds since the epoch), label, colour.
#[derive(Debug, Clone)]
pub struct Band {
    pub from: f64,
    pub to: f64,
    pub label: String,
    pub color: &'static str,
}

/// Bars per bin for several groups side by side.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub title: String,
    pub y_label: String,
    pub bins: Vec<String>,
    /// (name, colour, one value per bin).
    pub groups: Vec<(String, &'static str, Vec<f64>)>,
}

/// Escapes text for HTML and SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch of an RFC 3339 time; None when it does not parse.
pub fn epoch_secs(rfc3339: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// A step of 1, 2 or 5 times a power of ten that cuts `range` into about `n` parts.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(raw.log10().floor());
    let m = raw / power;
    power
        * if m <= 1.0 {
            1.0
        } else if m <= 2.0 {
            2.0
        } else if m <= 5.0 {
            5.0
        } else {
            10.0
        }
}

fn number(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let text = format!("{v:.decimals$}");
    if text.starts_with('-') && text.trim_start_matches(['-', '0', '.']).is_empty() {
        text[1..].to_string()
    } else {
        text
    }
}

/// Time ticks: a step from a fixed ladder, labelled in UTC at the precision the step needs.
fn time_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    const LADDER: [f64; 16] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
        21600.0, 86400.0, 604800.0,
    ];
    let step = LADDER
        .iter()
        .copied()
        .find(|s| (hi - lo) / s <= 6.0)
        .unwrap_or(2_592_000.0);
    let (from, to) = if step < 60.0 {
        (11, 19)
    } else if step < 86_400.0 {
        (11, 16)
    } else {
        (0, 10)
    };
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
        let text = humantime::format_rfc3339_seconds(at).to_string();
        out.push((t, text[from..to].to_string()));
        t += step;
    }
    out
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    height: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        LEFT + (v - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        self.height - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (self.height - TOP - BOTTOM)
    }

    /// Horizontal grid lines with their values, every `step` from `y0` to `y1`.
    fn y_grid(&self, out: &mut String, step: f64) {
        let mut v = self.y0;
        while v <= self.y1 + step * 1e-6 {
            let y = self.y(v);
            let _ = write!(
                out,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                number(v, step)
            );
            v += step;
        }
    }
}

fn open_svg(out: &mut String, title: &str, height: f64) {
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" aria-label="{t}"><title>{t}</title><rect width="{WIDTH}" height="{height}" fill="white"/><text x="{LEFT}" y="18" class="title">{t}</text>"#,
        t = escape(title)
    );
}

fn legend(out: &mut String, entries: &[(&str, &'static str, bool)]) {
    for (i, (name, color, dashed)) in entries.iter().enumerate() {
        let y = TOP + 8.0 + 18.0 * i as f64;
        let x = WIDTH - RIGHT + 14.0;
        let dash = if *dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{x2}" y2="{y}" stroke="{color}" stroke-width="2.5"{dash}/><text x="{tx}" y="{ty}" class="legend">{n}</text>"#,
            x2 = x + 18.0,
            tx = x + 24.0,
            ty = y + 4.0,
            n = escape(name)
        );
    }
}

impl TimeChart {
    /// The x range of everything drawn; padded when it is a single moment.
    fn x_range(&self) -> Option<(f64, f64)> {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(self.marks.iter().map(|m| m.at));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        if !lo.is_finite() {
            return None;
        }
        Some(if hi - lo < 1.0 {
            (lo - 1.0, hi + 1.0)
        } else {
            (lo, hi)
        })
    }

    pub fn render(&self, height: f64) -> String {
        let mut out = String::new();
        open_svg(&mut out, &self.title, height);
        let Some((x0, x1)) = self.x_range() else {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" class="empty">no data</text></svg>"#,
                WIDTH / 2.0 - 30.0,
                height / 2.0
            );
            return out;
        };
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(self.y_floor)
            .chain(self.y_ceiling)
            .filter(|y| y.is_finite());
        let (mut y0, mut y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        if y1 - y0 < 1e-9 {
            y1 = y0 + y0.abs().max(1.0) * 0.1;
        }
        let step = nice_step(y1 - y0, 4.0);
        let (y0, y1) = ((y0 / step).floor() * step, (y1 / step).ceil() * step);
        let f = Frame {
            x0,
            x1,
            y0,
            y1,
            height,
        };
        // Grid and axes.
        f.y_grid(&mut out, step);
        for (t, label) in time_ticks(x0, x1) {
            let x = f.x(t);
            let _ = write!(
                out,
                r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" class="axis"/><text x="{x:.1}" y="{}" class="tick" text-anchor="middle">{label}</text>"#,
                height - BOTTOM,
                height - BOTTOM + 4.0,
                height - BOTTOM + 16.0,
            );
        }
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" class="axis"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" class="axis"/><text x="12" y="{m}" class="tick" transform="rotate(-90 12 {m})" text-anchor="middle">{yl}</text><text x="{r}" y="{u}" class="tick" text-anchor="end">UTC</text>"#,
            b = height - BOTTOM,
            r = WIDTH - RIGHT,
            m = (TOP + height - BOTTOM) / 2.0,
            u = height - 4.0,
            yl = escape(&self.y_label)
        );
        for m in &self.marks {
            let x = f.x(m.at);
            // Near the right edge the label goes left of its line, clear of the legend.
            let (label_x, anchor) = if x > WIDTH - RIGHT - 80.0 {
                (x - 3.0, "end")
            } else {
                (x + 3.0, "start")
            };
            let _ = write!(
                out,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="{c}" stroke-dasharray="3 3"/><text x="{label_x:.1}" y="{}" class="mark" fill="{c}" text-anchor="{anchor}">{}</text>"#,
                height - BOTTOM,
                TOP + 10.0,
                escape(&m.label),
                c = m.color
            );
        }
        for s in &self.series {
            draw_series(&mut out, &f, s);
        }
        for (x, y, text) in &self.notes {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{:.1}" class="note">{}</text>"#,
                f.x(*x) + 4.0,
                f.y(*y) - 6.0,
                escape(text)
            );
        }
        let entries: Vec<_> = self
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.color, s.style == Style::Dashed))
            .collect();
        legend(&mut out, &entries);
        out.push_str("</svg>");
        out
    }
}

fn draw_series(out: &mut String, f: &Frame, s: &Series) {
    if s.style == Style::Dots {
        for (x, y) in &s.points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                f.x(*x),
                f.y(*y),
                s.color
            );
        }
        return;
    }
    let mut pts: Vec<(f64, f64)> = Vec::with_capacity(s.points.len() * 2);
    for (i, p) in s.points.iter().enumerate() {
        if s.style == Style::Steps
            && let Some(prev) = i.checked_sub(1).map(|j| s.points[j])
        {
            pts.push((p.0, prev.1));
        }
        pts.push(*p);
    }
    if s.style == Style::Steps
        && let Some(last) = s.points.last()
    {
        pts.push((f.x1, last.1));
    }
    let path: Vec<String> = pts
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", f.x(*x), f.y(*y)))
        .collect();
    let dash = if s.style == Style::Dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    };
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"{dash}/>"#,
        s.color,
        path.join(" ")
    );
    if s.points.len() == 1 || s.style == Style::Line {
        for (x, y) in &s.points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{}"/>"#,
                f.x(*x),
                f.y(*y),
                s.color
            );
        }
    }
}

/// A strip of labelled bands over time, with marked moments (the steps of a rollout).
pub fn timeline(title: &str, bands: &[Band], marks: &[Mark]) -> String {
    let height = 110.0;
    let mut out = String::new();
    open_svg(&mut out, title, height);
    let lo = bands
        .iter()
        .map(|b| b.from)
        .chain(marks.iter().map(|m| m.at))
        .fold(f64::INFINITY, f64::min);
    let hi = bands
        .iter()
        .map(|b| b.to)
        .chain(marks.iter().map(|m| m.at))
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        out.push_str("</svg>");
        return out;
    }
    let (lo, hi) = if hi - lo < 1.0 {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    let f = Frame {
        x0: lo,
        x1: hi,
        y0: 0.0,
        y1: 1.0,
        height,
    };
    for b in bands {
        let (x, x2) = (f.x(b.from), f.x(b.to).max(f.x(b.from) + 2.0));
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{TOP}" width="{:.1}" height="38" fill="{}" stroke="white"/><text x="{:.1}" y="{}" class="band">{}</text>"#,
            x2 - x,
            b.color,
            x + 4.0,
            TOP + 23.0,
            escape(&b.label)
        );
    }
    for m in marks {
        let x = f.x(m.at);
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="{c}" stroke-width="2"/><text x="{x:.1}" y="{}" class="mark" fill="{c}" text-anchor="middle">{}</text>"#,
            TOP - 4.0,
            TOP + 44.0,
            TOP + 58.0,
            escape(&m.label),
            c = m.color
        );
    }
    for (t, label) in time_ticks(lo, hi) {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" class="tick" text-anchor="middle">{label}</text>"#,
            f.x(t),
            height - 8.0
        );
    }
    out.push_str("</svg>");
    out
}

impl Histogram {
    pub fn render(&self, height: f64) -> String {
        let mut out = String::new();
        open_svg(&mut out, &self.title, height);
        let top = self
            .groups
            .iter()
            .flat_map(|g| g.2.iter().copied())
            .fold(0.0, f64::max);
        let step = nice_step(if top > 0.0 { top } else { 1.0 }, 4.0);
        let y1 = ((top / step).ceil() * step).max(step);
        let f = Frame {
            x0: 0.0,
            x1: self.bins.len().max(1) as f64,
            y0: 0.0,
            y1,
            height,
        };
        f.y_grid(&mut out, step);
        let slot = f.x(1.0) - f.x(0.0);
        let width = (slot * 0.8) / self.groups.len().max(1) as f64;
        for (g, (_, color, values)) in self.groups.iter().enumerate() {
            for (i, value) in values.iter().enumerate() {
                let x = f.x(i as f64) + slot * 0.1 + width * g as f64;
                let y = f.y(*value);
                let _ = write!(
                    out,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{:.1}" fill="{color}"/>"#,
                    (f.y(0.0) - y).max(0.0)
                );
            }
        }
        for (i, label) in self.bins.iter().enumerate() {
            if i % 2 == 0 {
                let _ = write!(
                    out,
                    r#"<text x="{:.1}" y="{}" class="tick" text-anchor="middle">{}</text>"#,
                    f.x(i as f64),
                    height - BOTTOM + 16.0,
                    escape(label)
                );
            }
        }
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" class="axis"/><text x="12" y="{m}" class="tick" transform="rotate(-90 12 {m})" text-anchor="middle">{yl}</text>"#,
            b = height - BOTTOM,
            r = WIDTH - RIGHT,
            m = (TOP + height - BOTTOM) / 2.0,
            yl = escape(&self.y_label)
        );
        let entries: Vec<_> = self
            .groups
            .iter()
            .map(|g| (g.0.as_str(), g.1, false))
            .collect();
        legend(&mut out, &entries);
        out.push_str("</svg>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_of_one_two_five() {
        assert_eq!(nice_step(1.0, 4.0), 0.5);
        assert_eq!(nice_step(100.0, 4.0), 50.0);
        assert_eq!(nice_step(0.03, 4.0), 0.01);
        assert_eq!(number(0.25, 0.05), "0.25");
        assert_eq!(number(-0.0, 0.1), "0.0");
    }

    #[test]
    fn time_ticks_fit_the_span() {
        let t0 = epoch_secs("2026-11-28T10:00:00Z").unwrap();
        let ticks = time_ticks(t0, t0 + 50.0);
        assert!(ticks.len() <= 7, "{ticks:?}");
        assert_eq!(ticks[0].1, "10:00:00");
        let days = time_ticks(t0, t0 + 30.0 * 86_400.0);
        assert_eq!(days[0].1.len(), 10, "{days:?}");
    }

    #[test]
    fn a_chart_escapes_text_and_draws_each_series() {
        let t0 = epoch_secs("2026-11-28T10:00:00.5Z").unwrap();
        let chart = TimeChart {
            title: "a <b> & c".into(),
            y_label: "share".into(),
            series: vec![
                Series {
                    name: "x".into(),
                    color: "#123456",
                    style: Style::Steps,
                    points: vec![(t0, 1.0), (t0 + 10.0, 2.0)],
                },
                Series {
                    name: "limit".into(),
                    color: "#654321",
                    style: Style::Dashed,
                    points: vec![(t0, 3.0), (t0 + 10.0, 3.0)],
                },
            ],
            ..TimeChart::default()
        }
        .render(200.0);
        assert!(chart.contains("a &lt;b&gt; &amp; c"));
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(!chart.contains("NaN"));
        let empty = TimeChart::default().render(200.0);
        assert!(empty.contains("no data"));
    }
}
