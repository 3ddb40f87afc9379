//! `report.md`: the tables as Markdown, the figures as links to `figures/`.

use super::table::{Table, TableCell};
use super::Content;
use std::fmt::Write;

/// The whole `report.md` of `c`, for the sweep `sweep_name` of `n_runs` runs.
pub(super) fn document(c: &Content, sweep_name: &str, n_runs: usize) -> String {
    let mut md = format!(
        "# {}\n\nSweep `{sweep_name}`: {n_runs} runs. Results table: `results.csv` / `results.jsonl`. Definitions: docs/MEASURES.md in the moescope repository.\n\n",
        c.title
    );
    for t in &c.tables {
        md += &table(t);
    }
    md += "## Figures\n\n";
    for f in &c.figures {
        let _ = write!(md, "![{0}]({1})\n\n*{0}*\n\n", f.caption, f.file());
    }
    md += &table(&c.runs_table);
    md
}

fn cell(c: &TableCell) -> String {
    let mut s = c.text.replace('|', "\\|");
    if !c.links.is_empty() {
        let l: Vec<String> = c.links.iter().map(|(t, h)| format!("[{t}]({h})")).collect();
        s += &format!(" ({})", l.join(" "));
    }
    s
}

fn table(t: &Table) -> String {
    let mut s = format!(
        "## {}\n\n| {} |\n|{}|\n",
        t.title,
        t.header.join(" | "),
        t.header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in &t.rows {
        s += &format!(
            "| {} |\n",
            r.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    }
    if t.rows.is_empty() {
        s += "\n(no finished runs for this table)\n";
    }
    s += &format!("\n{}\n\n", t.note);
    s
}
