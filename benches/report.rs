//! What a benchmark run leaves behind besides the printed table: the rows as
//! JSON (`benches/results/latest.json`) and the latency distributions of
//! one read served from each tier drawn as an SVG (`benches/results/hit-latency.svg`,
//! shown in BENCHMARKS.md).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// One row of the table.
struct Row {
    name: String,
    value: String,
    note: String,
}

/// The latencies of one kind of call, sorted, in microseconds.
pub struct Series {
    pub label: &'static str,
    pub color: &'static str,
    pub micros: Vec<f64>,
}

impl Series {
    /// The `p`-quantile (0..=1).
    fn quantile(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((self.micros.len() - 1) as f64 * p).round() as usize;
        self.micros[i]
    }
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());
static SERIES: Mutex<Vec<Series>> = Mutex::new(Vec::new());

/// Prints a row of the Markdown table and keeps it for the JSON.
pub fn row(name: &str, value: &str, note: &str) {
    println!("| {name} | {value} | {note} |");
    ROWS.lock().expect("rows").push(Row {
        name: name.to_owned(),
        value: value.to_owned(),
        note: note.to_owned(),
    });
}

/// Keeps one distribution for the JSON and the picture.
pub fn series(label: &'static str, color: &'static str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let micros = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    SERIES.lock().expect("series").push(Series { label, color, micros });
}

fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `latest.json` and `hit-latency.svg`; returns their paths.
pub fn write(header: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let rows = ROWS.lock().expect("rows");
    let series = SERIES.lock().expect("series");
    let mut json = format!("{{\n  \"run\": {},\n  \"rows\": [\n", json_string(header));
    for (i, row) in rows.iter().enumerate() {
        let _ = writeln!(
            json,
            "    {{\"name\": {}, \"value\": {}, \"note\": {}}}{}",
            json_string(&row.name),
            json_string(&row.value),
            json_string(&row.note),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    json.push_str("  ],\n  \"latency_us\": [\n");
    for (i, s) in series.iter().enumerate() {
        let quantiles: Vec<String> = [0.01, 0.10, 0.50, 0.90, 0.99, 0.999]
            .iter()
            .map(|p| format!("\"p{}\": {:.1}", p * 100.0, s.quantile(*p)))
            .collect();
        let _ = writeln!(
            json,
            "    {{\"series\": {}, \"samples\": {}, {}}}{}",
            json_string(s.label),
            s.micros.len(),
            quantiles.join(", "),
            if i + 1 < series.len() { "," } else { "" }
        );
    }
    json.push_str("  ]\n}\n");
    let json_path = dir.join("latest.json");
    std::fs::write(&json_path, json)?;
    let svg_path = dir.join("hit-latency.svg");
    std::fs::write(&svg_path, svg(&series, header))?;
    Ok((json_path, svg_path))
}

/// The distributions as cumulative curves on a logarithmic time axis.
fn svg(series: &[Series], header: &str) -> String {
    #[allow(clippy::cast_precision_loss)]
    let legend = 20.0 * series.len() as f64;
    let (width, height) = (760.0, 400.0 + legend);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 60.0 + legend);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    // 100 ns (in-process hits) to 10 ms.
    let (lo, hi) = (-1.0_f64, 4.0_f64);
    let x = |us: f64| left + (us.max(0.1).log10().clamp(lo, hi) - lo) / (hi - lo) * plot_w;
    let y = |p: f64| top + (1.0 - p) * plot_h;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"22\" font-size=\"14\">Latency of one read, by where it is served (cumulative share of calls)</text>"
    );
    for decade in -1..=4 {
        let us = 10f64.powi(decade);
        let gx = x(us);
        let label = match decade {
            -1 => "100 ns".to_owned(),
            0 => "1 us".to_owned(),
            1 => "10 us".to_owned(),
            2 => "100 us".to_owned(),
            3 => "1 ms".to_owned(),
            _ => "10 ms".to_owned(),
        };
        let _ = writeln!(
            out,
            "<line x1=\"{gx:.1}\" y1=\"{top}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            top + plot_h,
            top + plot_h + 18.0
        );
    }
    for tenth in 0..=4 {
        let p = f64::from(tenth) / 4.0;
        let gy = y(p);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}%</text>",
            left + plot_w,
            left - 6.0,
            gy + 4.0,
            p * 100.0
        );
    }
    for (i, s) in series.iter().enumerate() {
        let n = s.micros.len().max(1);
        let mut points = String::new();
        let step = (n / 400).max(1);
        for (j, us) in s.micros.iter().enumerate().step_by(step) {
            #[allow(clippy::cast_precision_loss)]
            let p = (j + 1) as f64 / n as f64;
            let _ = write!(points, "{:.1},{:.1} ", x(*us), y(p));
        }
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            s.color,
            points.trim_end()
        );
        #[allow(clippy::cast_precision_loss)]
        let ly = top + plot_h + 44.0 + 20.0 * i as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{} (median {:.1} us, p99 {:.1} us)</text>",
            left + 10.0,
            ly - 4.0,
            s.color,
            left + 28.0,
            ly,
            s.label,
            s.quantile(0.5),
            s.quantile(0.99)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"{:.1}\" fill=\"#666\">{}</text>\n</svg>",
        height - 12.0,
        header.replace('&', "&amp;").replace('<', "&lt;")
    );
    out
}
