//! Every relative link and `#anchor` in README.md, ARCHITECTURE.md and docs/**/*.md resolves
//! to a file in the repository and, for Markdown files, to one of its headings.

use std::path::Path;

#[test]
fn every_relative_link_in_the_documentation_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("doc-check sits in the workspace root");
    let files = fedpref_doc_check::documentation_files(root).expect("listing docs/");
    assert!(files.len() > 3, "found only {files:?}");
    let broken = fedpref_doc_check::check(root, &files);
    assert!(
        broken.is_empty(),
        "{} broken links:\n{}",
        broken.len(),
        broken
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
