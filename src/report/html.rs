//! `report.html`: one self-contained page, the figures inlined as SVG.

use super::svg::esc;
use super::table::{Table, TableCell};
use super::Content;
use std::fmt::Write;

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
     table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
     th{background:#f3f3f3}sup a{color:#667;font-size:0.8em}.note{color:#555;font-size:0.9em}figure{display:inline-block;margin:0.5em}";

/// The whole `report.html` of `c`, for the sweep `sweep_name` of `n_runs` runs.
pub(super) fn document(c: &Content, sweep_name: &str, n_runs: usize) -> String {
    let title = esc(&c.title);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n<p>Sweep <code>{}</code>: {n_runs} runs. Results table: <a href=\"results.csv\">results.csv</a> / <a href=\"results.jsonl\">results.jsonl</a>. Numbers link to the runs (s = seed) that produced them.</p>\n",
        esc(sweep_name),
    );
    for t in &c.tables {
        html += &table(t);
    }
    html += "<h2>Figures</h2>\n";
    for f in &c.figures {
        let _ = writeln!(
            html,
            "<figure>{}<figcaption>{}</figcaption></figure>",
            f.svg,
            esc(&f.caption)
        );
    }
    html += &table(&c.runs_table);
    html += "</body></html>\n";
    html
}

fn cell(c: &TableCell) -> String {
    let mut s = esc(&c.text);
    if !c.links.is_empty() {
        let l: Vec<String> = c
            .links
            .iter()
            .map(|(t, h)| format!(r#"<a href="{}">{}</a>"#, esc(h), esc(t)))
            .collect();
        s += &format!(" <sup>{}</sup>", l.join(" "));
    }
    s
}

fn table(t: &Table) -> String {
    let mut s = format!(
        "<h2>{}</h2>\n<table><tr>{}</tr>\n",
        esc(&t.title),
        t.header
            .iter()
            .map(|h| format!("<th>{}</th>", esc(h)))
            .collect::<String>()
    );
    for r in &t.rows {
        s += &format!(
            "<tr>{}</tr>\n",
            r.iter()
                .map(|c| format!("<td>{}</td>", cell(c)))
                .collect::<String>()
        );
    }
    s += "</table>\n";
    if t.rows.is_empty() {
        s += "<p>(no finished runs for this table)</p>\n";
    }
    s += &format!("<p class=\"note\">{}</p>\n", esc(&t.note));
    s
}
