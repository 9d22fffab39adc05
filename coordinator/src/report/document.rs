//! The report as a document: blocks of inlines, written once by
//! [`ImpactReport::document`](super::ImpactReport::document) and rendered to Markdown
//! ([`ImpactReport::to_markdown`](super::ImpactReport::to_markdown)) and HTML
//! ([`ImpactReport::to_html`](super::ImpactReport::to_html)).
//!
//! Every piece of text is an [`Inline`]; a renderer escapes all of it (HTML: the markup
//! characters; Markdown: line breaks, and `|` in table cells), so nothing a manifest, an
//! operator or a ledger entry says can change the markup around it. The one exception is a
//! [`Block::Figure`]'s SVG, which the report's own chart code writes (escaping the text it
//! draws) and which only the HTML renderer uses.

/// A whole report: its title, a banner for what must be seen first, and the body.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// The title (the page's `<title>` and its top heading).
    pub title: String,
    /// Callouts that must be seen first: at the very top of the HTML page, right under the
    /// title in Markdown.
    pub banner: Vec<Block>,
    /// The body, in reading order.
    pub blocks: Vec<Block>,
}

/// A block of the document.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    /// A section heading, level 1 to 6.
    Heading {
        /// 2 for a section, 3 for a subsection.
        level: u8,
        /// Its text.
        text: String,
    },
    /// A paragraph; `class` styles it in HTML (Markdown has no use for it).
    Paragraph {
        /// Its text.
        inlines: Vec<Inline>,
        /// The HTML class (e.g. `meta`).
        class: Option<&'static str>,
    },
    /// A warning that must not be missed: a red box in HTML, a block quote in Markdown.
    Callout {
        /// Its text.
        inlines: Vec<Inline>,
        /// The HTML class that styles it (e.g. `broken`).
        class: &'static str,
        /// The HTML id, for a reader or a test to find it.
        id: &'static str,
    },
    /// A bulleted list.
    List(Vec<Item>),
    /// Labelled values: a bulleted list with bold labels in Markdown, a two-column table in
    /// HTML.
    Fields(Vec<Field>),
    /// A table.
    Table(Table),
    /// A chart: its SVG in HTML, then its caption; in Markdown the caption, then `fallback`
    /// (the chart's numbers as tables, or nothing).
    Figure {
        /// The chart, as SVG markup written by the report's chart code.
        svg: String,
        /// What the chart shows, in words.
        caption: Option<Vec<Inline>>,
        /// What Markdown shows instead of the chart.
        fallback: Vec<Block>,
    },
    /// Columns side by side in HTML; one after the other in Markdown.
    Columns(Vec<Vec<Block>>),
    /// The closing notes: a section in Markdown, the page's footer in HTML.
    Footer {
        /// The heading.
        heading: String,
        /// The content.
        blocks: Vec<Block>,
    },
}

/// An item of a [`Block::List`].
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Item {
    /// Its text.
    pub inlines: Vec<Inline>,
    /// The HTML class (e.g. `alert`).
    pub class: Option<&'static str>,
    /// A nested list.
    pub children: Vec<Item>,
}

/// A labelled value of a [`Block::Fields`].
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    /// The label.
    pub label: &'static str,
    /// The value.
    pub value: Vec<Inline>,
    /// Notes on the value: nested items in Markdown, lines of the value's cell in HTML.
    pub notes: Vec<Vec<Inline>>,
}

/// A table: a header row and rows of cells.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// The columns.
    pub columns: Vec<Column>,
    /// The rows, one cell per column.
    pub rows: Vec<Vec<Vec<Inline>>>,
}

/// A table column.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Its header, lower case as Markdown shows it; HTML capitalises its first letter.
    pub header: Vec<Inline>,
    /// Whether its cells are numbers (right-aligned in HTML).
    pub numeric: bool,
}

/// A run of text.
#[derive(Clone, Debug, PartialEq)]
pub enum Inline {
    /// Plain text.
    Text(String),
    /// Bold text.
    Strong(Vec<Inline>),
    /// Code: a command, an identifier, an audience.
    Code(String),
    /// A hash or key, which HTML sets in small monospace that may break anywhere.
    Hash(String),
    /// A verdict in colour in HTML (green if `ok`, red if not), bold in Markdown.
    Status {
        /// Good news or bad.
        ok: bool,
        /// The words.
        text: String,
    },
    /// A machine name such as `negative_feedback_rate`: Markdown writes it as it is, HTML
    /// with spaces for its underscores, so that a narrow column can wrap it.
    Ident(String),
    /// An aside on a table cell: a small line of its own in HTML; Markdown, whose table rows
    /// are one line each, leaves it out.
    Note(String),
}

/// Plain text.
pub fn text(s: impl Into<String>) -> Inline {
    Inline::Text(s.into())
}

/// Code.
pub fn code(s: impl Into<String>) -> Inline {
    Inline::Code(s.into())
}

/// Bold text.
pub fn strong(s: impl Into<String>) -> Inline {
    Inline::Strong(vec![text(s)])
}

/// A paragraph without a class.
pub fn paragraph(inlines: Vec<Inline>) -> Block {
    Block::Paragraph {
        inlines,
        class: None,
    }
}

/// A heading.
pub fn heading(level: u8, s: impl Into<String>) -> Block {
    Block::Heading {
        level,
        text: s.into(),
    }
}

/// A list of unstyled, unnested items.
pub fn list(items: impl IntoIterator<Item = Vec<Inline>>) -> Block {
    Block::List(
        items
            .into_iter()
            .map(|inlines| Item {
                inlines,
                ..Item::default()
            })
            .collect(),
    )
}

/// A column with a plain-text header.
pub fn column(header: &str, numeric: bool) -> Column {
    Column {
        header: vec![text(header)],
        numeric,
    }
}

/// One-line text cell.
pub fn cell(s: impl Into<String>) -> Vec<Inline> {
    vec![text(s)]
}
