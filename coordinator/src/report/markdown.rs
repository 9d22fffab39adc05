//! The [`Document`] as Markdown (GitHub's dialect: tables, no raw HTML).
//!
//! Blocks are separated by one blank line. Text is flattened to one line (a line break in a
//! manifest field must not end a list item or a table row), `<` and `>` become character
//! references (no raw HTML), and in table cells `|` is escaped. Charts are replaced by their fallback tables; HTML classes and notes are dropped.

use super::document::{Block, Document, Field, Inline, Item, Table};

/// Renders a document.
pub fn render(d: &Document) -> String {
    let mut parts = vec![format!("# {}\n", no_tags(&flat(&d.title)))];
    blocks(&d.banner, &mut parts);
    blocks(&d.blocks, &mut parts);
    parts.join("\n")
}

/// Each block's text, in order; a block that renders to nothing is left out.
fn blocks(bs: &[Block], out: &mut Vec<String>) {
    for b in bs {
        match b {
            Block::Heading { level, text } => out.push(format!(
                "{} {}\n",
                "#".repeat(usize::from(*level)),
                no_tags(&flat(text))
            )),
            Block::Paragraph { inlines: i, .. } => out.push(format!("{}\n", inlines(i, false))),
            Block::Callout { inlines: i, .. } => out.push(format!("> {}\n", inlines(i, false))),
            Block::List(items) => {
                let mut o = String::new();
                list(items, 0, &mut o);
                out.push(o);
            }
            Block::Fields(fields) => out.push(fields.iter().map(field).collect()),
            Block::Table(t) => out.push(table(t)),
            Block::Figure {
                caption, fallback, ..
            } => {
                if let Some(c) = caption {
                    out.push(format!("{}\n", inlines(c, false)));
                }
                blocks(fallback, out);
            }
            Block::Columns(cols) => cols.iter().for_each(|c| blocks(c, out)),
            Block::Footer { heading, blocks: b } => {
                out.push(format!("## {}\n", no_tags(&flat(heading))));
                blocks(b, out);
            }
        }
    }
    out.retain(|s| !s.is_empty());
}

fn list(items: &[Item], depth: usize, o: &mut String) {
    for item in items {
        o.push_str(&"  ".repeat(depth));
        o.push_str("- ");
        o.push_str(&inlines(&item.inlines, false));
        o.push('\n');
        list(&item.children, depth + 1, o);
    }
}

fn field(f: &Field) -> String {
    let mut o = format!("- **{}:** {}\n", flat(f.label), inlines(&f.value, false));
    for n in &f.notes {
        o.push_str("  - ");
        o.push_str(&inlines(n, false));
        o.push('\n');
    }
    o
}

fn table(t: &Table) -> String {
    let mut o = row(t.columns.iter().map(|c| &c.header));
    o.push('|');
    o.push_str(&"---|".repeat(t.columns.len()));
    o.push('\n');
    for r in &t.rows {
        o.push_str(&row(r.iter()));
    }
    o
}

fn row<'a>(cells: impl Iterator<Item = &'a Vec<Inline>>) -> String {
    let mut o = String::from("|");
    for c in cells {
        o.push(' ');
        o.push_str(&inlines(c, true));
        o.push_str(" |");
    }
    o.push('\n');
    o
}

/// Inlines as Markdown; `cell`: inside a table cell, where `|` ends the cell.
fn inlines(is: &[Inline], cell: bool) -> String {
    let mut o = String::new();
    for i in is {
        match i {
            Inline::Text(s) | Inline::Ident(s) => o.push_str(&no_tags(&plain(s, cell))),
            Inline::Strong(inner) => {
                o.push_str("**");
                o.push_str(&inlines(inner, cell));
                o.push_str("**");
            }
            Inline::Code(s) | Inline::Hash(s) => o.push_str(&code_span(&plain(s, cell))),
            Inline::Status { text, .. } => {
                o.push_str("**");
                o.push_str(&no_tags(&plain(text, cell)));
                o.push_str("**");
            }
            Inline::Note(_) => {}
        }
    }
    o
}

/// Text on one line; in a table cell, with `|` escaped.
fn plain(s: &str, cell: bool) -> String {
    let s = flat(s);
    if cell { s.replace('|', "\\|") } else { s }
}

/// `<` and `>` as character references, so that text (a manifest's purpose, a harm
/// scenario) cannot become raw HTML where Markdown is rendered; code spans show it verbatim.
fn no_tags(s: &str) -> String {
    s.replace('<', "&lt;").replace('>', "&gt;")
}

/// Line breaks (`\r\n`, `\r`, `\n`) as spaces.
fn flat(s: &str) -> String {
    s.replace("\r\n", " ").replace(['\r', '\n'], " ")
}

/// A code span whose fence is longer than any run of backticks inside it.
fn code_span(s: &str) -> String {
    let longest = s.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    if longest > 0 && (s.starts_with('`') || s.ends_with('`')) {
        format!("{fence} {s} {fence}")
    } else {
        format!("{fence}{s}{fence}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_outlast_the_backticks_inside_them() {
        assert_eq!(code_span("run"), "`run`");
        assert_eq!(code_span("a`b"), "``a`b``");
        assert_eq!(code_span("`a``"), "``` `a`` ```");
    }

    #[test]
    fn text_stays_on_one_line_and_in_its_cell() {
        assert_eq!(plain("a\r\nb\rc\nd", false), "a b c d");
        assert_eq!(plain("a | b\nc", true), "a \\| b c");
        assert_eq!(plain("a | b", false), "a | b");
    }
}
