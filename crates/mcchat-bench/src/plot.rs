//! The WebSocket fan-out curve as an SVG (docs/PERFORMANCE.md shows it): deliveries per
//! second against the offered rate, for mcchatd and node-ws-rooms.js, from one run's results.

use std::fmt::Write as _;

use serde_json::Value;

const W: f64 = 640.0;
const H: f64 = 400.0;
const PAD: f64 = 60.0;

/// One server's curve: its name, its colour, and (offered, delivered) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// The SVG, or `None` when the results hold no curve.
pub(crate) fn fanout_svg(ws: &Value) -> Option<String> {
    let series: Vec<Series<'_>> = [("mcchatd", "#2a6df4"), ("node", "#c0392b")]
        .into_iter()
        .filter_map(|(name, colour)| {
            let pts: Vec<(f64, f64)> = ws[name]["offered_curve"]
                .as_array()?
                .iter()
                .filter_map(|p| {
                    Some((
                        p["offered_per_s"].as_f64()?,
                        p["deliveries_per_s"].as_f64()?,
                    ))
                })
                .collect();
            (!pts.is_empty()).then_some((name, colour, pts))
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().flat_map(|&(x, y)| [x, y]))
        .fold(1.0f64, f64::max);
    if series.is_empty() {
        return None;
    }
    let x = |v: f64| PAD + v / max * (W - 2.0 * PAD);
    let y = |v: f64| H - PAD - v / max * (H - 2.0 * PAD);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="black"/>
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{PAD}" stroke="#bbb" stroke-dasharray="4 4"/>
<text x="{cx}" y="{xl}" text-anchor="middle">offered deliveries/s (1 sender, 100 receivers)</text>
<text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">deliveries/s</text>
<text x="{r}" y="{t}" text-anchor="end" fill="#888">dashed: everything offered</text>
"##,
        b = H - PAD,
        r = W - PAD,
        cx = W / 2.0,
        xl = H - 20.0,
        cy = H / 2.0,
        t = PAD - 10.0,
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let label = format!("{:.1}M", v / 1e6);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{label}</text><text x="{}" y="{}" text-anchor="end">{label}</text>"#,
            x(v),
            H - PAD + 16.0,
            PAD - 6.0,
            y(v) + 4.0
        );
    }
    for (i, (name, colour, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
            .collect();
        let label = if *name == "node" {
            "node-ws-rooms.js"
        } else {
            "mcchatd"
        };
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{colour}">{label}</text>
"##,
            path.join(" "),
            PAD + 10.0,
            PAD + 16.0 * (i as f64 + 1.0)
        );
        for &(a, b) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x(a),
                y(b)
            );
        }
    }
    s.push_str("</svg>\n");
    Some(s)
}
