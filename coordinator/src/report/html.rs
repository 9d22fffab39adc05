//! The [`Document`] as one self-contained, printable HTML page: inline CSS and SVG, no
//! script, and nothing fetched from anywhere else (the Content-Security-Policy forbids it).
//!
//! All text is escaped here ([`esc`]); the only markup that is not built here is a figure's
//! SVG, which the chart code writes with its own text escaped.

use std::fmt::Write;

use super::document::{Block, Document, Inline, Item, Table};

const STYLE: &str = "
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1a1a1a;margin:24px auto;max-width:960px;padding:0 16px;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:2px;margin:18px 0 8px}h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0;width:100%}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.broken{background:#fde8ea;border:2px solid #b00020;color:#b00020;padding:10px 12px;font-weight:bold;margin:0 0 12px}
.ok{color:#2e6b30;font-weight:bold}.bad{color:#b00020;font-weight:bold}
.meta{color:#444}.hash{font-family:monospace;font-size:12px;word-break:break-all}
.cols{display:flex;gap:16px;flex-wrap:wrap}.cols>div{flex:1 1 420px}
.alert{color:#b00020}footer{border-top:1px solid #ccc;margin-top:20px;padding-top:6px;font-size:12px;color:#333}
code{font-family:monospace;font-size:12px;background:#f4f4f4;padding:0 2px}
svg text{font-family:inherit;font-size:11px;fill:#1a1a1a}
@media print{body{margin:0;max-width:none;font-size:11px}h2{break-after:avoid}table,svg{break-inside:avoid}}
";

/// Renders a document.
pub fn render(d: &Document) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&d.title)
    );
    blocks(&d.banner, &mut o);
    let _ = writeln!(o, "<h1>{}</h1>", esc(&d.title));
    blocks(&d.blocks, &mut o);
    o.push_str("</body>\n</html>\n");
    o
}

fn blocks(bs: &[Block], o: &mut String) {
    for b in bs {
        block(b, o);
    }
}

fn block(b: &Block, o: &mut String) {
    match b {
        Block::Heading { level, text } => {
            let _ = writeln!(o, "<h{level}>{}</h{level}>", esc(text));
        }
        Block::Paragraph { inlines: i, class } => {
            let _ = writeln!(o, "<p{}>{}</p>", class_attr(*class), inlines(i));
        }
        Block::Callout {
            inlines: i,
            class,
            id,
        } => {
            let _ = writeln!(
                o,
                "<div class=\"{}\" id=\"{}\">{}</div>",
                esc(class),
                esc(id),
                inlines(i)
            );
        }
        Block::List(items) => list(items, o),
        Block::Fields(fields) => {
            o.push_str("<table>\n");
            for f in fields {
                let _ = write!(o, "<tr><th>{}</th><td>{}", esc(f.label), inlines(&f.value));
                for n in &f.notes {
                    let _ = write!(o, "<br>{}", inlines(n));
                }
                o.push_str("</td></tr>\n");
            }
            o.push_str("</table>\n");
        }
        Block::Table(t) => table(t, o),
        Block::Figure { svg, caption, .. } => {
            o.push_str(svg);
            if let Some(c) = caption {
                let _ = writeln!(o, "<p>{}</p>", inlines(c));
            }
        }
        Block::Columns(cols) => {
            o.push_str("<div class=\"cols\">");
            for c in cols {
                o.push_str("<div>\n");
                blocks(c, o);
                o.push_str("</div>");
            }
            o.push_str("</div>\n");
        }
        Block::Footer { heading, blocks: b } => {
            let mut inner = String::new();
            blocks(b, &mut inner);
            let _ = writeln!(
                o,
                "<footer><b>{}.</b>{}</footer>",
                esc(heading),
                inner.trim_end_matches('\n')
            );
        }
    }
}

fn list(items: &[Item], o: &mut String) {
    o.push_str("<ul>\n");
    for item in items {
        let _ = write!(
            o,
            "<li{}>{}",
            class_attr(item.class),
            inlines(&item.inlines)
        );
        if !item.children.is_empty() {
            let mut inner = String::new();
            list(&item.children, &mut inner);
            o.push_str(inner.trim_end_matches('\n'));
        }
        o.push_str("</li>\n");
    }
    o.push_str("</ul>\n");
}

fn table(t: &Table, o: &mut String) {
    o.push_str("<table><tr>");
    for c in &t.columns {
        let _ = write!(o, "<th>{}</th>", header(&c.header));
    }
    o.push_str("</tr>\n");
    for r in &t.rows {
        o.push_str("<tr>");
        for (i, cell) in r.iter().enumerate() {
            let numeric = t.columns.get(i).is_some_and(|c| c.numeric);
            let _ = write!(
                o,
                "<td{}>{}</td>",
                class_attr(numeric.then_some("num")),
                inlines(cell)
            );
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

/// A header cell, its first letter capitalised (Markdown's headers are lower case).
fn header(h: &[Inline]) -> String {
    match h.split_first() {
        Some((Inline::Text(first), rest)) => {
            let mut chars = first.chars();
            let capitalised: String = chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default();
            let mut all = vec![Inline::Text(capitalised)];
            all.extend_from_slice(rest);
            inlines(&all)
        }
        _ => inlines(h),
    }
}

fn class_attr(class: Option<&str>) -> String {
    class
        .map(|c| format!(" class=\"{}\"", esc(c)))
        .unwrap_or_default()
}

fn inlines(is: &[Inline]) -> String {
    let mut o = String::new();
    for i in is {
        match i {
            Inline::Text(s) => o.push_str(&esc(s)),
            Inline::Strong(inner) => {
                let _ = write!(o, "<b>{}</b>", inlines(inner));
            }
            Inline::Code(s) => {
                let _ = write!(o, "<code>{}</code>", esc(s));
            }
            Inline::Hash(s) => {
                let _ = write!(o, "<span class=\"hash\">{}</span>", esc(s));
            }
            Inline::Status { ok, text } => {
                let _ = write!(
                    o,
                    "<span class=\"{}\">{}</span>",
                    if *ok { "ok" } else { "bad" },
                    esc(text)
                );
            }
            Inline::Ident(s) => o.push_str(&esc(&s.replace('_', " "))),
            Inline::Note(s) => {
                let _ = write!(o, "<br><small>{}</small>", esc(s));
            }
        }
    }
    o
}

/// Text with HTML's markup characters escaped (safe in element content and quoted
/// attributes).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::super::document::text;
    use super::*;

    #[test]
    fn html_escaping_covers_markup_characters() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(
            inlines(&[text("run "), Inline::Code("a<b".into()), text(" now")]),
            "run <code>a&lt;b</code> now"
        );
    }

    #[test]
    fn headers_are_capitalised_but_identifiers_are_not() {
        assert_eq!(header(&[text("next C")]), "Next C");
        assert_eq!(header(&[text("KPI")]), "KPI");
        assert_eq!(
            header(&[Inline::Ident("opt_out_rate".into())]),
            "opt out rate"
        );
    }
}
