//! # fedpref-doc-check
//!
//! Checks the repository's Markdown the way a reader meets it on a forge: every relative link
//! must name a file or folder inside the repository, and every `#anchor` must name a heading
//! of the file it points at, with anchors made from headings the way GitHub makes them
//! (lower case; letters, digits, `_`, `-` and spaces kept; spaces become `-`; a repeated
//! heading gets `-1`, `-2`, …). Links inside code blocks and code spans are not links.
//! Web addresses are not followed.
//!
//! ```
//! use fedpref_doc_check::{anchors, links, slug};
//!
//! let page = "# Running a coordinator\n\nSee [the keys](#the-configuration-file).\n\
//!             ## The configuration file\n";
//! assert_eq!(slug("Privacy mode `local` (default)"), "privacy-mode-local-default");
//! assert!(anchors(page).contains("the-configuration-file"));
//! assert_eq!(links(page)[0].target, "#the-configuration-file");
//! ```
//!
//! `tests/links.rs` runs it over `README.md`, `ARCHITECTURE.md` and `docs/**/*.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// A link found in a Markdown text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// 1-based line number of the link.
    pub line: usize,
    /// The link's destination as written (angle brackets and title removed).
    pub target: String,
}

/// A link that does not resolve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The Markdown file, relative to the repository root.
    pub file: PathBuf,
    /// 1-based line number of the link.
    pub line: usize,
    /// The link's destination as written.
    pub target: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: ({}) {}",
            self.file.display(),
            self.line,
            self.target,
            self.reason
        )
    }
}

/// The fence that opens a code block on this line (three or more backticks or tildes), if any.
fn fence(line: &str) -> Option<(char, usize)> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let c = trimmed.chars().next()?;
    if c != '`' && c != '~' {
        return None;
    }
    let n = trimmed.chars().take_while(|&x| x == c).count();
    (n >= 3).then_some((c, n))
}

/// The lines of a Markdown text that are not inside fenced code blocks, with their 1-based
/// numbers.
fn prose_lines(markdown: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (open, fence(line)) {
            (None, Some(f)) => open = Some(f),
            (Some((c, n)), Some((c2, n2)))
                if c == c2 && n2 >= n && {
                    let rest = line.trim_start().trim_start_matches(c);
                    rest.trim().is_empty()
                } =>
            {
                open = None
            }
            (Some(_), _) => {}
            (None, None) => out.push((i + 1, line)),
        }
    }
    out
}

/// The line with its code spans blanked out (a run of n backticks up to the next run of n).
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '`' {
            let n = chars[i..].iter().take_while(|&&c| c == '`').count();
            // Find the closing run of exactly n backticks.
            let mut j = i + n;
            let mut close = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let m = chars[j..].iter().take_while(|&&c| c == '`').count();
                    if m == n {
                        close = Some(j);
                        break;
                    }
                    j += m;
                } else {
                    j += 1;
                }
            }
            match close {
                Some(j) => {
                    out.push(' ');
                    i = j + n;
                }
                None => {
                    out.extend(&chars[i..i + n]);
                    i += n;
                }
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The destination of an inline link starting right after its `](`: up to the matching `)`,
/// without `<…>` and without a title.
fn destination(rest: &str) -> Option<String> {
    let rest = rest.trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        return inner.find('>').map(|end| inner[..end].to_owned());
    }
    let mut depth = 0usize;
    let mut end = None;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => {
                end = Some(i);
                break;
            }
            ')' => depth -= 1,
            c if c.is_whitespace() => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    end.map(|e| rest[..e].to_owned())
}

/// Every link in a Markdown text: inline links and images `[text](dest)` and reference
/// definitions `[label]: dest`, outside code blocks and code spans.
pub fn links(markdown: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (number, line) in prose_lines(markdown) {
        let line = without_code_spans(line);
        // Reference definitions.
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() <= 3
            && trimmed.starts_with('[')
            && let Some(close) = trimmed.find("]:")
        {
            let dest = trimmed[close + 2..].trim();
            if let Some(d) = destination(dest)
                .or_else(|| (!dest.is_empty()).then(|| dest.to_owned()))
                .filter(|d| !d.is_empty())
            {
                out.push(Link {
                    line: number,
                    target: d,
                });
            }
            continue;
        }
        let mut from = 0;
        while let Some(at) = line[from..].find("](") {
            let start = from + at + 2;
            if let Some(d) = destination(&line[start..]) {
                out.push(Link {
                    line: number,
                    target: d,
                });
            }
            from = start;
        }
    }
    out
}

/// The anchor GitHub gives a heading's text: inline links reduced to their text, HTML tags
/// dropped, lower case, every character that is not a letter, digit, `_`, `-` or space
/// removed, spaces turned into `-`.
pub fn slug(heading: &str) -> String {
    // Links and images: keep the text between the brackets.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find("](") {
            Some(close) if destination(&after[close + 2..]).is_some() => {
                text.push_str(&rest[..open]);
                text.push_str(&after[..close]);
                let dest_start = close + 2;
                let tail = &after[dest_start..];
                let end = tail.find(')').map_or(tail.len(), |e| e + 1);
                rest = &tail[end..];
            }
            _ => {
                text.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    // HTML tags.
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    plain
        .trim()
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == '_' || c == '-' || c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text of an ATX heading line (`# …` to `###### …`), without its closing `#`s.
fn heading_text(line: &str) -> Option<&str> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.chars().take_while(|&c| c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &trimmed[level..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim();
    let without_closing = rest.trim_end_matches('#');
    Some(
        if without_closing.len() < rest.len()
            && (without_closing.is_empty() || without_closing.ends_with(' '))
        {
            without_closing.trim_end()
        } else {
            rest
        },
    )
}

/// Every anchor a Markdown text offers: its headings' slugs (repeats numbered `-1`, `-2`, …)
/// and explicit `id="…"` / `name="…"` attributes of HTML elements.
pub fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(markdown) {
        if let Some(text) = heading_text(line) {
            let base = slug(text);
            let n = seen.entry(base.clone()).or_insert(0);
            let anchor = if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            *n += 1;
            out.insert(anchor);
        }
        for attribute in ["id=\"", "name=\""] {
            let mut from = 0;
            while let Some(at) = line[from..].find(attribute) {
                let start = from + at + attribute.len();
                if let Some(end) = line[start..].find('"') {
                    out.insert(line[start..start + end].to_owned());
                }
                from = start;
            }
        }
    }
    out
}

/// Whether a destination is a web address or another scheme (`https:`, `mailto:`), which
/// this check does not follow.
fn is_external(target: &str) -> bool {
    match target.find(':') {
        Some(colon) => {
            let scheme = &target[..colon];
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !target[..colon].contains('/')
        }
        None => target.starts_with("//"),
    }
}

/// `%20` and the like decoded (forges percent-encode spaces in paths).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `base/target` with `.` and `..` resolved lexically; `None` when it climbs above the root.
fn resolve(base: &Path, target: &str) -> Option<PathBuf> {
    let mut parts: Vec<String> = Vec::new();
    let joined = if let Some(from_root) = target.strip_prefix('/') {
        PathBuf::from(from_root)
    } else {
        base.join(target)
    };
    for component in joined.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// A forge's line anchor on a source file: `L12` or `L12-L20`.
fn is_line_anchor(anchor: &str) -> bool {
    let mut parts = anchor.splitn(2, '-');
    let is_line = |p: &str| {
        p.strip_prefix('L')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    parts.next().is_some_and(is_line) && parts.next().is_none_or(is_line)
}

/// Every relative link of the Markdown files `files` (paths relative to `root`) that does not
/// resolve: a path that leaves the repository or names nothing, or an anchor that names no
/// heading of its Markdown file.
pub fn check(root: &Path, files: &[PathBuf]) -> Vec<Broken> {
    let mut cache: BTreeMap<PathBuf, Option<BTreeSet<String>>> = BTreeMap::new();
    let mut anchors_of = |file: &Path| -> Option<BTreeSet<String>> {
        cache
            .entry(file.to_owned())
            .or_insert_with(|| {
                std::fs::read_to_string(root.join(file))
                    .ok()
                    .map(|t| anchors(&t))
            })
            .clone()
    };
    let mut broken = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(root.join(file)) {
            Ok(t) => t,
            Err(e) => {
                broken.push(Broken {
                    file: file.clone(),
                    line: 0,
                    target: String::new(),
                    reason: format!("cannot read the file: {e}"),
                });
                continue;
            }
        };
        let dir = file.parent().unwrap_or(Path::new(""));
        for link in links(&text) {
            let target = link.target.as_str();
            if is_external(target) {
                continue;
            }
            let mut fail = |reason: String| {
                broken.push(Broken {
                    file: file.clone(),
                    line: link.line,
                    target: link.target.clone(),
                    reason,
                })
            };
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target, None),
            };
            let path = path.split('?').next().unwrap_or_default();
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                match resolve(dir, &percent_decoded(path)) {
                    Some(p) => p,
                    None => {
                        fail("leaves the repository".to_owned());
                        continue;
                    }
                }
            };
            if !root.join(&resolved).exists() {
                fail(format!("{} does not exist", resolved.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            let anchor = percent_decoded(anchor);
            if resolved.extension().is_some_and(|e| e == "md") {
                match anchors_of(&resolved) {
                    Some(known) if known.contains(&anchor) => {}
                    Some(_) => fail(format!(
                        "no heading of {} has the anchor #{anchor}",
                        resolved.display()
                    )),
                    None => fail(format!("cannot read {}", resolved.display())),
                }
            } else if !is_line_anchor(&anchor) {
                fail(format!(
                    "#{anchor} on {}, which is not Markdown (only #L12 or #L12-L20 line anchors)",
                    resolved.display()
                ));
            }
        }
    }
    broken
}

/// The Markdown files whose links are checked: `README.md`, `ARCHITECTURE.md` and every
/// `.md` under `docs/`, relative to `root`, sorted.
pub fn documentation_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = vec![PathBuf::from("README.md"), PathBuf::from("ARCHITECTURE.md")];
    let mut stack = vec![PathBuf::from("docs")];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir))? {
            let entry = entry?;
            let relative = dir.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(relative);
            } else if relative.extension().is_some_and(|e| e == "md") {
                found.push(relative);
            }
        }
    }
    found.sort();
    files.extend(found);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_githubs_rules() {
        assert_eq!(
            slug("For compliance and privacy teams"),
            "for-compliance-and-privacy-teams"
        );
        assert_eq!(
            slug("`fedpref-coordinator serve`"),
            "fedpref-coordinator-serve"
        );
        assert_eq!(
            slug("Keys: `limits.max_upload_bytes`"),
            "keys-limitsmax_upload_bytes"
        );
        assert_eq!(
            slug("Scaling out: replicas on PostgreSQL"),
            "scaling-out-replicas-on-postgresql"
        );
        assert_eq!(slug("Rényi DP & (ε, δ)"), "rényi-dp--ε-δ");
        assert_eq!(
            slug("See [the ledger](ledger.md) format"),
            "see-the-ledger-format"
        );
        assert_eq!(slug("What is <em>not</em> built"), "what-is-not-built");
    }

    #[test]
    fn repeated_headings_are_numbered_and_code_blocks_hold_no_headings() {
        let text = "# Tests\n## Tests\n```sh\n# Tests in a shell comment\n```\n### Tests\n";
        let a = anchors(text);
        assert_eq!(
            a,
            ["tests", "tests-1", "tests-2"]
                .into_iter()
                .map(String::from)
                .collect()
        );
    }

    #[test]
    fn links_in_code_are_not_links_and_titles_and_brackets_are_dropped() {
        let text = "a [x](one.md \"t\") b `[y](two.md)` [z](<three four.md>)\n\
                    ```\n[w](five.md)\n```\n[ref]: six.md#part\n![img](p(1).png)";
        let targets: Vec<String> = links(text).into_iter().map(|l| l.target).collect();
        assert_eq!(
            targets,
            ["one.md", "three four.md", "six.md#part", "p(1).png"]
        );
    }

    #[test]
    fn external_addresses_are_not_followed() {
        assert!(is_external("https://example.invalid/x"));
        assert!(is_external("mailto:a@b"));
        assert!(!is_external("docs/operators.md#a"));
        assert!(!is_external("#anchor"));
    }

    #[test]
    fn broken_paths_and_anchors_are_reported_and_good_ones_pass() {
        let root = std::env::temp_dir().join(format!("fedpref-doc-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::write(root.join("src.rs"), "fn main() {}\n").unwrap();
        std::fs::write(
            root.join("README.md"),
            "# Top\n[ok](docs/guide.md#the-keys) [ok2](#top) [ok3](src.rs#L1-L2)\n\
             [bad](docs/missing.md) [bad2](docs/guide.md#nope) [bad3](../outside.md)\n\
             [bad4](#absent) [bad5](src.rs#main)\n",
        )
        .unwrap();
        std::fs::write(
            root.join("docs/guide.md"),
            "# Guide\n## The keys\n[up](../README.md#top)\n",
        )
        .unwrap();
        let broken = check(&root, &documentation_files(&root).unwrap_or_default()[..1]);
        let got: Vec<(usize, &str)> = broken.iter().map(|b| (b.line, b.target.as_str())).collect();
        assert_eq!(
            got,
            [
                (3, "docs/missing.md"),
                (3, "docs/guide.md#nope"),
                (3, "../outside.md"),
                (4, "#absent"),
                (4, "src.rs#main"),
            ]
        );
        assert!(check(&root, &[PathBuf::from("docs/guide.md")]).is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
