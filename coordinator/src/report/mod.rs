//! The impact report: one page per training run for the people who answer for it.
//!
//! [`ImpactReport::build`] reads a run from the [`Store`](crate::store::Store) — its manifest, its ledger (verified
//! with [`crate::ledger::verify`]), its participations and its summed federated-evaluation
//! counts — and gathers what was promised, what was spent, by whom and for whom. It renders as
//! JSON ([`ImpactReport::to_json`]), Markdown ([`ImpactReport::to_markdown`]) or one
//! self-contained, printable HTML page ([`ImpactReport::to_html`]: inline CSS and SVG, no
//! script, font or image from anywhere else).
//!
//! Every number comes from the ledger and the store and can be re-derived with
//! `fedpref-coordinator ledger verify` and `ledger export --format json`:
//!
//! - **Cumulative ε per round and audience** is the `cumulative_epsilon` of each
//!   `round_committed` entry, which `verify` re-derives from the recorded σ, q and mode.
//! - **Per-device ε** composes, for each device, the rounds it took part in (the
//!   `participations` table) *without* amplification by sampling — q = 1 at each round's σ,
//!   with the privacy crate's [`RdpAccountant`](fedpref_privacy::RdpAccountant) over the run's order grid — converted at the
//!   run's δ. It holds against an observer of the released models who knows which rounds the
//!   device took part in (in local mode: against anyone who sees its uploads). Device ids never
//!   appear in the report, only the distribution.
//! - **Guardrail metrics** are ratios of counts summed over all reporting devices of a model
//!   version ([`crate::guardrail`]); alerts are the ledger's `guardrail_alert` entries.
//!
//! The Markdown and the HTML are two renderings of one [`Document`]
//! ([`ImpactReport::document`]), in which every heading, sentence and table is written once:
//! `model` gathers the data, `content` words it, `markdown` and `html` render it (escaping all
//! text) and `charts` draws the page's SVG.
//!
//! The report carries the time it was rendered (`generated_at_ms`), which the caller passes in;
//! nothing else in it depends on the clock of the machine rendering it.

mod charts;
mod content;
pub mod document;
mod html;
mod markdown;
mod model;

pub use document::Document;
pub use model::{
    Alert, Assessment, AudienceNote, Bin, ClipPoint, EvaluationSpend, Guardrails, ImpactReport,
    LedgerStatus, Operation, ParticipationGroup, PerDevice, REPORT_FORMAT_VERSION, ReportError,
    RoundEpsilon, Series, Spend, UNIT_OF_PRIVACY, UNIT_OF_PRIVACY_PERSON, utc,
};

/// An ε as the report prints it.
fn eps(v: f64) -> String {
    format!("{v:.4}")
}

impl ImpactReport {
    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        markdown::render(&self.document())
    }

    /// The report as one self-contained, printable HTML page: inline CSS and SVG, no
    /// script, and nothing fetched from anywhere else.
    pub fn to_html(&self) -> String {
        html::render(&self.document())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::document::{Block, Inline};
    use super::*;
    use crate::guardrail::VersionMetrics;
    use crate::ledger::AudienceEpsilon;
    use crate::manifest::{
        AlertAction, GuardrailMetric, GuardrailMetricKind, HarmScenario, Kpi, OptOutPolicy,
        ThresholdDirection,
    };

    /// A report with every part present, `s` in every field a person or a ledger entry
    /// writes, and the chain broken (`problem`) if `broken`.
    fn fixture(s: &str, broken: bool) -> ImpactReport {
        let aud = "release_observers".to_string();
        let points = |k: u64| {
            (0..=k)
                .map(|r| RoundEpsilon {
                    round: r,
                    epsilon: r as f64,
                })
                .collect::<Vec<_>>()
        };
        ImpactReport {
            format_version: REPORT_FORMAT_VERSION,
            run_id: format!("run {s}"),
            title: format!("title {s}"),
            status: "active".into(),
            generated_at_ms: 0,
            ledger: LedgerStatus {
                intact: !broken,
                entries: 9,
                head_sequence: 9,
                head_sha256: "ab".repeat(32),
                failed_sequence: broken.then_some(3),
                problem: broken.then(|| format!("problem {s}")),
                rederived_epsilon: vec![],
                public_key: Some("cd".repeat(32)),
            },
            assessment: Assessment {
                purpose: format!("purpose {s}"),
                owner: format!("owner {s}"),
                data_elements_used: vec![format!("used {s}"), "ratings".into()],
                data_elements_not_used: vec![format!("not used {s}")],
                privacy_mode: "local".into(),
                mode_explained: "Local DP.".into(),
                unit_of_privacy: UNIT_OF_PRIVACY.into(),
                budget_audience: aud.clone(),
                audiences: vec![AudienceNote {
                    audience: aud.clone(),
                    description: "holds against anyone".into(),
                }],
                budget_epsilon: 10.0,
                budget_delta: 1e-6,
                clip_norm: 1.0,
                noise_multiplier: Some(1.2),
                sampling: "A fixed cohort".into(),
                sampling_rate: 1.0,
                epsilon_assumption: "none (worst case per device)".into(),
                accountant: "rdp".into(),
                accountant_explained: "the RDP accountant".into(),
                rounds_planned: 3,
                opt_out_policy: OptOutPolicy {
                    consent_model: format!("consent {s}"),
                    description: format!("description {s}"),
                    withdrawal_effect: format!("withdrawal {s}"),
                },
                harm_scenarios: vec![HarmScenario {
                    scenario: format!("scenario {s}"),
                    affected_groups: format!("affected {s}"),
                    mitigation: format!("mitigation {s}"),
                    residual_risk: format!("risk {s}"),
                }],
                kpis: vec![Kpi {
                    metric: format!("kpi {s}"),
                    description: format!("kpi description {s}"),
                    target: Some(0.5),
                    higher_is_better: true,
                }],
                manifest_sha256: "ef".repeat(32),
            },
            spend: Spend {
                rounds_committed: 2,
                rounds_abandoned: 0,
                devices_participated: 1,
                budget_epsilon: 10.0,
                delta: 1e-6,
                final_epsilon: vec![AudienceEpsilon {
                    audience: aud.clone(),
                    epsilon: 2.0,
                    accountant: None,
                }],
                series: vec![Series {
                    audience: aud,
                    points: points(2),
                }],
                per_device: PerDevice {
                    holds_against: "holds against anyone".into(),
                    by_participations: vec![ParticipationGroup {
                        participations: 2,
                        devices: 1,
                        epsilon: 2.0,
                    }],
                    histogram: vec![Bin {
                        from: 0.0,
                        to: 2.0,
                        devices: 1,
                    }],
                    max_epsilon: Some(2.0),
                    max_participations: 2,
                    devices_at_max: 1,
                },
                clip_trajectory: vec![ClipPoint {
                    round: 1,
                    clip_norm: 1.0,
                    next_clip_norm: 0.9,
                }],
            },
            guardrails: Guardrails {
                thresholds: vec![GuardrailMetric {
                    metric: GuardrailMetricKind::OptOutRate,
                    direction: ThresholdDirection::Above,
                    threshold: 0.1,
                    on_alert: AlertAction::Pause,
                    minimum_reporting_devices: 3,
                }],
                versions: vec![VersionMetrics {
                    model_version: 2,
                    reports: 3,
                    reporting_devices: 3,
                    values: BTreeMap::from([(GuardrailMetricKind::OptOutRate, 0.2)]),
                }],
                alerts: vec![Alert {
                    sequence: 5,
                    at_ms: 0,
                    metric: GuardrailMetricKind::OptOutRate,
                    value: 0.2,
                    threshold: 0.1,
                    direction: ThresholdDirection::Above,
                    action_taken: AlertAction::Pause,
                    model_version: 2,
                    reporting_devices: 3,
                }],
                evaluation: vec![EvaluationSpend {
                    sequence: 4,
                    model_version: 2,
                    noise_multiplier: 4.0,
                    epsilon: 1.0,
                    delta: 1e-6,
                }],
            },
            operations: vec![Operation {
                sequence: 6,
                at_ms: 0,
                kind: "paused".into(),
                detail: format!("paused: {s}"),
            }],
        }
    }

    /// Hostile text: markup, entities, quotes, a table pipe, line breaks that would start a
    /// heading or a table row, and backticks.
    const HOSTILE: &str = "<script>alert('x')</script> & \"q\" a|b\n# injected heading\r\n| injected | row |\n`tick` ``two``";

    /// Every user-written field of the fixture.
    fn user_fields(r: &ImpactReport) -> Vec<String> {
        let a = &r.assessment;
        let mut v = vec![
            r.run_id.clone(),
            r.title.clone(),
            r.ledger.problem.clone().unwrap_or_default(),
            a.purpose.clone(),
            a.owner.clone(),
            a.opt_out_policy.consent_model.clone(),
            a.opt_out_policy.description.clone(),
            a.opt_out_policy.withdrawal_effect.clone(),
            a.data_elements_not_used[0].clone(),
        ];
        for h in &a.harm_scenarios {
            v.extend([
                h.scenario.clone(),
                h.affected_groups.clone(),
                h.mitigation.clone(),
                h.residual_risk.clone(),
            ]);
        }
        for k in &a.kpis {
            v.extend([k.metric.clone(), k.description.clone()]);
        }
        v.extend(r.operations.iter().map(|o| o.detail.clone()));
        v
    }

    #[test]
    fn hostile_text_in_every_user_field_is_escaped_in_html() {
        let r = fixture(HOSTILE, true);
        let page = r.to_html();
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("alert('x')"));
        assert!(!page.contains("\"q\""));
        for f in user_fields(&r) {
            assert!(!page.contains(&f), "unescaped: {f:?}");
            assert!(page.contains(&html::esc(&f)), "missing: {f:?}");
        }
        // The page's own markup is intact: one head, one body, the banner, no extra tags.
        assert_eq!(page.matches("<body>").count(), 1);
        assert_eq!(page.matches("id=\"ledger-broken\"").count(), 1);
        assert_eq!(
            page.matches("<table").count(),
            page.matches("</table>").count()
        );
    }

    #[test]
    fn hostile_text_cannot_break_markdown_lines_or_tables() {
        let r = fixture(HOSTILE, true);
        let md = r.to_markdown();
        for line in md.lines() {
            assert!(!line.starts_with("# injected"), "{line}");
            assert!(!line.starts_with("| injected"), "{line}");
        }
        assert!(!md.contains('\r'));
        // No user text becomes raw HTML where the Markdown is rendered: markup survives only
        // inside code spans (the run id), which Markdown shows verbatim.
        let flat = |f: &str| f.replace("\r\n", " ").replace('\n', " ");
        let run_id = flat(&r.run_id);
        assert!(!md.replace(&run_id, "").contains("<script"), "{md}");
        assert!(md.contains(&format!("``` {run_id} ```")), "{md}");
        // Each user field is on one line.
        for f in user_fields(&r).into_iter().skip(1) {
            let flat = flat(&f).replace('<', "&lt;").replace('>', "&gt;");
            assert!(
                md.contains(&flat) || md.contains(&flat.replace('|', "\\|")),
                "{flat:?}"
            );
        }
        // Every row of a table has as many cells as its header.
        let unescaped_pipes = |l: &str| {
            let mut n = 0;
            let mut prev = ' ';
            for c in l.chars() {
                if c == '|' && prev != '\\' {
                    n += 1;
                }
                prev = c;
            }
            n
        };
        let mut tables = 0;
        let mut header: Option<usize> = None;
        for line in md.lines() {
            if line.starts_with('|') {
                let n = unescaped_pipes(line);
                match header {
                    None => {
                        header = Some(n);
                        tables += 1;
                    }
                    Some(h) => assert_eq!(n, h, "{line}"),
                }
            } else {
                header = None;
            }
        }
        assert!(tables >= 8, "{tables} tables");
        // The hostile harm scenario row is one row with four cells.
        let row = md
            .lines()
            .find(|l| l.starts_with("| scenario &lt;script&gt;"))
            .expect("the harm row");
        assert_eq!(unescaped_pipes(row), 5, "{row}");
    }

    /// Headings as a reader sees them: Markdown's `#` lines; HTML's `<hN>` and the footer's
    /// bold heading.
    fn md_headings(md: &str) -> Vec<String> {
        md.lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim().to_string())
            .collect()
    }

    fn html_headings(page: &str) -> Vec<String> {
        let mut out = vec![];
        let mut rest = page;
        while let Some(i) = rest.find("<h") {
            rest = &rest[i + 2..];
            let level = rest.chars().next().unwrap();
            if level.is_ascii_digit() && rest[1..].starts_with('>') {
                let end = rest.find("</h").unwrap();
                out.push(rest[2..end].to_string());
            }
        }
        let footer = page.find("<footer><b>").unwrap() + "<footer><b>".len();
        let end = page[footer..].find(".</b>").unwrap();
        out.push(page[footer..footer + end].to_string());
        out
    }

    #[test]
    fn both_renderings_have_the_same_headings() {
        for broken in [false, true] {
            let r = fixture("plain words", broken);
            let md = md_headings(&r.to_markdown());
            assert_eq!(md, html_headings(&r.to_html()));
            assert_eq!(md[0], "Impact report: title plain words");
            assert!(md.contains(&"Per-device ε".to_string()), "{md:?}");
            assert!(md.contains(&"Adaptive clipping".to_string()), "{md:?}");
        }
        // Without KPIs, clipping or alerts the sections are still the same in both.
        let mut r = fixture("plain words", false);
        r.assessment.kpis.clear();
        r.spend.clip_trajectory.clear();
        r.guardrails.alerts.clear();
        assert_eq!(md_headings(&r.to_markdown()), html_headings(&r.to_html()));
    }

    /// Each text of the document with whether HTML shows it (a chart's fallback tables are
    /// Markdown's alone).
    fn texts(blocks: &[Block], in_html: bool, out: &mut Vec<(String, bool)>) {
        fn inlines(is: &[Inline], in_html: bool, out: &mut Vec<(String, bool)>) {
            for i in is {
                match i {
                    Inline::Text(s) | Inline::Code(s) | Inline::Hash(s) => {
                        out.push((s.clone(), in_html))
                    }
                    Inline::Status { text, .. } => out.push((text.clone(), in_html)),
                    Inline::Strong(inner) => inlines(inner, in_html, out),
                    Inline::Ident(_) | Inline::Note(_) => {}
                }
            }
        }
        for b in blocks {
            match b {
                Block::Heading { text, .. } => out.push((text.clone(), in_html)),
                Block::Paragraph { inlines: i, .. } | Block::Callout { inlines: i, .. } => {
                    inlines(i, in_html, out)
                }
                Block::List(items) => {
                    for item in items {
                        inlines(&item.inlines, in_html, out);
                    }
                }
                Block::Fields(fields) => {
                    for f in fields {
                        out.push((f.label.to_string(), in_html));
                        inlines(&f.value, in_html, out);
                        for n in &f.notes {
                            inlines(n, in_html, out);
                        }
                    }
                }
                Block::Table(t) => {
                    for c in &t.columns {
                        // HTML capitalises a header's first letter.
                        if let Some((first, rest)) = c.header.split_first() {
                            inlines(std::slice::from_ref(first), false, out);
                            inlines(rest, in_html, out);
                        }
                    }
                    for row in &t.rows {
                        for c in row {
                            inlines(c, in_html, out);
                        }
                    }
                }
                Block::Figure {
                    caption, fallback, ..
                } => {
                    if let Some(c) = caption {
                        inlines(c, in_html, out);
                    }
                    texts(fallback, false, out);
                }
                Block::Columns(cols) => cols.iter().for_each(|c| texts(c, in_html, out)),
                Block::Footer { heading, blocks } => {
                    out.push((heading.clone(), in_html));
                    texts(blocks, in_html, out);
                }
            }
        }
    }

    #[test]
    fn every_sentence_is_written_once_and_rendered_in_both_formats() {
        for broken in [false, true] {
            let r = fixture("plain words", broken);
            let d = r.document();
            let (md, page) = (r.to_markdown(), r.to_html());
            let mut all = vec![];
            texts(&d.banner, true, &mut all);
            texts(&d.blocks, true, &mut all);
            assert!(all.len() > 100, "{}", all.len());
            for (s, in_html) in all {
                assert!(md.contains(&s), "not in the Markdown: {s:?}");
                if in_html {
                    assert!(page.contains(&html::esc(&s)), "not in the HTML: {s:?}");
                }
            }
        }
        // One sentence, one source: the per-device sentence appears once in each rendering.
        let r = fixture("plain words", false);
        let sentence =
            "The largest per-device ε is 2.0000: the one device with it took part in 2 rounds.";
        assert_eq!(r.to_markdown().matches(sentence).count(), 1);
        assert_eq!(r.to_html().matches(sentence).count(), 1);
    }
}
